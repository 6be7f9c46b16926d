#!/usr/bin/env python3
"""Many concurrent connections, for the acceleration tests.

  many.py serve PORT        an echo server on one thread (selectors), for
                            any number of connections (IPv4 and IPv6).
  many.py open HOST PORT N  opens N connections at once, sends a line on
                            each, reads its echo, then closes them all;
                            prints `open=N echoed=M`.
"""
import resource
import selectors
import socket
import sys


def raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve(port):
    raise_fd_limit()
    sel = selectors.DefaultSelector()
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port))
    s.listen(4096)
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            if key.fileobj is s:
                try:
                    conn, _ = s.accept()
                except BlockingIOError:
                    continue
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ)
                continue
            conn = key.fileobj
            try:
                data = conn.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if data:
                conn.sendall(data)
            else:
                sel.unregister(conn)
                conn.close()


def open_many(host, port, n):
    raise_fd_limit()
    sel = selectors.DefaultSelector()
    conns = []
    for _ in range(n):
        c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        c.setblocking(False)
        c.connect_ex((host, port))
        conns.append(c)
        sel.register(c, selectors.EVENT_WRITE)
    pending, opened, echoed, line = set(conns), 0, 0, b"hello\n"
    got = {}
    while pending:
        events = sel.select(timeout=60)
        if not events:
            break
        for key, mask in events:
            c = key.fileobj
            if mask & selectors.EVENT_WRITE:
                if c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    sel.unregister(c)
                    pending.discard(c)
                    continue
                opened += 1
                c.send(line)
                sel.modify(c, selectors.EVENT_READ)
            else:
                try:
                    data = c.recv(64)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                got[c] = got.get(c, b"") + data
                if not data or got[c] == line:
                    echoed += got[c] == line
                    sel.unregister(c)
                    pending.discard(c)
    for c in conns:
        c.close()
    print(f"open={opened} echoed={echoed}")


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    elif sys.argv[1] == "open":
        open_many(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
