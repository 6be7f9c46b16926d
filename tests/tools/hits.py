#!/usr/bin/env python3
"""Many HTTP/1.1 requests on one keep-alive connection, for the route tests.

  hits.py [--fresh] HOST PORT PATH N [NAME:VALUE ...]
      sends N GETs of PATH with the given headers and prints how many
      answers began with each first word of the body, with their status:
      `200 web-v1=451`, `200 web-v2=49`, one per line, sorted; and
      `connections=1` when every request went over the one connection.
      With --fresh, each request goes on a new connection. A header value
      may hold `{i}`, the request's number (from 0); with --list, each
      answer is printed on its own line instead: `<i> <status> <word>`.
      With --rate R, requests are sent R a second (on schedule, not one
      after the other, as fast as answers allow), `retry-after=<n>` counts
      answers that carry a Retry-After header, and `elapsed_ms=<n>` says how
      long the N requests took.
"""
import collections
import http.client
import sys
import time

args = sys.argv[1:]
fresh = "--fresh" in args
listing = "--list" in args
rate = None
if "--rate" in args:
    at = args.index("--rate")
    rate = float(args[at + 1])
    del args[at:at + 2]
args = [a for a in args if a not in ("--fresh", "--list")]
host, port, path, n = args[0], int(args[1]), args[2], int(args[3])
headers = dict(h.split(":", 1) for h in args[4:])
conn = http.client.HTTPConnection(host, port, timeout=10)
counts = collections.Counter()
connects = 0
retry_after = 0
start = time.monotonic()
for i in range(n):
    if rate:
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    if fresh:
        conn.close()
    if conn.sock is None:
        connects += 1
    conn.request("GET", path, headers={k: v.replace("{i}", str(i)) for k, v in headers.items()})
    resp = conn.getresponse()
    body = resp.read().decode()
    first = body.split(None, 1)[0] if body.strip() else "-"
    counts[f"{resp.status} {first}"] += 1
    if resp.getheader("retry-after"):
        retry_after += 1
    if listing:
        print(f"{i} {resp.status} {first}")
if listing:
    sys.exit(0)
for key in sorted(counts):
    print(f"{key.replace(' ', ' ', 1)}={counts[key]}")
print(f"connections={connects}")
if rate:
    print(f"retry-after={retry_after}")
    print(f"elapsed_ms={int((time.monotonic() - start) * 1000)}")
