"""A small Hugging Face Hub server on loopback for tests: the HTTP API huggingface_hub speaks.

Follows what huggingface_hub 2.4 sends (hf_api.py create_commit / preupload_lfs_files /
list_lfs_files / permanently_delete_lfs_files / auth_check, _commit_api.py, lfs.py,
file_download.py, utils/_xet.py), what hf_xet 1.8 expects of a token route (its
`new_upload_commit` / `new_file_download_group` docstrings: JSON `{accessToken, exp, casUrl}`),
the MDB shard layout of the "Xet Protocol Specification" (hub-docs docs/xet: file info
section, 48-byte entries, metadata_ext holding the sha256) and the Hub's documented limits
(hub-docs storage-limits, rate-limits; ../shared/notes/hub.md).

Model repos only, commits kept in memory as full snapshots.  Files of `lfs_threshold` bytes
and more (10 MB, as on the Hub) are "lfs" in the preupload answer, and then take one of two
paths, as on the Hub:
- Xet (what huggingface_hub does whenever hf_xet is installed; 1.x first offers "xet" to the
  LFS batch API, which chooses it as the Hub does): the client asks
  `xet-write-token/{rev}` (the JSON body for hf_xet, the X-Xet-* headers for the Python side)
  and hf_xet uploads chunks, xorbs and a shard to the CAS the token names.  The CAS is
  hf_xet's own `local://` store in a folder of this server's (`cas_dir`); the shard it
  writes there maps each file's sha256 to its Xet hash, which is how the commit's `lfsFile`
  line (keyed by sha256) finds the file, as the Hub does from the shards uploaded to it.
  Downloads: resolve answers `X-Xet-Hash` and `Link: <xet-read-token/{commit}>; rel="xet-auth"`,
  the tree lists `xetHash`, and hf_xet reads the chunks from the same folder.  For fault
  tests `cas_url` hands out another CAS (testing.xet_cas: one that refuses or fails).
- plain LFS (HF_HUB_DISABLE_XET=1 in the client): the batch API (basic transfer), a PUT of
  the bytes to the href it got, then the same `lfsFile` line.
Like the Hub, a private repo's storage counts every LFS or Xet file and every regular blob
that history still references, and only permanently deleting LFS files (Xet files are listed
and deleted by the same calls) frees space.  Over `quota_bytes` a commit is refused with 403
"Private repository storage limit reached" (and so are an LFS batch request and a Xet write
token when the repo is already full).  Why the commit: under Xet that is where the Hub first
learns which files, of what size, a repo gains (the CAS sees deduplicated chunks, shared by
every repo, and the write token is handed out before any byte is known), so it is the one
place the Hub can enforce a repo's quota on the Xet path; a full repo's write token is
refused as well, so a client stuck over quota does not even send its chunks.  A folder holds at most `max_files_per_folder` files (400 past it).
A `read_token` may read but not write.  Faults can be injected (status codes, Retry-After,
RateLimit, stalls) and every request is logged, so tests can prove what the real client did.
Downloads can be held to a pod's rate (`download_bytes_per_second`, shared by all
connections) for benchmarks.

    hub = HubServer(token="hf_test"); hub.start(); ... hub.stop()
    env: HF_ENDPOINT=hub.url (set before huggingface_hub is imported), HF_TOKEN=hub.token
         (and HF_HUB_DISABLE_XET=1 for the plain LFS path)
"""

from __future__ import annotations

import base64
import collections
import fnmatch
import hashlib
import http.server
import json
import os
import re
import shutil
import struct
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field


LFS_THRESHOLD = 10 * 1000 * 1000  # the Hub stores files of 10 MB and more in LFS
STORAGE_LIMIT_ERROR = "Private repository storage limit reached"
XET_TOKEN_SECONDS = 3600  # a Xet access token's life (the client refreshes it 60 s before it ends)
SHARD_ENTRY_BYTES = 48  # every record of an MDB shard's file info section
SHARD_HEADER_BYTES = 48
SHARD_BOOKEND = b"\xff" * 32  # the file hash that closes the file info section
SHARD_HAS_VERIFICATION, SHARD_HAS_METADATA_EXT = 1 << 31, 1 << 30  # file_flags bits


@dataclass
class Blob:
    """A file in a commit: its bytes (regular) or only a pointer to an LFS object (content None)."""

    size: int
    sha256: str
    content: bytes | None = None


@dataclass
class LfsObject:
    """A file stored outside git: its bytes (the LFS path) or its Xet hash (its chunks are in the CAS)."""

    size: int
    filename: str = ""
    data: bytes | None = None
    xet_hash: str = ""
    pushed_at: float = field(default_factory=time.time)


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    files: dict[str, Blob]
    date: float = field(default_factory=time.time)


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    lfs: dict[str, LfsObject] = field(default_factory=dict)  # sha256 -> object, shared by all commits

    def storage_bytes(self) -> int:
        """What the Hub bills: every LFS object kept, every regular blob any commit holds."""
        regular = {b.sha256: b.size for c in self.commits.values() for b in c.files.values() if b.content is not None}
        return sum(regular.values()) + sum(o.size for o in self.lfs.values())


@dataclass
class Fault:
    """Answer `status` (or stall `delay` seconds) to the next `count` requests whose path contains `where`."""

    where: str
    status: int = 500
    count: int = 1
    retry_after: int | None = None
    rate_limit_reset: int | None = None  # the `t=` of a RateLimit header: seconds until the window resets
    delay: float = 0.0
    method: str = ""  # only requests of this method ("" any)
    after: bool = False  # serve the request first, then answer `status` (a commit made whose answer was lost)


def xet_hash_text(raw: bytes) -> str:
    """Xet's text form of a 32-byte hash: four little-endian u64s, each in 16 hex digits."""
    return "".join(raw[i:i + 8][::-1].hex() for i in range(0, 32, 8))


def shard_files(data: bytes) -> dict[str, tuple[str, int]]:
    """sha256 -> (Xet hash, size) of every file an MDB shard describes with its sha256.

    The file info section follows the 48-byte header: per file a header (file hash, flags,
    number of entries), its entries (xorb hash, flags, bytes, chunk range), as many
    verification entries if flagged, and one metadata_ext record (the sha256) if flagged;
    a file hash of all 0xff bytes closes the section."""
    found, offset = {}, SHARD_HEADER_BYTES
    while offset + SHARD_ENTRY_BYTES <= len(data) and data[offset:offset + 32] != SHARD_BOOKEND:
        file_hash = xet_hash_text(data[offset:offset + 32])
        flags, entries = struct.unpack_from("<II", data, offset + 32)
        size = sum(struct.unpack_from("<I", data, offset + SHARD_ENTRY_BYTES * (k + 1) + 36)[0] for k in range(entries))
        offset += SHARD_ENTRY_BYTES * (1 + entries)
        if flags & SHARD_HAS_VERIFICATION:
            offset += SHARD_ENTRY_BYTES * entries
        if flags & SHARD_HAS_METADATA_EXT:
            found[xet_hash_text(data[offset:offset + 32])] = (file_hash, size)
            offset += SHARD_ENTRY_BYTES
    return found


def git_blob_id(blob: Blob) -> str:
    """git's id for the file: of its bytes, or of its LFS pointer file."""
    data = blob.content if blob.content is not None else (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{blob.sha256}\nsize {blob.size}\n".encode())
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, token: str = "hf_testtoken0123456789", read_token: str = "hf_readonly0123456789",
                 lfs_threshold: int = LFS_THRESHOLD, quota_bytes: int | None = None,
                 max_files_per_folder: int = 10_000, cas_url: str = "") -> None:
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.cas_dir = tempfile.mkdtemp(prefix="hub-cas-")  # hf_xet's local:// CAS: chunks, xorbs, shards
        self.cas_url = cas_url or f"local://{self.cas_dir}"  # what a write token names (a faulty CAS for tests)
        # Paths stored in LFS/Xet whatever their size, as a repo's .gitattributes says (`*.bin filter=lfs ...`)
        self.lfs_patterns: tuple[str, ...] = ()
        self.xet_files: dict[str, tuple[str, int]] = {}  # sha256 -> (Xet hash, size), from the CAS's shards
        self._shards_read: set[str] = set()
        self.token, self.read_token = token, read_token
        self.lfs_threshold, self.quota_bytes, self.max_files_per_folder = lfs_threshold, quota_bytes, max_files_per_folder
        self.upload_secret = hashlib.sha1(f"{time.time()}".encode()).hexdigest()  # a presigned URL's signature
        self.repos: dict[str, Repo] = {}
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str, int]] = []
        self.preuploaded: collections.Counter[str] = collections.Counter()  # how often a file's upload was announced
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
        shutil.rmtree(self.cas_dir, ignore_errors=True)

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)  # a client giving up on a stall is no error

    def inject(self, fault: Fault) -> None:
        with self.lock:
            self.faults.append(fault)

    def take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.where in path and fault.count > 0 and fault.method in ("", method):
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

    def stored_in_lfs(self, path: str, size: int) -> bool:
        return size >= self.lfs_threshold or any(fnmatch.fnmatch(path, pattern) for pattern in self.lfs_patterns)

    def xet_file(self, sha256: str) -> tuple[str, int] | None:
        """The Xet hash and size of the file of this sha256 that a client uploaded to the CAS."""
        folder = os.path.join(self.cas_dir, "xet", "xorbs", "shards")
        with self.lock:
            for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
                if name.endswith(".mdb") and name not in self._shards_read:
                    with open(os.path.join(folder, name), "rb") as handle:
                        self.xet_files.update(shard_files(handle.read()))
                    self._shards_read.add(name)
            return self.xet_files.get(sha256)

    def xet_bytes(self, xet_hash: str, size: int) -> bytes:
        """A Xet file's bytes, read back from the local CAS by hf_xet itself."""
        import hf_xet  # noqa: PLC0415  (only Xet-stored files need it)

        with tempfile.TemporaryDirectory() as folder:
            target = os.path.join(folder, "file")
            session = hf_xet.XetSession()
            with session.new_file_download_group(endpoint=f"local://{self.cas_dir}", token="local",
                                                 token_expiry_unix_secs=int(time.time()) + XET_TOKEN_SECONDS) as group:
                group.start_download_file(hf_xet.XetFileInfo(xet_hash, size), target)
            with open(target, "rb") as handle:
                return handle.read()

    def object_bytes(self, obj: LfsObject | None) -> bytes | None:
        if obj is None:
            return None
        return obj.data if obj.data is not None else self.xet_bytes(obj.xet_hash, obj.size)

    # -- helpers for tests -------------------------------------------------------------------

    def files_at(self, repo_id: str, revision: str) -> dict[str, bytes]:
        """The files of a revision with their bytes (an LFS file whose object was deleted is left out)."""
        repo = self.repos[repo_id]
        files = {}
        for path, blob in repo.commits[repo.branches.get(revision, revision)].files.items():
            data = blob.content if blob.content is not None else self.object_bytes(repo.lfs.get(blob.sha256))
            if data is not None:
                files[path] = data
        return files

    def xet_paths_at(self, repo_id: str, revision: str) -> set[str]:
        """The files of a revision stored through Xet."""
        repo = self.repos[repo_id]
        return {p for p, b in repo.commits[repo.branches.get(revision, revision)].files.items()
                if b.content is None and getattr(repo.lfs.get(b.sha256), "xet_hash", "")}

    def lfs_paths_at(self, repo_id: str, revision: str) -> set[str]:
        repo = self.repos[repo_id]
        return {p for p, b in repo.commits[repo.branches.get(revision, revision)].files.items() if b.content is None}

    def head(self, repo_id: str, branch: str = "main") -> str:
        return self.repos[repo_id].branches[branch]

    def create(self, repo_id: str, private: bool = True) -> Repo:
        """A repo that exists before the run (as a user may have made it on the website)."""
        with self.lock:
            repo = self.repos[repo_id] = Repo(repo_id, private)
        oid = self.new_oid(repo_id)
        repo.commits[oid] = Commit(oid, None, "initial commit", {})
        repo.branches["main"] = oid
        return repo


class HubHandler(http.server.BaseHTTPRequestHandler):
    server: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    # -- plumbing ----------------------------------------------------------------------------

    swallow = False  # the real answer is lost (Fault.after): the fault's answer goes out instead

    def reply(self, status: int, payload: object = None, headers: dict[str, str] | None = None,
              raw: bytes | None = None) -> None:
        if self.swallow:
            return
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

    def error(self, status: int, message: str, code: str = "") -> int:
        self.reply(status, {"error": message}, {"X-Error-Code": code} if code else {})
        return status

    def body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                chunk = self.rfile.read(size + 2)[:size]  # each chunk ends with CRLF
                if size == 0:
                    break
                chunks.append(chunk)
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def role(self) -> str:
        """'write', 'read' or '' (no valid token)."""
        bearer = self.headers.get("Authorization", "")
        return {f"Bearer {self.server.token}": "write", f"Bearer {self.server.read_token}": "read"}.get(bearer, "")

    def do_GET(self) -> None:
        self.route()

    def do_HEAD(self) -> None:
        self.route()

    def do_POST(self) -> None:
        self.route()

    def do_PUT(self) -> None:
        self.route()

    def route(self) -> None:
        parts = urllib.parse.urlsplit(self.path)
        path, query = parts.path, urllib.parse.parse_qs(parts.query)
        body = self.body() if self.command in ("POST", "PUT") else b""
        fault = self.server.take_fault(self.command, path)
        status = 0
        try:
            if fault is not None and fault.delay:
                time.sleep(fault.delay)
            if fault is not None and fault.after:
                self.swallow = True
                self.dispatch(path, query, body, self.role())
                self.swallow = False
            if fault is not None and fault.status:
                headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
                if fault.rate_limit_reset is not None:
                    headers["RateLimit"] = f'"api";r=0;t={fault.rate_limit_reset}'
                status = fault.status
                return self.reply(fault.status, {"error": f"injected {fault.status}"}, headers)
            if path.startswith("/lfs-upload/"):  # a presigned storage URL: its signature is the credential
                status = self.lfs_put(path, body)
                return
            role = self.role()
            if not role:
                status = self.error(401, "Invalid credentials in Authorization header")
                return
            status = self.dispatch(path, query, body, role)
        finally:
            with self.server.lock:
                self.server.requests.append((self.command, path, status))

    def dispatch(self, path: str, query: dict, body: bytes, role: str) -> int:
        if path == "/api/whoami-v2":
            self.reply(200, {"type": "user", "name": "tester", "auth": {"accessToken": {"role": role}}})
            return 200
        if path == "/api/repos/create" and self.command == "POST":
            if role != "write":
                return self.error(403, "You don't have the rights to create a model under the namespace \"tester\"")
            return self.create_repo(json.loads(body))
        if path.startswith("/api/models/"):
            return self.api(path[len("/api/models/"):], query, body, role)
        if path.endswith(".git/info/lfs/objects/batch") and self.command == "POST":
            return self.lfs_batch(path[1:-len(".git/info/lfs/objects/batch")], json.loads(body), role)
        segments = path.strip("/").split("/")
        if len(segments) >= 5 and segments[2] == "resolve":
            repo_id = "/".join(segments[:2])
            revision = urllib.parse.unquote(segments[3])
            return self.download(repo_id, revision, "/".join(segments[4:]))
        return self.error(404, f"no route {path}")

    # -- endpoints ---------------------------------------------------------------------------

    def create_repo(self, payload: dict) -> int:
        repo_id = f"{payload.get('organization') or 'tester'}/{payload['name']}"
        url = f"{self.server.url}/{repo_id}"
        if repo_id in self.server.repos:
            self.reply(409, {"error": "You already created this model repo", "url": url})
            return 409
        private = payload.get("visibility", "private" if payload.get("private") else "public") != "public"
        self.server.create(repo_id, private)
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

    def api(self, rest: str, query: dict, body: bytes, role: str) -> int:
        segments = rest.split("/")
        repo_id = "/".join(segments[:2])
        action = segments[2] if len(segments) > 2 else ""
        if action in ("auth-check", "lfs-files"):  # repo-level actions: no revision in the path
            repo = self.server.repos.get(repo_id)
            if repo is None:
                return self.error(404, f"Repository {repo_id} not found", "RepoNotFound")
            if action == "auth-check":
                if segments[3:4] == ["write"] and role != "write":
                    return self.error(403, f"You don't have write access to {repo_id}")
                self.reply(200, {})
                return 200
            if segments[3:4] == ["batch"] and self.command == "POST":
                return self.delete_lfs(repo, json.loads(body)["deletions"], role)
            self.reply(200, [{"fileOid": sha, "oid": hashlib.sha1(sha.encode()).hexdigest(), "filename": o.filename,
                              "size": o.size, "ref": "main",
                              "pushedAt": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(o.pushed_at))}
                             for sha, o in sorted(repo.lfs.items())])
            return 200
        revision = urllib.parse.unquote(segments[3]) if len(segments) > 3 else "main"
        found = self.resolve(repo_id, revision)
        if found is None:
            return 404
        repo, commit = found
        if action in ("", "revision"):
            siblings = [{"rfilename": p} for p in sorted(commit.files)]
            self.reply(200, {"id": repo_id, "sha": commit.oid, "private": repo.private, "siblings": siblings})
            return 200
        if action in ("xet-write-token", "xet-read-token"):
            return self.xet_token(repo, action == "xet-write-token", role)
        if action == "preupload":
            if role != "write":
                return self.error(403, f"You don't have write access to {repo_id}")
            files = json.loads(body)["files"]
            with self.server.lock:
                self.server.preuploaded.update(f["path"] for f in files)
            self.reply(200, {"files": [{"path": f["path"], "shouldIgnore": False, "oid": None,
                                        "uploadMode": "lfs" if self.server.stored_in_lfs(f["path"], f["size"]) else "regular"}
                                       for f in files]})
            return 200
        if action == "commit":
            return self.commit(repo, revision, body, role)
        if action == "tree":
            prefix = "/".join(urllib.parse.unquote(s) for s in segments[4:])
            return self.tree(repo, commit, prefix, query.get("recursive", ["false"])[0].lower() == "true")
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
        return self.error(404, f"unknown action {action}")

    def over_quota(self, repo: Repo, more_bytes: int) -> bool:
        quota = self.server.quota_bytes
        return repo.private and quota is not None and repo.storage_bytes() + more_bytes > quota

    def full(self, repo: Repo) -> bool:
        quota = self.server.quota_bytes
        return repo.private and quota is not None and repo.storage_bytes() >= quota

    def xet_token(self, repo: Repo, write: bool, role: str) -> int:
        """A CAS access token: the JSON body hf_xet reads, the X-Xet-* headers huggingface_hub reads."""
        if write and role != "write":
            return self.error(403, f"You don't have write access to {repo.repo_id}")
        if write and self.full(repo):  # no byte of a new file can fit
            return self.error(403, STORAGE_LIMIT_ERROR)
        expires = int(time.time()) + XET_TOKEN_SECONDS
        cas_url = self.server.cas_url if write else f"local://{self.server.cas_dir}"
        token = f"xet-{'write' if write else 'read'}-{self.server.upload_secret}"
        self.reply(200, {"accessToken": token, "exp": expires, "casUrl": cas_url},
                   {"X-Xet-Cas-Url": cas_url, "X-Xet-Access-Token": token, "X-Xet-Token-Expiration": str(expires)})
        return 200

    def lfs_batch(self, repo_id: str, payload: dict, role: str) -> int:
        """The LFS batch API, basic transfer: an upload href for each object the Hub lacks."""
        repo = self.server.repos.get(repo_id)
        if repo is None:
            return self.error(404, f"Repository {repo_id} not found", "RepoNotFound")
        if role != "write" or payload.get("operation") != "upload":
            return self.error(403, f"You don't have write access to {repo_id}")
        if "xet" in payload.get("transfers", []):  # huggingface_hub 1.x offers Xet here: the Hub takes it
            if self.full(repo):
                return self.error(403, STORAGE_LIMIT_ERROR)
            self.reply(200, {"transfer": "xet", "hash_algo": "sha256",
                             "objects": [{"oid": o["oid"], "size": o["size"]} for o in payload["objects"]]})
            return 200
        missing = [o for o in payload["objects"] if o["oid"] not in repo.lfs]
        if self.over_quota(repo, sum(o["size"] for o in missing)):
            return self.error(403, STORAGE_LIMIT_ERROR)
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj in missing:
                href = f"{self.server.url}/lfs-upload/{repo_id}/{obj['oid']}?sig={self.server.upload_secret}"
                entry["actions"] = {"upload": {"href": href}}
            objects.append(entry)
        self.reply(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})
        return 200

    def lfs_put(self, path: str, body: bytes) -> int:
        if urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).get("sig") != [self.server.upload_secret]:
            return self.error(403, "bad signature")
        repo_id, oid = path[len("/lfs-upload/"):].rsplit("/", 1)
        if hashlib.sha256(body).hexdigest() != oid:
            return self.error(400, "the uploaded bytes do not match the object id")
        with self.server.lock:
            self.server.repos[repo_id].lfs.setdefault(oid, LfsObject(len(body), data=body))
        self.reply(200, {})
        return 200

    def delete_lfs(self, repo: Repo, deletions: dict, role: str) -> int:
        if role != "write":
            return self.error(403, f"You don't have write access to {repo.repo_id}")
        if deletions.get("rewriteHistory"):  # would give every commit a new SHA: never what a run wants
            return self.error(400, "this test server does not rewrite history")
        with self.server.lock:
            for sha in deletions["sha"]:
                repo.lfs.pop(sha, None)
        self.reply(200, {})
        return 200

    def commit(self, repo: Repo, branch: str, body: bytes, role: str) -> int:
        if role != "write":
            return self.error(403, f"You don't have write access to {repo.repo_id}")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = lines[0]["value"]
        uploaded_to_cas = {item["value"]["oid"]: self.server.xet_file(item["value"]["oid"])
                           for item in lines[1:] if item["key"] == "lfsFile"}
        with self.server.lock:
            head = repo.branches[branch]
            parent = header.get("parentCommit")
            if parent and parent != head:
                return self.error(412, "A commit has happened since. Please refresh and try again.")
            files = dict(repo.commits[head].files)
            new_bytes = 0
            new_xet_files: dict[str, LfsObject] = {}  # the repo's from this commit on
            for item in lines[1:]:
                value = item["value"]
                if item["key"] == "file":
                    data = base64.b64decode(value["content"])
                    files[value["path"]] = Blob(len(data), hashlib.sha256(data).hexdigest(), data)
                    new_bytes += len(data)
                elif item["key"] == "lfsFile":
                    lfs_object = repo.lfs.get(value["oid"]) or new_xet_files.get(value["oid"])
                    if lfs_object is None:  # not pushed through LFS: a file the client sent to the CAS?
                        xet = uploaded_to_cas.get(value["oid"])
                        if xet is None:
                            return self.error(400, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                        lfs_object = new_xet_files[value["oid"]] = LfsObject(xet[1], xet_hash=xet[0])
                        new_bytes += xet[1]
                    lfs_object.filename = lfs_object.filename or value["path"]
                    files[value["path"]] = Blob(lfs_object.size, value["oid"])
                elif item["key"] == "deletedFile":
                    files.pop(value["path"], None)
                elif item["key"] == "deletedFolder":
                    files = {p: b for p, b in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            if self.over_quota(repo, new_bytes):
                return self.error(403, STORAGE_LIMIT_ERROR)
            per_folder = collections.Counter(p.rpartition("/")[0] for p in files)
            crowded = [f for f, n in per_folder.items() if n > self.server.max_files_per_folder]
            if crowded:
                return self.error(400, f"Too many files in folder {crowded[0] or '/'}: at most "
                                       f"{self.server.max_files_per_folder} files per folder")
            repo.lfs.update(new_xet_files)
            oid = hashlib.sha1(f"{head}-{header['summary']}-{time.time()}-{len(repo.commits)}".encode()).hexdigest()
            repo.commits[oid] = Commit(oid, head, header["summary"], files)
            repo.branches[branch] = oid
        self.reply(200, {"commitOid": oid, "commitUrl": f"{self.server.url}/{repo.repo_id}/commit/{oid}"})
        return 200

    def tree(self, repo: Repo, commit: Commit, prefix: str, recursive: bool) -> int:
        base = prefix.rstrip("/") + "/" if prefix else ""
        entries, folders = [], set()
        for path, blob in sorted(commit.files.items()):
            if not path.startswith(base):
                continue
            rest = path[len(base):]
            if "/" in rest:
                parts = rest.split("/")
                for depth in range(1, len(parts) if recursive else 2):
                    folders.add(base + "/".join(parts[:depth]))
                if not recursive:
                    continue
            entry = {"type": "file", "path": path, "size": blob.size, "oid": git_blob_id(blob)}
            if blob.content is None:
                entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": 134}
                xet_hash = getattr(repo.lfs.get(blob.sha256), "xet_hash", "")
                if xet_hash:
                    entry["xetHash"] = xet_hash
            entries.append(entry)
        entries += [{"type": "directory", "path": f, "oid": "0" * 40} for f in sorted(folders)]
        if base and not entries:
            return self.error(404, f"Entry not found: {prefix}", "EntryNotFound")
        self.reply(200, entries)
        return 200

    def download(self, repo_id: str, revision: str, path: str) -> int:
        found = self.resolve(repo_id, revision)
        if found is None:
            return 404
        repo, commit = found
        blob = commit.files.get(urllib.parse.unquote(path))
        if blob is None:
            return self.error(404, f"Entry not found: {path}", "EntryNotFound")
        stored = repo.lfs.get(blob.sha256) if blob.content is None else None
        if blob.content is None and stored is None:  # its LFS object was permanently deleted
            return self.error(404, f"Entry not found: {path} (its LFS object was deleted)", "EntryNotFound")
        etag = f'"{blob.sha256 if blob.content is None else hashlib.sha1(blob.content).hexdigest()}"'
        headers = {"X-Repo-Commit": commit.oid, "ETag": etag, "Accept-Ranges": "bytes"}
        if stored is not None and stored.xet_hash:  # a Xet client fetches it from the CAS, with a read token
            token_route = f"{self.server.url}/api/models/{repo.repo_id}/xet-read-token/{commit.oid}"
            headers.update({"X-Xet-Hash": stored.xet_hash, "Link": f'<{token_route}>; rel="xet-auth"'})
        if self.command == "HEAD":
            self.reply(200, raw=b"", headers=dict(headers, **{"X-Linked-Size": str(blob.size)}))
            return 200
        data = blob.content if stored is None else self.server.object_bytes(stored)
        start = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if start and self.command == "GET":  # a resumed download asks for the rest only
            offset = int(start.group(1))
            headers["Content-Range"] = f"bytes {offset}-{len(data) - 1}/{len(data)}"
            self.reply(206, raw=data[offset:], headers=headers)
            return 206
        self.reply(200, raw=data, headers=headers)
        return 200
