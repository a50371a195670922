"""A network path between one worker and the commander, on loopback, for the lease tests.

It stands for what TCP between a pod and a VPS can do to the relay's traffic without anyone
forging a byte (RFC 793's stream: order kept, arbitrary delay, loss of the path): a relay of
TCP streams that can hold every answer back by `answer_delay` seconds (a congested or
bufferbloated link: the request arrives at once, its answer late) and can cut the path (a
partition: both sides keep their connections, nothing passes any more).  It speaks no HTTP;
it only reads the request line of what passes, to note when a lease renewal reached the
commander and to cut the path right after the answer to one was delivered.

    path = WireProxy(commander_port).start(); path.answer_delay = 4.0; ... path.url ...
    path.cut_after_next_renewal_answer(); ... path.renewals_forwarded ...; path.stop()
"""

from __future__ import annotations

import heapq
import socket
import threading
import time

RENEWAL = b"POST /api/lease/renew "


class WireProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.answer_delay = 0.0
        self.renewals_forwarded: list[float] = []  # wall time each renewal request was passed on
        self.cut = threading.Event()
        self._cut_armed = False
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._sockets: list[socket.socket] = [self._listener]
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def start(self) -> "WireProxy":
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def cut_after_next_renewal_answer(self) -> None:
        """Cut the path the moment the answer to the next renewal has been delivered: the worker
        believes that renewal, and no later request reaches the commander."""
        with self._lock:
            self._cut_armed = True

    def stop(self) -> None:
        self._stopped.set()
        self.cut.set()
        for sock in self._sockets:
            sock.close()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            self._sockets += [client, server]
            connection = {"renewal": False}  # is the request in flight on it a renewal?
            threading.Thread(target=self._requests, args=(client, server, connection), daemon=True).start()
            threading.Thread(target=self._answers, args=(server, client, connection), daemon=True).start()

    def _requests(self, client: socket.socket, server: socket.socket, connection: dict) -> None:
        while True:
            try:
                chunk = client.recv(65536)
            except OSError:
                return
            if not chunk or self.cut.is_set():
                return
            if chunk.startswith((b"POST ", b"GET ", b"HEAD ")):  # a request begins (keep-alive: one at a time)
                connection["renewal"] = chunk.startswith(RENEWAL)
                if connection["renewal"]:
                    self.renewals_forwarded.append(time.time())
            try:
                server.sendall(chunk)
            except OSError:
                return

    def _answers(self, server: socket.socket, client: socket.socket, connection: dict) -> None:
        """Passes the commander's bytes on `answer_delay` seconds after they arrived, in order."""
        due: list[tuple[float, int, bytes]] = []
        arrived = threading.Condition()
        order = 0
        done = threading.Event()

        def deliver() -> None:
            while True:
                with arrived:
                    arrived.wait_for(lambda: due or done.is_set())
                    if not due:
                        return
                    at, _, chunk = due[0]
                    wait = at - time.time()
                    if wait > 0:
                        arrived.wait(wait)
                        continue
                    heapq.heappop(due)
                if self.cut.is_set():
                    return
                try:
                    client.sendall(chunk)
                except OSError:
                    return
                with self._lock:
                    if self._cut_armed and connection["renewal"]:
                        self._cut_armed = False
                        self.cut.set()

        threading.Thread(target=deliver, daemon=True).start()
        while True:
            try:
                chunk = server.recv(65536)
            except OSError:
                chunk = b""
            with arrived:
                if not chunk:
                    done.set()
                    arrived.notify_all()
                    return
                order += 1
                heapq.heappush(due, (time.time() + self.answer_delay, order, chunk))
                arrived.notify_all()
