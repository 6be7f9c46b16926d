#!/usr/bin/env python3
"""An HTTP/1.1 server for L7 tests: answers every request on PORT (IPv4 and
IPv6, keep-alive) with 200 and a body of "<METHOD> <PATH>" (after NAME and a
space when given), then one line per `x-` request header, the `traceparent`
(for the tracing tests) and the Host, and counts the requests it answered in
the `x-served` response header. A request with `Upgrade: echo` is switched
(101) and every byte sent after it comes back. A path under /delay/<ms> is answered after that many milliseconds; the
first request for each path under /flaky is answered 503, the later ones 200.
Started `failing`, it answers every request 503 until asked `/__heal` (and
fails again after `/__fail`): an endpoint that is up but broken.

  httpd.py PORT [NAME [failing]]"""
import http.server
import socket
import sys
import threading
import time

port = int(sys.argv[1])
name = sys.argv[2] + " " if len(sys.argv) > 2 else ""
failing = len(sys.argv) > 3 and sys.argv[3] == "failing"
served = 0
flaky_failed = set()
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
        received = len(self.rfile.read(length)) if length else 0
        if self.path.startswith("/delay/"):
            time.sleep(int(self.path.split("/")[2]) / 1000)
        global failing
        status = 200
        with lock:
            served += 1
            count = served
            if self.path.startswith("/flaky") and self.path not in flaky_failed:
                flaky_failed.add(self.path)
                status = 503
            if self.path in ("/__heal", "/__fail"):
                failing = self.path == "/__fail"
            elif failing:
                status = 503
        lines = [f"{name}{self.command} {self.path}" + (f" body={received}" if received else "")]
        lines += [f"{k.lower()}: {v}" for k, v in self.headers.items() if k.lower().startswith("x-") or k.lower() == "traceparent"]
        lines.append(f"host: {self.headers.get('host', '')}")
        body = ("\n".join(lines) + "\n").encode()
        self.send_response(status)
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
    # Python's default backlog of 5 drops the SYNs of a burst of clients
    # (each then waits a second to retry).
    request_queue_size = 128

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


Server(("::", port), Handler).serve_forever()
