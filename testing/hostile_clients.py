"""Hostile clients of a commander, in one process: what anyone who can reach its port can do
without a secret (the attacks measured in ../shared/notes/internet.md).  The bytes are
HTTP/1.1 as RFC 9112 frames it and the first record of a TLS 1.2/1.3 ClientHello as RFC 8446
section 5.1 frames it; they are sent whole or cut short, as an attacker sends them.

    python -m testing.hostile_clients --port PORT [--idle N] [--drip N] [--half-tls N]
        [--tls-idle N] [--big-headers N] [--big-bodies N] --seconds S

idle: connect and say nothing; drip: a request's header bytes, one every 0.5 s, never the end;
half-tls: the first bytes of a ClientHello, then nothing; tls-idle: a whole TLS handshake,
then nothing; big-headers: 6 MB of header lines (as much of it as the socket takes);
big-bodies: headers announcing a 256 KiB body, then all of it but the last byte.  A connection the commander closes is opened again,
so the pressure lasts `seconds`.  Prints `holding N` once every connection was tried, and at
the end one JSON line: how many were opened, answered 503 (over the cap), answered 4xx, and
closed by the commander, and the longest a dripping connection lived.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import selectors
import socket
import ssl
import time
from dataclasses import dataclass

CLIENT_HELLO_START = bytes.fromhex("160301020001") + b"\x00\x01\xfc\x03\x03" + bytes(20)  # record + handshake header, cut
DRIP_REQUEST = b"POST /api/lease/renew HTTP/1.1\r\nHost: commander\r\nX-Padding: " + b"a" * 4000


@dataclass
class Connection:
    kind: str
    sock: socket.socket | ssl.SSLSocket
    opened: float
    sent: int = 0
    answered: bytes = b""


class Hostile:
    def __init__(self, port: int, counts: dict[str, int]) -> None:
        self.port, self.counts = port, counts
        self.selector = selectors.DefaultSelector()
        self.stats = {"opened": 0, "answered_503": 0, "answered_4xx": 0, "closed_by_commander": 0,
                      "connect_failed": 0, "longest_drip_seconds": 0.0}
        self.live: list[Connection] = []
        self.reopen: list[str] = []  # kinds of closed connections, opened again every 0.1 s (not in a hot loop)
        self.tls = ssl.create_default_context()
        self.tls.check_hostname, self.tls.verify_mode = False, ssl.CERT_NONE

    def open(self, kind: str) -> None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=2)
            if kind == "tls-idle":
                sock = self.tls.wrap_socket(sock)  # the whole handshake, then silence
        except OSError:
            self.stats["connect_failed"] += 1
            return
        sock.setblocking(False)
        connection = Connection(kind, sock, time.monotonic())
        self.stats["opened"] += 1
        if kind == "half-tls":
            self.send(connection, CLIENT_HELLO_START)
        elif kind == "big-headers":
            self.send(connection, b"GET / HTTP/1.1\r\n" + b"".join(b"X-H%d: %s\r\n" % (i, b"b" * 60000) for i in range(100)))
        elif kind == "big-bodies":
            self.send(connection, b"POST /api/lease/renew HTTP/1.1\r\nContent-Length: 262144\r\n\r\n" + b"c" * 262143)
        self.selector.register(sock, selectors.EVENT_READ, connection)
        self.live.append(connection)

    def send(self, connection: Connection, data: bytes) -> None:
        with contextlib.suppress(OSError):  # a full send buffer: what did not fit is simply not sent
            connection.sent += connection.sock.send(data)

    def closed(self, connection: Connection) -> None:
        self.selector.unregister(connection.sock)
        connection.sock.close()
        self.live.remove(connection)
        self.stats["closed_by_commander"] += 1
        if connection.answered.startswith(b"HTTP/1.1 503"):
            self.stats["answered_503"] += 1
        elif connection.answered.startswith(b"HTTP/1.1 4"):
            self.stats["answered_4xx"] += 1
        if connection.kind == "drip":
            self.stats["longest_drip_seconds"] = max(self.stats["longest_drip_seconds"],
                                                     round(time.monotonic() - connection.opened, 1))
        self.reopen.append(connection.kind)

    def run(self, seconds: float) -> None:
        for kind, count in self.counts.items():
            for _ in range(count):
                self.open(kind)
        print(f"holding {len(self.live)}", flush=True)
        end, next_drip, next_reopen = time.monotonic() + seconds, 0.0, 0.0
        while time.monotonic() < end:
            if time.monotonic() >= next_reopen:
                next_reopen = time.monotonic() + 0.1
                kinds, self.reopen = self.reopen, []
                for kind in kinds:
                    self.open(kind)
            for key, _ in self.selector.select(timeout=0.1):
                connection = key.data
                try:
                    data = connection.sock.recv(4096)
                except (ssl.SSLWantReadError, BlockingIOError):
                    continue
                except OSError:
                    data = b""
                if data:
                    connection.answered += data[:64]
                else:
                    self.closed(connection)
            if time.monotonic() >= next_drip:
                next_drip = time.monotonic() + 0.5
                for connection in [c for c in self.live if c.kind == "drip"]:
                    self.send(connection, DRIP_REQUEST[connection.sent:connection.sent + 1])
        for connection in self.live:
            connection.sock.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    kinds = ("idle", "drip", "half-tls", "tls-idle", "big-headers", "big-bodies")
    for kind in kinds:
        parser.add_argument(f"--{kind}", type=int, default=0)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    hostile = Hostile(args.port, {kind: getattr(args, kind.replace("-", "_")) for kind in kinds})
    hostile.run(args.seconds)
    print(json.dumps(hostile.stats), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
