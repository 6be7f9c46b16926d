#!/usr/bin/env python3
"""An HTTP/1.1 upgrade client: `upgrade.py HOST PORT N` asks for `Upgrade:
echo`, then sends N messages on the switched stream and reads each back.
Prints the status line's code and how many came back intact."""
import socket
import sys

host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with socket.create_connection((host, port), timeout=5) as s:
    s.sendall(b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            break
        head += chunk
    status = head.split(b" ", 2)[1].decode() if head else "none"
    echoed = 0
    for i in range(n):
        msg = f"message {i}\n".encode()
        s.sendall(msg)
        got = b""
        while len(got) < len(msg):
            chunk = s.recv(len(msg) - len(got))
            if not chunk:
                break
            got += chunk
        echoed += got == msg
    print(f"{status} echoed={echoed}")
