#!/usr/bin/env python3
"""Many HTTP/1.1 requests on one keep-alive connection, for the route tests.

  hits.py HOST PORT PATH N [NAME:VALUE ...]
      sends N GETs of PATH with the given headers and prints how many
      answers began with each first word of the body, with their status:
      `200 web-v1=451`, `200 web-v2=49`, one per line, sorted; and
      `connections=1` when every request went over the one connection.
"""
import collections
import http.client
import sys

host, port, path, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
headers = dict(h.split(":", 1) for h in sys.argv[5:])
conn = http.client.HTTPConnection(host, port, timeout=10)
counts = collections.Counter()
connects = 0
for _ in range(n):
    if conn.sock is None:
        connects += 1
    conn.request("GET", path, headers=headers)
    resp = conn.getresponse()
    body = resp.read().decode()
    first = body.split(" ", 1)[0] if body else "-"
    counts[f"{resp.status} {first}"] += 1
for key in sorted(counts):
    print(f"{key.replace(' ', ' ', 1)}={counts[key]}")
print(f"connections={connects}")
