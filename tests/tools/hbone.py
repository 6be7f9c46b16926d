#!/usr/bin/env python3
"""A misbehaving client of the tunnel port (:15008), for the hardening
tests. Prints one line saying what the server did.

  hbone.py HOST PORT CERT KEY CA random
        random bytes instead of a TLS ClientHello
  hbone.py HOST PORT CERT KEY CA http1
        mutual TLS (no ALPN), then an HTTP/1.1 request
  hbone.py HOST PORT CERT KEY CA get
        mutual TLS, HTTP/2, a GET instead of a CONNECT
  hbone.py HOST PORT CERT KEY CA connect DEST [HEADER_BYTES]
        mutual TLS, HTTP/2, a CONNECT to DEST (host:port), with a header of
        HEADER_BYTES bytes if given

  hbone.py HOST PORT CERT KEY CA silent
        mutual TLS, then nothing sent: how long until the server closes

  hbone.py HOST PORT CERT KEY CA handshake
        mutual TLS with ALPN h2, then one read for the server's verdict
        on the client's certificate

Lines: `handshake_ms=<ms> alpn=<protocol> serial=<hex> expires_in_s=<s>
client=<accepted|rejected:REASON>` (the server's certificate, and whether
the server took the client's), `untrusted_server=<why>` (the server's
certificate does not chain to CA), `closed after=<ms>` (the server closed the connection),
`http1 <status line>`, `status=<code>` (and ` reset=<code>` if the stream
was then reset), `reset=<code>`, `goaway=<code>`.
"""
import os
import socket
import ssl
import sys
import time

# h2 is installed for this python by `cargo xtask setup`.
sys.path.insert(
    0,
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "target", "pydeps"),
)
import h2.config  # noqa: E402
import h2.connection  # noqa: E402
import h2.events  # noqa: E402

TIMEOUT = 10


def tls(host, port, cert, key, ca, alpn):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(ca)
    ctx.load_cert_chain(cert, key)
    # The node's certificate names a SPIFFE URI, not the address dialled.
    ctx.check_hostname = False
    if alpn:
        ctx.set_alpn_protocols(alpn)
    raw = socket.create_connection((host, port), timeout=TIMEOUT)
    return ctx.wrap_socket(raw)


def random_bytes(host, port):
    started = time.monotonic()
    with socket.create_connection((host, port), timeout=TIMEOUT) as s:
        s.sendall(os.urandom(1024))
        while True:
            try:
                if not s.recv(4096):
                    break
            except ConnectionResetError:
                break
    print(f"closed after={int((time.monotonic() - started) * 1000)}")


def http1(host, port, cert, key, ca):
    with tls(host, port, cert, key, ca, None) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        head = s.recv(4096).decode(errors="replace")
        print("http1 " + head.split("\r\n", 1)[0])


def h2_request(host, port, cert, key, ca, headers, end_stream=False):
    s = tls(host, port, cert, key, ca, ["h2"])
    conn = h2.connection.H2Connection(
        config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    )
    conn.initiate_connection()
    conn.send_headers(1, headers, end_stream=end_stream)
    s.sendall(conn.data_to_send())
    out = []
    while True:
        try:
            data = s.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            data = b""
        if not data:
            out.append("closed")
            break
        done = False
        for ev in conn.receive_data(data):
            if done:
                break
            if isinstance(ev, h2.events.ResponseReceived):
                status = dict(ev.headers).get(":status")
                out.append(f"status={status}")
                # A refusal is final (the server then resets the stream
                # with NO_ERROR, as HTTP/2 has it); a 200 opens a tunnel.
                if ev.stream_ended or not status.startswith("2"):
                    done = True
            elif isinstance(ev, h2.events.StreamEnded):
                done = True
            elif isinstance(ev, h2.events.StreamReset):
                out.append(f"reset={int(ev.error_code)}")
                done = True
            elif isinstance(ev, h2.events.ConnectionTerminated):
                out.append(f"goaway={int(ev.error_code)}")
                done = True
        pending = conn.data_to_send()
        if pending:
            s.sendall(pending)
        if done:
            break
    s.close()
    print(" ".join(out))


def main():
    host, port, cert, key, ca, mode = sys.argv[1:7]
    port = int(port)
    if mode == "handshake":
        started = time.monotonic()
        try:
            s = tls(host, port, cert, key, ca, ["h2"])
        except ssl.SSLCertVerificationError as e:
            print("untrusted_server=" + e.verify_message.replace(" ", "_"))
            return
        with s:
            took = (time.monotonic() - started) * 1000
            peer = s.getpeercert()
            left = int(ssl.cert_time_to_seconds(peer["notAfter"]) - time.time())
            # In TLS 1.3 the server judges the client's certificate after
            # the client's handshake is done: its answer to the HTTP/2
            # preface (SETTINGS) or an alert says what it decided.
            try:
                s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
                verdict = "accepted" if s.recv(1) else "rejected:closed"
            except ssl.SSLError as e:
                verdict = f"rejected:{e.reason}"
            except ConnectionResetError:
                verdict = "rejected:reset"
            print(
                f"handshake_ms={took:.2f} alpn={s.selected_alpn_protocol()} "
                f"serial={peer['serialNumber']} expires_in_s={left} client={verdict}"
            )
    elif mode == "silent":
        s = tls(host, port, cert, key, ca, ["h2"])
        s.settimeout(60)
        started = time.monotonic()
        try:
            # What the server sends (its HTTP/2 SETTINGS) is read and
            # dropped; only its closing the connection ends this.
            while s.recv(4096):
                pass
        except (ConnectionResetError, ssl.SSLError):
            pass
        print(f"closed after={int((time.monotonic() - started) * 1000)}")
    elif mode == "random":
        random_bytes(host, port)
    elif mode == "http1":
        http1(host, port, cert, key, ca)
    elif mode == "get":
        h2_request(
            host, port, cert, key, ca,
            [(":method", "GET"), (":scheme", "https"), (":authority", "x"), (":path", "/")],
            end_stream=True,
        )
    elif mode == "connect":
        headers = [(":method", "CONNECT"), (":authority", sys.argv[7])]
        if len(sys.argv) > 8:
            headers.append(("x-padding", "a" * int(sys.argv[8])))
        h2_request(host, port, cert, key, ca, headers)
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
