#!/usr/bin/env python3
"""A client for load-balancing tests. Prints one JSON object.

  lbprobe.py tcp  HOST PORT N      N connects; reply and getpeername() of each
  lbprobe.py udp  HOST PORT N      N unconnected sendto/recvfrom; reply and sender
  lbprobe.py udpc HOST PORT N      N connected UDP sockets; reply and getpeername()
  lbprobe.py loop HOST PORT STOPFILE   connects until STOPFILE exists
  lbprobe.py flows HOST PORT N SPORT   N connects, each bound first to source
                                   port SPORT+i; the reply of each flow
"""
import errno
import json
import os
import socket
import sys
import time
from collections import Counter

mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
replies, peers, errors = Counter(), Counter(), Counter()
slowest = 0.0


def peer_str(addr):
    return f"[{addr[0]}]:{addr[1]}" if family == socket.AF_INET6 else f"{addr[0]}:{addr[1]}"


def one_tcp():
    global slowest
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(3)
    start = time.monotonic()
    try:
        s.connect((host, port))
        peers[peer_str(s.getpeername())] += 1
        replies[s.recv(64).decode().strip()] += 1
    except OSError as e:
        errors[errno.errorcode.get(e.errno, str(e))] += 1
    finally:
        slowest = max(slowest, time.monotonic() - start)
        s.close()


def one_udp(connected):
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.settimeout(2)
    try:
        if connected:
            s.connect((host, port))
            peers[peer_str(s.getpeername())] += 1
            s.send(b"ping")
            data = s.recv(64)
        else:
            s.sendto(b"ping", (host, port))
            data, sender = s.recvfrom(64)
            peers[peer_str(sender)] += 1
        replies[data.decode().strip()] += 1
    except OSError as e:
        errors[errno.errorcode.get(e.errno, str(e)) if e.errno else type(e).__name__] += 1
    finally:
        s.close()


def one_flow(sport):
    s = socket.socket(family, socket.SOCK_STREAM)
    # Close with RST: the same flow can connect again at once (no TIME_WAIT).
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.settimeout(3)
    try:
        s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", sport))
        s.connect((host, port))
        reply = s.recv(64).decode().strip()
        replies[reply] += 1
        return reply
    except OSError as e:
        errors[errno.errorcode.get(e.errno, str(e))] += 1
        return None
    finally:
        s.close()


if mode == "flows":
    n, first = int(sys.argv[4]), int(sys.argv[5])
    flows = {str(first + i): one_flow(first + i) for i in range(n)}
    print(json.dumps({"n": n, "replies": replies, "peers": peers, "errors": errors,
                      "slowest_ms": 0, "flows": flows}))
    sys.exit(0)

if mode == "loop":
    stop = sys.argv[4]
    n = 0
    while not os.path.exists(stop):
        one_tcp()
        n += 1
else:
    n = int(sys.argv[4])
    for _ in range(n):
        if mode == "tcp":
            one_tcp()
        else:
            one_udp(mode == "udpc")

print(json.dumps({"n": n, "replies": replies, "peers": peers, "errors": errors,
                  "slowest_ms": round(slowest * 1000, 3)}))
