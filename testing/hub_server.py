"""A small Hugging Face Hub server on loopback for tests: the HTTP API huggingface_hub speaks.

Model repos only, regular (non-LFS, non-Xet) uploads, commits kept in memory as full
snapshots.  Faults can be injected (status codes, Retry-After, stalls) and every request is
logged, so tests can prove what the real client did.  Downloads can be held to a pod's rate
(`download_bytes_per_second`, shared by all connections) for benchmarks.

    hub = HubServer(token="hf_test"); hub.start(); ... hub.stop()
    env: HF_ENDPOINT=hub.url (set before huggingface_hub is imported), HF_TOKEN=hub.token
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    files: dict[str, bytes]
    date: float = field(default_factory=time.time)


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)


@dataclass
class Fault:
    """Answer `status` (or stall `delay` seconds) to the next `count` requests whose path contains `where`."""

    where: str
    status: int = 500
    count: int = 1
    retry_after: int | None = None
    delay: float = 0.0


class HubServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, token: str = "hf_testtoken0123456789") -> None:
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str, int]] = []
        self.lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._counter = 0
        self.download_bytes_per_second = 0.0  # 0: as fast as loopback goes
        self._paced_until = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> "HubServer":
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)  # a client giving up on a stall is no error

    def inject(self, fault: Fault) -> None:
        with self.lock:
            self.faults.append(fault)

    def take_fault(self, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.where in path and fault.count > 0:
                    fault.count -= 1
                    return fault
        return None

    def pace(self, size: int) -> None:
        """Wait until `size` more downloaded bytes fit in the rate, across all connections."""
        with self.lock:
            now = time.monotonic()
            self._paced_until = max(self._paced_until, now) + size / self.download_bytes_per_second
            ready = self._paced_until
        time.sleep(max(0.0, ready - now))

    def new_oid(self, seed: str) -> str:
        with self.lock:
            self._counter += 1
            return hashlib.sha1(f"{seed}-{self._counter}-{time.time()}".encode()).hexdigest()

    # -- helpers for tests -------------------------------------------------------------------

    def files_at(self, repo_id: str, revision: str) -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.branches.get(revision, revision)].files

    def head(self, repo_id: str, branch: str = "main") -> str:
        return self.repos[repo_id].branches[branch]


class HubHandler(http.server.BaseHTTPRequestHandler):
    server: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    # -- plumbing ----------------------------------------------------------------------------

    def reply(self, status: int, payload: object = None, headers: dict[str, str] | None = None,
              raw: bytes | None = None) -> None:
        data = raw if raw is not None else json.dumps(payload if payload is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        if raw is None or not self.server.download_bytes_per_second:
            self.wfile.write(data)
            return
        for start in range(0, len(data), 1 << 20):
            chunk = data[start:start + (1 << 20)]
            self.server.pace(len(chunk))
            self.wfile.write(chunk)

    def error(self, status: int, message: str, code: str = "") -> None:
        self.reply(status, {"error": message}, {"X-Error-Code": code} if code else {})

    def body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def authorized(self) -> bool:
        return self.headers.get("Authorization", "") == f"Bearer {self.server.token}"

    def do_GET(self) -> None:
        self.route()

    def do_HEAD(self) -> None:
        self.route()

    def do_POST(self) -> None:
        self.route()

    def route(self) -> None:
        parts = urllib.parse.urlsplit(self.path)
        path, query = parts.path, urllib.parse.parse_qs(parts.query)
        body = self.body() if self.command == "POST" else b""
        fault = self.server.take_fault(path)
        status = 0
        try:
            if fault is not None and fault.delay:
                time.sleep(fault.delay)
            if fault is not None and fault.status:
                headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
                status = fault.status
                return self.reply(fault.status, {"error": f"injected {fault.status}"}, headers)
            if not self.authorized():
                status = 401
                return self.error(401, "Invalid credentials in Authorization header")
            status = self.dispatch(path, query, body)
        finally:
            with self.server.lock:
                self.server.requests.append((self.command, path, status))

    def dispatch(self, path: str, query: dict, body: bytes) -> int:
        if path == "/api/whoami-v2":
            self.reply(200, {"type": "user", "name": "tester", "auth": {"accessToken": {"role": "write"}}})
            return 200
        if path == "/api/repos/create" and self.command == "POST":
            return self.create_repo(json.loads(body))
        if path.startswith("/api/models/"):
            return self.api(path[len("/api/models/"):], query, body)
        segments = path.strip("/").split("/")
        if len(segments) >= 5 and segments[2] == "resolve":
            repo_id = "/".join(segments[:2])
            revision = urllib.parse.unquote(segments[3])
            return self.download(repo_id, revision, "/".join(segments[4:]))
        self.error(404, f"no route {path}")
        return 404

    # -- endpoints ---------------------------------------------------------------------------

    def create_repo(self, payload: dict) -> int:
        repo_id = f"{payload.get('organization') or 'tester'}/{payload['name']}"
        url = f"{self.server.url}/{repo_id}"
        with self.server.lock:
            if repo_id in self.server.repos:
                self.reply(409, {"error": "You already created this model repo", "url": url})
                return 409
            repo = self.server.repos[repo_id] = Repo(repo_id, bool(payload.get("private", True)))
        oid = self.server.new_oid(repo_id)
        repo.commits[oid] = Commit(oid, None, "initial commit", {})
        repo.branches["main"] = oid
        self.reply(200, {"url": url})
        return 200

    def resolve(self, repo_id: str, revision: str) -> tuple[Repo, Commit] | None:
        repo = self.server.repos.get(repo_id)
        if repo is None:
            self.error(404, f"Repository {repo_id} not found", "RepoNotFound")
            return None
        oid = repo.branches.get(revision, revision)
        if oid not in repo.commits:
            self.error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return None
        return repo, repo.commits[oid]

    def api(self, rest: str, query: dict, body: bytes) -> int:
        segments = rest.split("/")
        repo_id = "/".join(segments[:2])
        action = segments[2] if len(segments) > 2 else ""
        revision = urllib.parse.unquote(segments[3]) if len(segments) > 3 else "main"
        found = self.resolve(repo_id, revision)
        if found is None:
            return 404
        repo, commit = found
        if action in ("", "revision"):
            siblings = [{"rfilename": p} for p in sorted(commit.files)]
            self.reply(200, {"id": repo_id, "sha": commit.oid, "private": repo.private, "siblings": siblings})
            return 200
        if action == "preupload":
            files = json.loads(body)["files"]
            self.reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                                       for f in files]})
            return 200
        if action == "commit":
            return self.commit(repo, revision, body)
        if action == "tree":
            prefix = "/".join(urllib.parse.unquote(s) for s in segments[4:])
            return self.tree(commit, prefix, query.get("recursive", ["false"])[0].lower() == "true")
        if action == "commits":
            chain, oid = [], commit.oid
            while oid:
                c = repo.commits[oid]
                chain.append({"id": c.oid, "title": c.title, "message": c.title, "authors": [],
                              "date": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(c.date))})
                oid = c.parent
            self.reply(200, chain)
            return 200
        if action == "refs":
            self.reply(200, {"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": o}
                                          for b, o in repo.branches.items()], "converts": [], "tags": []})
            return 200
        self.error(404, f"unknown action {action}")
        return 404

    def commit(self, repo: Repo, branch: str, body: bytes) -> int:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = lines[0]["value"]
        with self.server.lock:
            head = repo.branches[branch]
            parent = header.get("parentCommit")
            if parent and parent != head:
                self.error(412, "A commit has happened since. Please refresh and try again.")
                return 412
            files = dict(repo.commits[head].files)
            for item in lines[1:]:
                value = item["value"]
                if item["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "deletedFile":
                    files.pop(value["path"], None)
                elif item["key"] == "deletedFolder":
                    files = {p: b for p, b in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            oid = hashlib.sha1(f"{head}-{header['summary']}-{time.time()}-{len(repo.commits)}".encode()).hexdigest()
            repo.commits[oid] = Commit(oid, head, header["summary"], files)
            repo.branches[branch] = oid
        self.reply(200, {"commitOid": oid, "commitUrl": f"{self.server.url}/{repo.repo_id}/commit/{oid}"})
        return 200

    def tree(self, commit: Commit, prefix: str, recursive: bool) -> int:
        base = prefix.rstrip("/") + "/" if prefix else ""
        entries, folders = [], set()
        for path, data in sorted(commit.files.items()):
            if not path.startswith(base):
                continue
            rest = path[len(base):]
            if "/" in rest:
                parts = rest.split("/")
                for depth in range(1, len(parts) if recursive else 2):
                    folders.add(base + "/".join(parts[:depth]))
                if not recursive:
                    continue
            entries.append({"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()})
        entries += [{"type": "directory", "path": f, "oid": "0" * 40} for f in sorted(folders)]
        self.reply(200, entries)
        return 200

    def download(self, repo_id: str, revision: str, path: str) -> int:
        found = self.resolve(repo_id, revision)
        if found is None:
            return 404
        _, commit = found
        data = commit.files.get(urllib.parse.unquote(path))
        if data is None:
            self.error(404, f"Entry not found: {path}", "EntryNotFound")
            return 404
        etag = f'"{hashlib.sha1(data).hexdigest()}"'
        self.reply(200, raw=data, headers={"X-Repo-Commit": commit.oid, "ETag": etag})
        return 200
