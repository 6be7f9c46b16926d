#!/usr/bin/env python3
"""New connections at a fixed rate: `churn.py HOST PORT RATE SECONDS [CSV]`
opens one connection per request to an xfer.py server (connect, one line
echoed, close), RATE a second for SECONDS, several at a time. Prints
`requests=N ok=N refused=N resets=N closed=N timeouts=N other=N` and, with CSV, one
line per request: start time (s since the epoch), latency in microseconds
and the outcome."""
import errno
import socket
import sys
import threading
import time

host, port, rate, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
csv = sys.argv[5] if len(sys.argv) > 5 else None
counts = {"ok": 0, "refused": 0, "resets": 0, "closed": 0, "timeouts": 0, "other": 0}
rows = []
lock = threading.Lock()


def one(i):
    started = time.time()
    t0 = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=5) as c:
            line = f"churn {i}\n".encode()
            c.sendall(b"R" + line)
            got = b""
            while not got.endswith(b"\n"):
                chunk = c.recv(256)
                if not chunk:
                    break
                got += chunk
            # Closed before any reply (a peer that went away between
            # accept and answer), or a wrong reply.
            outcome = "ok" if got == line else ("closed" if not got else "other")
    except ConnectionRefusedError:
        outcome = "refused"
    except ConnectionResetError:
        outcome = "resets"
    except (socket.timeout, TimeoutError):
        outcome = "timeouts"
    except OSError as e:
        outcome = "resets" if e.errno in (errno.ECONNRESET, errno.EPIPE) else "other"
    latency = int((time.monotonic() - t0) * 1e6)
    with lock:
        counts[outcome] += 1
        rows.append(f"{started:.6f},{latency},{outcome}\n")


start = time.monotonic()
total = int(rate * seconds)
threads = []
for i in range(total):
    due = start + i / rate
    now = time.monotonic()
    if due > now:
        time.sleep(due - now)
    t = threading.Thread(target=one, args=(i,), daemon=True)
    t.start()
    threads.append(t)
    if len(threads) > 256:
        threads = [t for t in threads if t.is_alive()]
for t in threads:
    t.join()
if csv:
    with open(csv, "w") as f:
        f.writelines(rows)
print(f"requests={total} " + " ".join(f"{k}={v}" for k, v in counts.items()))
