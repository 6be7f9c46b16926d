#!/usr/bin/env python3
"""A hostile peer for the hardening tests: many TCP connections that never
finish a handshake.

  flood.py HOST PORT --from IP:COUNT[:stall] [--from ...] [--ready FILE]
           [--hold SECONDS]

Opens COUNT connections from each source address IP (which must be on this
host). With `stall`, each connection sends the first bytes of a TLS
ClientHello and then nothing more; without, it sends nothing at all. Once
every connection is made (or failed), it writes FILE (if given) and watches
them until the server has closed each, or for --hold seconds (default 60).
Connects go out in waves of at most 256 in progress.

Prints one line per source and a total:
  from=IP opened=N failed=F at_once=A later=L open=O later_min_ms=X later_max_ms=Y
`at_once` were closed (or reset) within 500 ms of being made, `later` were
closed after that, `open` were still open when it stopped looking; `failed`
could not connect at all (refused, or no answer within 60 s).
"""
import argparse
import errno
import resource
import selectors
import socket
import time

AT_ONCE_S = 0.5
# Connects in progress at once: a burst larger than the server's accept
# queue would measure the kernel's queue, not the server.
BATCH = 256
# A TLS record header announcing a 512-byte ClientHello, and its first
# bytes: a handshake that starts and never finishes.
PARTIAL_HELLO = bytes([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xFC, 0x03, 0x03])


class Flood:
    def __init__(self):
        self.sel = selectors.DefaultSelector()
        self.conns = []
        self.connecting = 0
        self.deadline = time.monotonic() + 60

    def start(self, host, port, ip, stall):
        self.settle(BATCH)
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind((ip, 0))
        s.setblocking(False)
        c = {"sock": s, "from": ip, "stall": stall, "state": "connecting"}
        self.conns.append(c)
        rc = s.connect_ex((host, port))
        if rc not in (0, errno.EINPROGRESS):
            c["state"] = "failed"
            s.close()
            return
        self.sel.register(s, selectors.EVENT_WRITE, c)
        self.connecting += 1

    def settle(self, limit):
        """Waits until at most `limit` connects are in progress."""
        while self.connecting > limit and time.monotonic() < self.deadline:
            for key, _ in self.sel.select(timeout=1):
                c = key.data
                if c["state"] == "connecting":
                    self.connecting -= 1
                    self.made(c)

    def made(self, c):
        """A connect finished: open (a stalling one starts its handshake),
        reset by the server before we looked, or failed."""
        s = c["sock"]
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            c["state"] = "closed" if err == errno.ECONNRESET else "failed"
            c["made"], c["after"] = time.monotonic(), 0.0
            self.sel.unregister(s)
            s.close()
            return
        c["state"] = "open"
        c["made"] = time.monotonic()
        if c["stall"]:
            try:
                s.send(PARTIAL_HELLO)
            except OSError:
                pass
        self.sel.modify(s, selectors.EVENT_READ, c)

    def watch(self, hold):
        """Until the server closed every connection, or `hold` seconds."""
        until = time.monotonic() + hold
        still = sum(1 for c in self.conns if c["state"] == "open")
        while still and time.monotonic() < until:
            for key, _ in self.sel.select(timeout=0.5):
                c = key.data
                s = c["sock"]
                try:
                    data = s.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    continue  # a TLS alert, say: the close follows
                c["state"] = "closed"
                c["after"] = time.monotonic() - c["made"]
                self.sel.unregister(s)
                s.close()
                still -= 1

    def report(self):
        totals = {}
        for c in self.conns:
            t = totals.setdefault(
                c["from"], {"opened": 0, "failed": 0, "at_once": 0, "later": [], "open": 0}
            )
            if c["state"] == "failed":
                t["failed"] += 1
                continue
            t["opened"] += 1
            if c["state"] in ("open", "connecting"):
                t["open"] += 1
            elif c["after"] < AT_ONCE_S:
                t["at_once"] += 1
            else:
                t["later"].append(c["after"])
        for ip, t in totals.items():
            later = t["later"]
            print(
                f"from={ip} opened={t['opened']} failed={t['failed']} at_once={t['at_once']} "
                f"later={len(later)} open={t['open']} "
                f"later_min_ms={int(min(later) * 1000) if later else 0} "
                f"later_max_ms={int(max(later) * 1000) if later else 0}",
                flush=True,
            )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--from", dest="sources", action="append", required=True)
    ap.add_argument("--ready")
    ap.add_argument("--hold", type=float, default=60.0)
    args = ap.parse_args()

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    flood = Flood()
    for spec in args.sources:
        parts = spec.split(":")
        ip, count, stall = parts[0], int(parts[1]), len(parts) > 2 and parts[2] == "stall"
        for _ in range(count):
            flood.start(args.host, args.port, ip, stall)
    flood.settle(0)
    if args.ready:
        with open(args.ready, "w") as f:
            f.write("ready\n")
    flood.watch(args.hold)
    flood.report()


if __name__ == "__main__":
    main()
