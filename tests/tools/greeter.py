#!/usr/bin/env python3
"""A server-first service, as MySQL or SMTP are: the server speaks first.

  greeter.py serve PORT     greets every connection with one line, then
                            echoes what it is sent (IPv4 and IPv6).
  greeter.py time HOST PORT connects and prints the greeting and how long it
                            took after the connect, in milliseconds:
                            `greeting=<line> ms=<n>`.
"""
import socket
import sys
import threading
import time


def serve(port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port))
    s.listen(128)
    while True:
        conn, _ = s.accept()
        threading.Thread(target=greet, args=(conn,), daemon=True).start()


def greet(conn):
    with conn:
        conn.sendall(b"220 greeter ready\n")
        while data := conn.recv(4096):
            conn.sendall(data)


def timed(host, port):
    with socket.create_connection((host, port), timeout=5) as c:
        connected = time.monotonic()
        line = c.makefile("rb").readline().decode().strip()
        took = (time.monotonic() - connected) * 1000
    print(f"greeting={line.replace(' ', '_')} ms={took:.0f}")


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        timed(sys.argv[2], int(sys.argv[3]))
