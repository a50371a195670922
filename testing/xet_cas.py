"""A Xet CAS on loopback that never stores anything: for fault tests of the real hf_xet client.

Follows the routes of the "Xet Protocol Specification" (hub-docs docs/xet) as hf_xet 1.8
calls them (seen on the wire): GET /v1/chunks/{prefix}/{hash} (global dedup), POST
/v1/xorb-grants/{prefix}/{hash} then the xorb upload, POST /v1/shards, GET
/v1/reconstructions/{file}, POST /v1/telemetry.  Every request gets `status` (403: the
storage side refuses, as when the account is over its quota or the token lost its rights;
503: a transient failure) or, with status 0, the connection is closed without an answer.
Successful transfers use hf_xet's own local:// CAS (see hub_server.py): this server exists
only so that the client meets a far side that refuses or fails.

    cas = FailingCas(403).start(); HubServer(cas_url=cas.url) ... cas.stop()
"""

from __future__ import annotations

import http.server
import json
import threading


class FailingCas(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, status: int, message: str = "Forbidden: Private repository storage limit reached") -> None:
        super().__init__(("127.0.0.1", 0), FailingCasHandler)
        self.status, self.message = status, message
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> "FailingCas":
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def uploads(self) -> int:
        """Requests that tried to store something (telemetry aside)."""
        with self.lock:
            return sum(1 for method, path in self.requests if method == "POST" and "/telemetry" not in path)


class FailingCasHandler(http.server.BaseHTTPRequestHandler):
    server: FailingCas
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def answer(self) -> None:
        with self.server.lock:
            self.server.requests.append((self.command, self.path))
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not self.server.status:
            self.close_connection = True  # dropped: no answer at all
            return
        body = json.dumps({"error": self.server.message}).encode()
        self.send_response(self.server.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_HEAD = do_POST = do_PUT = answer
