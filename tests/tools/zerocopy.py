#!/usr/bin/env python3
"""sendfile(2) and splice(2) over TCP, for the acceleration tests.

  zerocopy.py serve PORT FILE   per connection, the first byte says:
                                G: send FILE with sendfile, close;
                                P: receive to EOF with splice (socket to
                                   pipe), answer with `size sha256`.
  zerocopy.py get HOST PORT     fetch with splice; print `size sha256`.
  zerocopy.py put HOST PORT FILE
                                send FILE with sendfile, half-close; print
                                the server's `size sha256`.
"""
import hashlib
import os
import socket
import sys
import threading


def splice_to_end(sock):
    """Reads `sock` to EOF through a pipe with splice; size and SHA-256."""
    r, w = os.pipe()
    digest, size = hashlib.sha256(), 0
    try:
        while True:
            n = os.splice(sock.fileno(), w, 1 << 16)
            if n == 0:
                break
            while n:
                chunk = os.read(r, n)
                digest.update(chunk)
                size += len(chunk)
                n -= len(chunk)
    finally:
        os.close(r)
        os.close(w)
    return f"{size} {digest.hexdigest()}"


def send_file(sock, path):
    with open(path, "rb") as f:
        size, offset = os.fstat(f.fileno()).st_size, 0
        while offset < size:
            offset += os.sendfile(sock.fileno(), f.fileno(), offset, size - offset)


def handle(conn, path):
    with conn:
        mode = conn.recv(1)
        if mode == b"G":
            send_file(conn, path)
        elif mode == b"P":
            conn.sendall(splice_to_end(conn).encode() + b"\n")


def serve(port, path):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port))
    s.listen(128)
    while True:
        conn, _ = s.accept()
        threading.Thread(target=handle, args=(conn, path), daemon=True).start()


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "serve":
        serve(int(sys.argv[2]), sys.argv[3])
    elif cmd == "get":
        with socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=60) as c:
            c.settimeout(None)  # splice(2) needs a blocking socket
            c.sendall(b"G")
            print(splice_to_end(c))
    elif cmd == "put":
        with socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=60) as c:
            c.settimeout(None)  # sendfile(2) needs a blocking socket
            c.sendall(b"P")
            send_file(c, sys.argv[4])
            c.shutdown(socket.SHUT_WR)
            print(c.makefile("rb").readline().decode().strip())
