#!/usr/bin/env python3
"""Transfers for the mesh tests, both ends of a TCP connection.

  xfer.py serve PORT            a server (IPv4 and IPv6); per connection the
                                first byte says what to do:
                                B: read to EOF, then send it all back, close;
                                R: echo each line until EOF.
  xfer.py bulk HOST PORT MB [MIBPS]
                                send MB MiB of varied bytes (at most MIBPS
                                MiB a second, if given), half-close, read
                                the echo; print sizes and SHA-256s.
  xfer.py rr HOST PORT TEXT N [PAUSE]
                                N request/reply round trips of a line with
                                TEXT on one connection, PAUSE seconds apart;
                                exits 1 when a reply is missing or wrong.
  xfer.py probe HOST PORT N GAP
                                N new connections, GAP seconds apart, one
                                round trip each; prints each one's time
                                (connect to reply) in ms; exits 1 when one
                                fails.
"""
import hashlib
import os
import socket
import sys
import threading
import time


def serve(port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port))
    s.listen(1024)
    while True:
        conn, _ = s.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def handle(conn):
    with conn:
        mode = conn.recv(1)
        if mode == b"B":
            chunks = []
            while True:
                b = conn.recv(1 << 20)
                if not b:
                    break
                chunks.append(b)
            for c in chunks:
                conn.sendall(c)
        elif mode == b"R":
            f = conn.makefile("rwb")
            for line in f:
                f.write(line)
                f.flush()


def connect(host, port):
    return socket.create_connection((host, port), timeout=60)


def bulk(host, port, mib, mibps=0.0):
    seed = os.urandom(1 << 16)
    started = time.monotonic()
    sent = hashlib.sha256()
    with connect(host, port) as c:
        c.sendall(b"B")
        reader_result = {}

        def read():
            back, n = hashlib.sha256(), 0
            while True:
                b = c.recv(1 << 20)
                if not b:
                    break
                back.update(b)
                n += len(b)
            reader_result["digest"], reader_result["n"] = back.hexdigest(), n

        t = threading.Thread(target=read)
        t.start()
        for i in range(mib * 16):
            block = seed[i % 7:] + seed[: i % 7]
            sent.update(block)
            c.sendall(block)
            if mibps:
                # Each 64 KiB block is 1/16 MiB: keep to the pace.
                ahead = (i + 1) / 16 / mibps - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
        c.shutdown(socket.SHUT_WR)
        t.join()
    print(f"sent={mib << 20} sent_sha={sent.hexdigest()} back={reader_result['n']} back_sha={reader_result['digest']}")


def rr(host, port, text, n, pause=0.0):
    with connect(host, port) as c:
        c.sendall(b"R")
        f = c.makefile("rwb")
        ok = 0
        for i in range(n):
            line = f"{text} {i}\n".encode()
            f.write(line)
            f.flush()
            if f.readline() == line:
                ok += 1
            if pause:
                time.sleep(pause)
    print(f"replies={ok}")
    if ok != n:
        sys.exit(1)


def probe(host, port, n, gap):
    times = []
    for i in range(n):
        if i:
            time.sleep(gap)
        started = time.monotonic()
        with socket.create_connection((host, port), timeout=10) as c:
            c.sendall(b"R")
            f = c.makefile("rwb")
            line = f"probe {i}\n".encode()
            f.write(line)
            f.flush()
            if f.readline() != line:
                print(f"probe {i}: wrong reply", flush=True)
                sys.exit(1)
            # The socket closes only once its file object does too.
            f.close()
        times.append((time.monotonic() - started) * 1000)
    print("ms=" + ",".join(f"{t:.2f}" for t in times))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "serve":
        serve(int(sys.argv[2]))
    elif cmd == "bulk":
        mibps = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
        bulk(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), mibps)
    elif cmd == "rr":
        pause = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0
        rr(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), pause)
    elif cmd == "probe":
        probe(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
