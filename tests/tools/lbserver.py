#!/usr/bin/env python3
"""A backend for load-balancing tests: answers every TCP connection and every
UDP datagram on PORT (IPv4 and IPv6) with its NAME and a newline."""
import socket
import sys
import threading

name, port = sys.argv[1].encode() + b"\n", int(sys.argv[2])


def dual(kind):
    s = socket.socket(socket.AF_INET6, kind)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port))
    return s


def serve_udp():
    u = dual(socket.SOCK_DGRAM)
    while True:
        _, peer = u.recvfrom(2048)
        u.sendto(name, peer)


def serve_tcp():
    t = dual(socket.SOCK_STREAM)
    t.listen(4096)
    while True:
        conn, _ = t.accept()
        try:
            conn.sendall(name)
        except OSError:
            pass
        conn.close()


threading.Thread(target=serve_udp, daemon=True).start()
serve_tcp()
