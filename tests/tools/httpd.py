#!/usr/bin/env python3
"""An HTTP/1.1 server for L7 tests: answers every request on PORT (IPv4 and
IPv6, keep-alive) with 200 and a body of "<METHOD> <PATH>", and counts the
requests it answered in the `x-served` response header. A request with
`Upgrade: echo` is switched (101) and every byte sent after it comes back."""
import http.server
import socket
import sys
import threading

port = int(sys.argv[1])
served = 0
lock = threading.Lock()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self):
        global served
        if self.headers.get("upgrade") == "echo":
            self.send_response(101)
            self.send_header("connection", "Upgrade")
            self.send_header("upgrade", "echo")
            self.end_headers()
            self.wfile.flush()
            while data := self.connection.recv(65536):
                self.connection.sendall(data)
            self.close_connection = True
            return
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        with lock:
            served += 1
            count = served
        body = f"{self.command} {self.path}\n".encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.send_header("x-served", str(count))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = answer

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


Server(("::", port), Handler).serve_forever()
