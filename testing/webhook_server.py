"""A webhook receiver on loopback for tests: stands in for a Slack or Discord incoming webhook.

It follows Slack's incoming webhooks (https://api.slack.com/messaging/webhooks: a POST with
a JSON body whose `text` is shown, answered 200 "ok") and Discord's "execute webhook"
(https://discord.com/developers/docs/resources/webhook#execute-webhook: `content`; Discord
answers 204, this receiver 200 as Slack does).  Every message is recorded.  Faults: `hang`
accepts each request and never answers (a receiver stuck behind a load balancer; `hung` counts
them) until `release()`, after which those requests end unanswered; `fail_next` answers 500 that
many times.  A POST to another path is answered 404 "no_service", as Slack answers a removed
webhook.  `posts` counts every POST, answered or not.

    hook = WebhookServer().start(); ... hook.url ... hook.messages; hook.stop()
"""

from __future__ import annotations

import http.server
import json
import threading


class WebhookServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, secret_path: str = "/services/T000/B000/secret-token") -> None:
        super().__init__(("127.0.0.1", 0), WebhookHandler)
        self.secret_path = secret_path  # like Slack's, the path is the credential
        self.messages: list[dict] = []
        self.hang = False
        self.hung = 0
        self.posts = 0
        self.fail_next = 0
        self.lock = threading.Lock()
        self.released = threading.Event()  # set at stop: hanging requests end

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{self.secret_path}"

    def start(self) -> "WebhookServer":
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        return self

    def release(self) -> None:
        """Stop hanging: requests held so far end unanswered, later ones are served."""
        self.hang = False
        self.released.set()

    def stop(self) -> None:
        self.released.set()
        self.shutdown()
        self.server_close()

    def events(self, name: str) -> list[dict]:
        with self.lock:
            return [message for message in self.messages if message.get("event") == name]

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that gave up on a hanging request is no error


class WebhookHandler(http.server.BaseHTTPRequestHandler):
    server: WebhookServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with self.server.lock:
            self.server.posts += 1
        if self.server.hang:
            with self.server.lock:
                self.server.hung += 1
            self.server.released.wait()
            return
        if self.path != self.server.secret_path:
            self._answer(404, b"no_service")
            return
        with self.server.lock:
            if self.server.fail_next > 0:
                self.server.fail_next -= 1
                failing = True
            else:
                failing = False
                try:
                    self.server.messages.append(json.loads(body))
                except ValueError:
                    self._answer(400, b"invalid_payload")
                    return
        if failing:
            self._answer(500, b"internal error")
        else:
            self._answer(200, b"ok")

    def _answer(self, status: int, text: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        self.wfile.write(text)
