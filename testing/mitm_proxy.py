"""A man in the middle between workers and a plain-HTTP commander, on loopback: what anyone on
the path can do to the relay's answers.  It follows the relay protocol as it crosses the wire
(relay.py, section 3: JSON bodies, X-Relay-* headers) and HTTP/1.1 message framing (RFC 9112).

    python -m testing.mitm_proxy --port PORT --commander URL [--switch FILE] [--mode MODE] [--delay-file FILE]

Modes, applied while forging is on (always, or while FILE exists; otherwise it only forwards):
  attack:          renewals (and reports), every other one: answered with a forged 409 (the
                   commander never sees the request), or forwarded with lease_expires_in_sec
                   stretched to 3600 s (the commander's signature header passed on, no longer
                   matching); the others forwarded untouched.  A "denied" acquire answer becomes a grant with a
                   made-up token.  (Forging every answer would only be dropping them all.)
  old-commander:   answers lose X-Relay-Response-Signature and /api/health loses its "protocol",
                   as a commander older than protocol 2 answers.
Each forgery prints one line (`forged 409`, `forged grant`, `stretched ttl`) for tests to count.
Delay: while the --delay-file exists, every answer is held back by the seconds it holds (a
congested path: the commander got the request at once, the worker hears late).
"""

from __future__ import annotations

import argparse
import collections
import http.client
import http.server
import itertools
import json
import os
import threading
import time
import urllib.parse

FORGED_409 = {"error": "lease is not held by this token (expired, released or taken over)"}


class Proxy(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, commander: str, switch: str, mode: str, delay_file: str = "") -> None:
        super().__init__(("127.0.0.1", port), ProxyHandler)
        self.delay_file = delay_file
        target = urllib.parse.urlsplit(commander)
        self.target = (target.hostname, target.port)
        self.switch, self.mode = switch, mode
        self.turns = collections.defaultdict(itertools.count)  # per path: 0 forged 409, 2 stretched, odd untouched
        self.print_lock = threading.Lock()

    def forging(self) -> bool:
        return not self.switch or os.path.exists(self.switch)

    def answer_delay(self) -> float:
        try:
            with open(self.delay_file) as handle:
                return float(handle.read() or 0)
        except (OSError, ValueError):
            return 0.0

    def say(self, line: str) -> None:
        with self.print_lock:
            print(line, flush=True)


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: Proxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:
        self.relay()

    def do_POST(self) -> None:
        self.relay()

    def relay(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0") or 0))
        forging, mode = self.server.forging(), self.server.mode
        turn = next(self.server.turns[self.path]) % 4 if self.path in ("/api/lease/renew", "/api/job/report") else 2
        if forging and mode == "attack" and turn == 0:
            self.server.say("forged 409")
            self.answer(409, json.dumps(FORGED_409).encode(), {})
            return
        upstream = http.client.HTTPConnection(*self.server.target, timeout=30)
        try:
            upstream.request(self.command, self.path, body=body if self.command != "GET" else None,
                             headers={k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")})
            answer = upstream.getresponse()
            status, data = answer.status, answer.read()
            headers = {k: v for k, v in answer.getheaders() if k.lower().startswith(("x-relay", "content-type"))}
        except OSError:
            self.close_connection = True
            return
        finally:
            upstream.close()
        if forging and turn == 2:
            status, data, headers = self.forge(status, data, headers, mode)
        if self.server.delay_file:
            time.sleep(self.server.answer_delay())
        self.answer(status, data, headers)

    def forge(self, status: int, data: bytes, headers: dict, mode: str) -> tuple[int, bytes, dict]:
        try:
            payload = json.loads(data)
        except ValueError:
            return status, data, headers
        if mode == "old-commander":
            headers.pop("X-Relay-Response-Signature", None)
            payload.pop("protocol", None)
        elif payload.get("status") == "denied":
            self.server.say("forged grant")
            payload = {"status": "granted", "lease_token": "forged-" + os.urandom(8).hex(),
                       "epoch": payload.get("epoch", 0) + 1, "lease_expires_in_sec": 3600, "checkpoint": None}
        elif "lease_expires_in_sec" in payload and payload.get("lease_expires_in_sec") is not None:
            self.server.say("stretched ttl")
            payload["lease_expires_in_sec"] = 3600
        return status, json.dumps(payload).encode(), headers

    def answer(self, status: int, data: bytes, headers: dict) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--commander", required=True, help="the commander's http:// URL")
    parser.add_argument("--switch", default="", help="forge only while this file exists (default: always)")
    parser.add_argument("--mode", choices=("attack", "old-commander"), default="attack")
    parser.add_argument("--delay-file", default="", help="hold every answer back by the seconds this file holds")
    args = parser.parse_args()
    proxy = Proxy(args.port, args.commander, args.switch, args.mode, args.delay_file)
    print(f"proxy on {args.port} -> {args.commander}", flush=True)
    proxy.serve_forever(poll_interval=0.2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
