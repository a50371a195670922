"""A local stand-in of the Lium REST API for tests, driven by the REAL `lium` CLI (lium.io 0.32.0).

Built from the CLI's own source (site-packages/lium: sdk/client.py `Lium.ps/_rent/wait_ready/down/
get_executor/get_template/_ensure_ssh_keys_registered`, cli/up/command.py, cli/rm/command.py,
cli/commands/exec.py) and ../shared/notes/lium.md: the endpoints it calls, the shapes it parses, the
statuses it knows (PENDING, STARTING, RUNNING, BROKEN ...).  The CLI reaches it through
LIUM_BASE_URL; any X-API-KEY is accepted.

A pod is a sandbox on this machine reached over REAL SSH: one Debian sshd per pod on a loopback
port (its own config: `UsePAM no`, `StrictModes no`, the keys the rent sent authorized), whose
ForceCommand puts every session (shell and SFTP alike) in a private mount namespace
(`unshare --mount`) where the pod's own folders are bind-mounted over /root, /workspace and /tmp,
and its volume over /mnt.  Bind mounts in a mount namespace need root, which the tests run as;
they were chosen over rewriting paths because the CLI, the worker and the shell then see exactly
the paths a real pod has, with nothing to translate.  Host paths the pod's "image" must show
at their own paths although the pod has its own /root and /tmp (the Python the tests run: under
/root/.pyenv here, or a venv under /tmp or in a checkout under /root) are bound back in.

Every process a pod runs carries LIUM_TEST_POD_ID=<id> (and the test's RELAY_TEST_MARK) in its
environment, so a preemption or a removal kills all of them, and the test's teardown too.

    api = LiumApi(folder, mark).start(); env LIUM_BASE_URL=api.url ...; api.stop()

A removal scheduled through the API (`up --ttl`, `up --budget`) happens when its time comes.

Capacity and money are booked as Lium books them (lium.io 0.32.0 source, site-packages/lium):
- Several nodes (executors) of 8 GPUs each, with ids of their own (the CLI derives each one's HUID).
  `GET /executors` shows each node's `available_gpu_count`: 8 less the GPUs of the pods on it.
  A rent without `gpu_count` takes the node's free GPUs (sdk/client.py:1318-1321 "None takes every
  GPU that is free on the node right now"; cli/up/actions.py:361-371 `rented_gpu_count`); the API
  refuses a count above the free GPUs (sdk/client.py:1320) - here a 409, which the SDK makes a
  plain LiumError (sdk/client.py:971).  The CLI itself refuses `up NODE` on a node with no GPU free
  before renting (cli/up/command.py:586-590: code `no_free_gpus`, exit 1), and `up --gpu X -c N`
  (no `rent_by_spec` feature) rents row 1 of the nodes with exactly N GPUs free, cheapest first
  (cli/up/actions.py:97-146), so it never picks a full node.
- A preempted pod's host is lost: its node is not offered (absent from `GET /executors`, a rent
  on it 404s as for an unknown node) for `host_lost_seconds`.  The pods on a node keep its GPUs
  until they are removed (a BROKEN pod too).
- The account's balance (`GET /users/me` `balance`, read by `Lium.balance()`, sdk/client.py:5715-5724)
  falls by each pod's price for the time it has lived (billed per second).  A rent is refused when
  the balance is not more than 15 minutes of this pod's price plus 15 minutes of each open pod's
  (sdk/client.py:3229-3231 `rent_balance_required_usd`), with a 403 whose `error.code` is
  `insufficient_balance` and the platform's sentence (sdk/client.py:334-338, 416-447): the CLI
  shows it as code `insufficient_balance`, exit 6 (cli/utils.py:537-538).  `budget_exhausted` is
  the CLI's own code for an `up --budget` pod that started after its budget ran out
  (cli/up/command.py:877-891): no API answer produces it, the CLI does.

Clusters (lium.io 0.32.0: cli/clusters/command.py, cli/clusters/display.py, sdk/client.py:2680-3040,
sdk/models.py:271-364; ../shared/notes/lium.md "Clusters"):
- `GET /executors/infiniband-clusters` lists FABRICS (sdk/client.py:2685-2704): an InfiniBand fabric
  of three 8×H200 nodes and a RoCE fabric of two 8×H100 nodes, each with its `nodes` = the executor
  rows of its nodes that are free right now (whole: no pod on them, host not lost).  Fabric nodes are
  separate from the four single nodes: they are not in `GET /executors` and a pod rent on one 404s,
  so the single-pod tests' capacity is what it was and a cluster never competes with them.
- `GET /templates` also lists the cluster template (image `daturaai/lium-cluster`, the prefix
  sdk/client.py:2683 CLUSTER_IMAGE_PREFIX; `cluster_template` picks the newest tag, :2715-2724).
- `POST /executors/cluster/rent` takes the SDK's body (sdk/client.py:2778-2786: pod_name, template_id,
  executor_uuids, user_public_key, initial_port_count, enable_volume_encryption, enable_backups) and
  answers `{"success": true, "pod_ids": [...]}`; a group it will not rent (a template whose image
  lacks the prefix, nodes not all free or not on one fabric, fewer than 2) is `{"success": false,
  "message": ...}` (sdk/client.py:2819-2821, "mixed fabrics, split hosts, wrong image" :2763), a
  balance too low for 15 minutes of every member the 403 `insufficient_balance` of a pod rent.  The
  `Idempotency-Key` header is honoured: an order repeated with a key already seen replays the first
  answer and rents nothing (the SDK resends with the same key only when GET /version advertises
  `rent_idempotency`, sdk/client.py:108-110, 2797-2817; `features` below).
- Members are pods: rows of `GET /pods` with `cluster_id`, `cluster_node_index` (the order of
  executor_uuids) and `cluster_overlay_ip` (sdk/client.py:2493-2495), each billed as a whole node,
  each an SSH sandbox like any pod (own sshd, /root, /workspace, /tmp).  A member's overlay address
  is 127.X.Y.<n>, X.Y being this API's own port and n counting its members: a loopback address (127/8
  is all loopback on Linux, bindable without setup) that no other member and no other LiumApi alive
  on this machine hands out, so parallel tests never collide.  (On Lium member k is 10.42.0.<k+1>
  on an overlay private to its cluster; here every cluster shares loopback.)  Nothing in the sandbox tells a member its rank or address: only
  the rows do.  Loopback is not an overlay: any member could bind another's address; tests must
  bind only the one the rows give.
- `POST /pods/{id}/schedule-removal` per member (`clusters up --ttl`, cli/clusters/command.py:216-250).
- `DELETE /clusters/{id}` removes every member and answers `{"pods": [{pod_id, pod_name,
  cluster_node_index, success, message}]}` (sdk/client.py:2995-3040); 404 when no pod carries the id,
  409 when a member is still being created and `cancel_inflight_creates` is off.
- A cluster's status is the first member not RUNNING (sdk/models.py:339-345); `clusters up --wait`
  polls every 10 s (sdk/client.py:2945 poll_interval) and stops at a member in a terminal status
  (CREATION_FAILED, BROKEN ..., sdk/client.py:4386-4403).  With `boot_seconds` 0 a cluster's members
  are RUNNING when the rent answers, so `up` returns at its first poll; otherwise they boot as pods do.

Controls for tests: `api_key` (the only key accepted, when set), `price_per_gpu`, `balance_usd`
(the starting balance), `host_lost_seconds`, `boot_seconds` (STARTING that long), `preempt(pod, remove)`,
`rent_outcome_unknown` (the next rent answers without a pod id and its pod shows up later),
`sshd_never_starts` (RUNNING pods whose SSH never answers),
`add_foreign_pod(name)` (a pod rented by someone else through the same account),
`cluster_rent_outcome` for the next cluster rent: "lost" (the cluster is rented but the answer is a
502 and its members stay unlisted for `hide_seconds`: `clusters up` says `cluster_rent_uncertain`),
"unlisted" (the answer names the members, which stay unlisted for `hide_seconds`:
`cluster_rented_not_listed`), "member_fails" (the last member ends CREATION_FAILED instead of
booting: `cluster_member_failed`); `features` (GET /version), `cancel_inflight_creates`,
`members(cluster_id)`; `preempt(member, remove)` works on a member as on any pod.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from testing.harness import free_port

SSHD = "/usr/sbin/sshd"
CHECKOUT = str(Path(__file__).resolve().parent.parent)
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
TEMPLATE_ID = "6f1c3b8e-2a45-4c1e-9a57-0d3e5b7c9f11"
EXECUTOR_ID = "3d7e9a10-5b2c-4f8e-8c41-7a6b2e9d0c55"  # the first of the 8×H200 nodes
NODE_IDS = (EXECUTOR_ID, "5a1f0c92-7d3e-4b6a-9e18-c2b4d6f8a0e3", "9c2e4a61-0f5b-4d7c-8a39-e1f3b5d7c9a2",
            "b7d1f3a5-2c4e-4f6a-8b0d-1e3f5a7c9b2d")
GPUS_PER_NODE = 8
CLUSTER_TEMPLATE_ID = "e2b4c6d8-1f3a-4b5c-9d7e-8f0a1b2c3d4e"
CLUSTER_IMAGE = "daturaai/lium-cluster"  # sdk/client.py:2683 CLUSTER_IMAGE_PREFIX


@dataclass(frozen=True)
class Fabric:
    id: str
    type: str  # infiniband | roce
    link_rate: str
    gpu: str  # the nodes' machine_name
    nodes: tuple[str, ...]


FABRICS = (
    Fabric("ib-7f3c21a0-h200", "infiniband", "400 Gb/sec (4X NDR)", "NVIDIA H200",
           ("c1a2b3c4-0001-4d5e-8f90-a1b2c3d4e5f6", "c1a2b3c4-0002-4d5e-8f90-a1b2c3d4e5f6",
            "c1a2b3c4-0003-4d5e-8f90-a1b2c3d4e5f6")),
    Fabric("roce-2b9e6d14-h100", "roce", "200 Gb/sec", "NVIDIA H100",
           ("d2b3c4d5-0001-4e6f-9a01-b2c3d4e5f6a7", "d2b3c4d5-0002-4e6f-9a01-b2c3d4e5f6a7")),
)
BALANCE_FLOOR_HOURS = 0.25  # 15 minutes of each pod's price (sdk/client.py:3229-3231)
SANDBOX_DIRS = ("/root", "/workspace", "/tmp")


def python_folders_in_sandbox_dirs(python: str) -> tuple[str, ...]:
    """The folders `python` needs (its prefix, the base interpreter's, the user site when used)
    that lie where a pod has folders of its own."""
    asked = subprocess.run([python, "-c", "import site, sys; print(sys.prefix); print(sys.base_prefix); "
                            "print(site.USER_SITE if site.ENABLE_USER_SITE and site.USER_SITE in sys.path else '')"],
                           capture_output=True, text=True, check=True, timeout=60).stdout.split("\n")
    interpreter = os.path.dirname(os.path.dirname(os.path.realpath(python)))  # what a venv's bin/python links to
    folders = {os.path.realpath(p) for p in [*asked, interpreter] if p.strip()}
    return tuple(sorted(p for p in folders if any(p.startswith(d + "/") for d in SANDBOX_DIRS)))


def sandbox_dir_of(path: str) -> str:
    return next(d for d in SANDBOX_DIRS if path.startswith(d + "/"))


def utc_iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, timezone.utc).isoformat()


@dataclass
class Pod:
    id: str
    name: str
    volume_id: str | None
    keys: list[str]
    gpu_count: int
    price: float  # $/h of the whole rental
    folder: Path
    node_id: str = EXECUTOR_ID
    created: float = field(default_factory=time.time)
    ended: float = 0.0  # when it stopped billing (removed); 0 while it bills
    ready_at: float = 0.0
    visible_at: float = 0.0  # a rent whose answer was lost: listed only from then on
    status: str = "PENDING"
    port: int = 0
    sshd: subprocess.Popen | None = None
    removal_scheduled_at: str | None = None
    cluster_id: str = ""  # a member of that cluster
    cluster_node_index: int = 0
    cluster_overlay_ip: str = ""
    fails_to_boot: bool = False  # ends CREATION_FAILED instead of RUNNING

    def row(self, api: LiumApi) -> dict:
        """A row of GET /pods, as Lium.ps() parses it."""
        row = {"id": self.id, "pod_name": self.name, "status": self.status, "created_at": utc_iso(self.created),
               "updated_at": utc_iso(time.time()), "price": self.price, "gpu_count": self.gpu_count,
               "ssh_connect_cmd": f"ssh {api.user}@127.0.0.1 -p {self.port}" if self.status == "RUNNING" else None,
               "ports_mapping": {"22": self.port} if self.port else {},
               "template": api.cluster_template() if self.cluster_id else api.template(),
               "executor": api.executor(self.node_id), "removal_scheduled_at": self.removal_scheduled_at}
        if self.cluster_id:
            row.update(cluster_id=self.cluster_id, cluster_node_index=self.cluster_node_index,
                       cluster_overlay_ip=self.cluster_overlay_ip)
        return row

    def spent(self) -> float:
        """What it has cost: its price for the time it billed."""
        return self.price * ((self.ended or time.time()) - self.created) / 3600


class LiumApi(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, folder: Path, mark: str = "", python: str = sys.executable) -> None:
        super().__init__(("127.0.0.1", 0), LiumHandler)
        self.folder = folder
        self.mark = mark
        # Host folders the pod's image must show at their own paths although a pod has its own
        # /root, /tmp and /workspace: the Python the worker runs (a venv and the interpreter it
        # was made from), and this checkout (the stand-ins a test's trainer command runs, such as
        # testing/fake_slime_ray.py and testing/bin/nvidia-smi, as an image would have them),
        # wherever the tests run from (CI clones into /tmp).
        checkout = [CHECKOUT] if any(CHECKOUT.startswith(d + "/") for d in SANDBOX_DIRS) else []
        self.image_paths = tuple(sorted({*python_folders_in_sandbox_dirs(python), *checkout}))
        # folders the pod's image has at a path of its own (pod path -> host folder), e.g. the
        # image's /opt/relay; the host folder may lie anywhere, /tmp included
        self.image_dirs: dict[str, Path] = {}
        self.user = "root" if os.geteuid() == 0 else os.environ.get("USER", "root")
        self.price_per_gpu = 2.5
        self.balance_usd = 10000.0  # the account's balance before any pod billed
        self.host_lost_seconds = 5.0  # a preempted pod's node is not offered for that long
        self.lost_until: dict[str, float] = {}  # node id -> until when its host is lost
        self.api_key = ""  # when set, the only X-API-KEY accepted (else any)
        self.boot_seconds = 0.0
        self.rent_outcome_unknown = False
        self.sshd_never_starts = False  # pods go RUNNING but nothing answers on their SSH port
        self.hide_seconds = 8.0  # how long a rent with a lost answer stays unlisted (> the CLI's 3 × 3 s cluster lookup)
        self.cluster_rent_outcome = ""  # the next cluster rent's: "", "lost", "unlisted", "member_fails"
        self.cancel_inflight_creates = True  # DELETE /clusters/{id} removes members still being created
        self.features: list[str] = []  # GET /version; no rent_by_spec: --gpu picks from GET /executors
        self.rent_answers: dict[str, dict] = {}  # Idempotency-Key -> the cluster rent's answer
        self.overlay_members = 0  # members given an overlay address so far
        self.pods: dict[str, Pod] = {}
        self.removed: list[Pod] = []  # their folders stay, for tests to look at
        self.ssh_keys: list[dict] = []
        self.volumes = [{"id": "8a4c2e6f-1b3d-4f5a-9c7e-2d4f6a8b0c1e", "name": "relay-checkpoints"}]
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.RLock()
        self.host_key = folder / "ssh_host_ed25519_key"
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.host_key)], check=True)
        self._thread: threading.Thread | None = None
        self._booter: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def volume_huid(self) -> str:
        from lium.sdk.utils import generate_huid  # the CLI's own HUIDs: `--volume id:HUID` is matched with them

        return generate_huid(self.volumes[0]["id"])

    def volume_folder(self) -> Path:
        """What a pod with the volume sees at /mnt."""
        return self.folder / "volumes" / self.volumes[0]["id"]

    def ours(self, name: str, foreign: tuple[str, ...] = ()) -> Pod | None:
        """The pod of that name (listed, else removed), other than the `foreign` ids."""
        return next((p for p in [*self.pods.values(), *self.removed] if p.name == name and p.id not in foreign), None)

    def home(self, name: str) -> Path:
        """The pod's /root, as this machine sees it."""
        pod = self.ours(name)
        return pod.folder / "root" if pod else self.folder / "no-such-pod"

    def mnt(self, pod: Pod) -> Path:
        """What the pod sees at /mnt: its volume, or its own disk when it has none."""
        return self.folder / "volumes" / (pod.volume_id or f"none-{pod.id}")

    def start(self) -> LiumApi:
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        self._booter = threading.Thread(target=self._boot_pods, daemon=True)
        self._booter.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self.shutdown()
        self.server_close()
        for pod in list(self.pods.values()):
            self._kill(pod)

    # -- what the API answers -------------------------------------------------------------

    def free_gpus(self, node_id: str) -> int:
        with self.lock:
            return GPUS_PER_NODE - sum(p.gpu_count for p in self.pods.values() if p.node_id == node_id)

    def offered(self) -> list[str]:
        """The nodes `GET /executors` lists: all but those whose host is lost."""
        now = time.time()
        return [node for node in NODE_IDS if self.lost_until.get(node, 0) <= now]

    def executor(self, node_id: str = EXECUTOR_ID) -> dict:
        gpu = next((f.gpu for f in FABRICS if node_id in f.nodes), "NVIDIA H200")
        return {"id": node_id, "machine_name": gpu, "price_per_gpu": self.price_per_gpu,
                "gpu_count": GPUS_PER_NODE, "available_gpu_count": self.free_gpus(node_id), "location": {"country": "US"},
                "executor_ip_address": "127.0.0.1", "status": "available",
                "specs": {"gpu": {"count": GPUS_PER_NODE, "details": [{"name": gpu}] * GPUS_PER_NODE}}}

    def fabric_offers(self) -> list[dict]:
        """GET /executors/infiniband-clusters: each fabric with its nodes free right now (whole, host not lost)."""
        now = time.time()
        with self.lock:
            return [{"fabric_id": f.id, "fabric_type": f.type, "link_rate": f.link_rate, "fabric_measured": True,
                     "node_count": len(f.nodes),
                     "nodes": [self.executor(n) for n in f.nodes
                               if self.free_gpus(n) == GPUS_PER_NODE and self.lost_until.get(n, 0) <= now]}
                    for f in FABRICS]

    def overlay_ip(self) -> str:
        """A new member's overlay address: 127.X.Y.<n>, X.Y this API's port, which no other live LiumApi
        has, n counting the members it rented (Lium's overlay is private to a cluster and numbers its
        members from 10.42.0.1; loopback is shared by every cluster here, so no two members share one)."""
        port = self.server_address[1]
        self.overlay_members += 1
        assert self.overlay_members < 255, "a LiumApi hands out 254 overlay addresses"
        return f"127.{port >> 8}.{port & 0xFF}.{self.overlay_members}"

    def balance(self) -> float:
        """The balance now: the starting one less what every pod (removed ones too) has cost."""
        with self.lock:
            return round(self.balance_usd - sum(p.spent() for p in [*self.pods.values(), *self.removed]), 4)

    def template(self) -> dict:
        return {"id": TEMPLATE_ID, "name": "relay-trainer", "docker_image": "relay-trainer", "docker_image_tag": "test",
                "category": "general", "status": "VERIFY_SUCCESS", "supports_volume_encryption": False,
                "volumes": ["/mnt"]}

    def cluster_template(self) -> dict:
        return {"id": CLUSTER_TEMPLATE_ID, "name": "Lium cluster", "docker_image": CLUSTER_IMAGE,
                "docker_image_tag": "1.2.0", "category": "general", "status": "VERIFY_SUCCESS",
                "supports_volume_encryption": False, "volumes": []}

    def listed(self) -> list[dict]:
        now = time.time()
        with self.lock:
            return [pod.row(self) for pod in self.pods.values() if pod.visible_at <= now]

    def rent(self, body: dict, node_id: str | None = None) -> dict:
        """POST /executors/{node_id}/rent; without a node (tests renting directly), the first offered
        node with the GPUs asked free."""
        volume = body.get("volume_id")
        with self.lock:
            if node_id is None:
                node_id = next((n for n in self.offered() if self.free_gpus(n) >= int(body.get("gpu_count") or 1)), "")
            if node_id not in self.offered():  # unknown, or its host is lost: not offered
                raise ApiError(404, f"executor {node_id} not found")
            free = self.free_gpus(node_id)
            gpu_count = int(body.get("gpu_count") or free)  # no count: the node's free GPUs
            if gpu_count < 1 or gpu_count > free:
                raise ApiError(409, f"executor {node_id} has {free} of {GPUS_PER_NODE} GPUs free; {gpu_count} asked")
            price = round(self.price_per_gpu * gpu_count, 4)
            required = BALANCE_FLOOR_HOURS * (price + sum(p.price for p in self.pods.values()))
            balance = self.balance()
            if balance <= required:
                raise ApiError(403, f"Insufficient balance. This node costs ${price:.2f}/hour, so renting it requires at "
                                    f"least ${required:.2f} ({BALANCE_FLOOR_HOURS * 60:.0f} minutes of runtime). "
                                    f"Your balance is ${balance:.2f}.", "insufficient_balance")
            holder = next((p for p in self.pods.values() if volume and p.volume_id == volume), None)
            if holder:  # a volume attaches to one pod at a time
                raise ApiError(409, f"volume {volume} is attached to pod {holder.name}")
            pod_id = str(uuid.uuid4())
            pod = Pod(pod_id, body.get("pod_name") or "pod", volume, list(body.get("user_public_key") or []),
                      gpu_count, price, self.folder / "pods" / pod_id, node_id)
            pod.ready_at = pod.created + self.boot_seconds
            lost = self.rent_outcome_unknown
            if lost:
                self.rent_outcome_unknown = False
                pod.visible_at = pod.created + self.hide_seconds
            self.pods[pod_id] = pod
        # What the rent route answers (the SDK's rent: `{"success": true, "pod_id": ...}`, then the
        # pod is read back by that id from GET /pods).
        return {} if lost else {"success": True, "pod_id": pod_id}

    def rent_cluster(self, body: dict, idempotency_key: str = "") -> dict:
        """POST /executors/cluster/rent: every node whole, one member pod each, all or nothing."""
        with self.lock:
            if idempotency_key in self.rent_answers:  # the same order again: its first answer, nothing rented
                return self.rent_answers[idempotency_key]
            nodes = [str(n) for n in body.get("executor_uuids") or []]
            template = str(body.get("template_id") or "")
            fabric = next((f for f in FABRICS if nodes and set(nodes) <= set(f.nodes)), None)
            busy = [n for n in nodes if self.free_gpus(n) < GPUS_PER_NODE or self.lost_until.get(n, 0) > time.time()]
            refusal = ("a cluster runs only the daturaai/lium-cluster image; template "
                       f"{template} is {'relay-trainer' if template == TEMPLATE_ID else 'unknown'}"
                       if template != CLUSTER_TEMPLATE_ID else
                       "a cluster needs at least 2 distinct nodes" if len(set(nodes)) < 2 or len(set(nodes)) != len(nodes) else
                       "the nodes are not all on one fabric" if fabric is None else
                       f"nodes not free: {', '.join(busy)}" if busy else "")
            if refusal:
                return {"success": False, "message": refusal}
            node_price = round(self.price_per_gpu * GPUS_PER_NODE, 4)
            required = BALANCE_FLOOR_HOURS * (node_price * len(nodes) + sum(p.price for p in self.pods.values()))
            balance = self.balance()
            if balance <= required:
                raise ApiError(403, f"Insufficient balance. This cluster costs ${node_price * len(nodes):.2f}/hour, so "
                                    f"renting it requires at least ${required:.2f} ({BALANCE_FLOOR_HOURS * 60:.0f} "
                                    f"minutes of runtime). Your balance is ${balance:.2f}.", "insufficient_balance")
            outcome, self.cluster_rent_outcome = self.cluster_rent_outcome, ""
            cluster_id = str(uuid.uuid4())
            members = []
            for index, node in enumerate(nodes):
                pod_id = str(uuid.uuid4())
                pod = Pod(pod_id, body.get("pod_name") or "cluster", None, list(body.get("user_public_key") or []),
                          GPUS_PER_NODE, node_price, self.folder / "pods" / pod_id, node, cluster_id=cluster_id,
                          cluster_node_index=index, cluster_overlay_ip=self.overlay_ip())
                pod.ready_at = pod.created + self.boot_seconds
                pod.fails_to_boot = outcome == "member_fails" and index == len(nodes) - 1
                if outcome in ("lost", "unlisted"):
                    pod.visible_at = pod.created + self.hide_seconds
                elif self.boot_seconds <= 0:
                    self._advance(pod)  # RUNNING before the answer: `up --wait` returns at its first poll
                members.append(pod)
            self.pods.update((pod.id, pod) for pod in members)
            answer = {"success": True, "pod_ids": [pod.id for pod in members]}
            if idempotency_key:
                self.rent_answers[idempotency_key] = answer
        if outcome == "lost":  # rented, but the answer never reaches the caller
            raise ApiError(502, "Bad Gateway")
        return answer

    def members(self, cluster_id: str) -> list[Pod]:
        """The cluster's member pods still listed, by rank."""
        with self.lock:
            return sorted((p for p in self.pods.values() if p.cluster_id == cluster_id), key=lambda p: p.cluster_node_index)

    def remove_cluster(self, cluster_id: str) -> dict:
        """DELETE /clusters/{id}: every member removed, one answer row each."""
        members = self.members(cluster_id)
        if not members:
            raise ApiError(404, f"cluster {cluster_id} not found")
        creating = [p for p in members if p.status in ("PENDING", "STARTING")]
        if creating and not self.cancel_inflight_creates:
            raise ApiError(409, f"cluster {cluster_id}: {len(creating)} member(s) still being created; try again later")
        for pod in members:
            self.remove(pod.id)
        return {"pods": [{"pod_id": p.id, "pod_name": p.name, "cluster_node_index": p.cluster_node_index,
                          "success": True, "message": "pod removed"} for p in members]}

    def add_foreign_pod(self, name: str) -> Pod:
        """A pod of the same account rented by someone else (another script, the web UI)."""
        self.rent({"pod_name": name, "gpu_count": 1}, NODE_IDS[-1])
        return next(p for p in self.pods.values() if p.name == name)

    def find(self, ref: str) -> Pod | None:
        return next((p for p in self.pods.values() if ref in (p.id, p.name)), None)

    # -- the pod's life -------------------------------------------------------------------

    def _boot_pods(self) -> None:
        """Pods boot (PENDING, STARTING for boot_seconds, RUNNING once their sshd listens), and
        a pod whose scheduled removal (`--ttl`, `--budget`) has come is removed, as Lium does."""
        while not self._stopping.wait(0.1):
            for pod in list(self.pods.values()):
                with contextlib.suppress(ValueError, TypeError):
                    if pod.removal_scheduled_at and datetime.fromisoformat(
                            pod.removal_scheduled_at.replace("Z", "+00:00")).timestamp() <= time.time():
                        self.remove(pod.id)
                        continue
                if pod.status in ("PENDING", "STARTING") and time.time() >= pod.visible_at:
                    self._advance(pod)

    def _advance(self, pod: Pod) -> None:
        """One step of a pod's boot: STARTING until ready_at, then RUNNING once its sshd listens."""
        if time.time() < pod.ready_at:
            pod.status = "STARTING"
        elif pod.fails_to_boot:
            pod.status = "CREATION_FAILED"  # the backend's name for a create that failed (sdk/client.py:4395-4399)
        else:
            if self.sshd_never_starts:
                pod.port = free_port()
            else:
                self._start_sshd(pod)
            pod.status = "RUNNING"

    def _start_sshd(self, pod: Pod) -> None:
        for sub in ("root", "workspace", "tmp"):
            (pod.folder / sub).mkdir(parents=True, exist_ok=True)
        (pod.folder / "tmp").chmod(0o1777)
        volume = self.mnt(pod)
        volume.mkdir(parents=True, exist_ok=True)
        (pod.folder / "authorized_keys").write_text("".join(k.strip() + "\n" for k in pod.keys + [k["public_key"] for k in self.ssh_keys]))
        mounts = []
        for path in self.image_paths:
            sandbox = sandbox_dir_of(path)
            inside = pod.folder / sandbox.strip("/") / os.path.relpath(path, sandbox)
            inside.mkdir(parents=True, exist_ok=True)
            mounts.append(f"mount --bind {shlex.quote(path)} {shlex.quote(str(inside))}")
        # The image's folders and the volume first: their host folders, like the pod's, may lie
        # under the host's /tmp, hidden once /tmp is.
        for inside_path, host_folder in self.image_dirs.items():
            os.makedirs(inside_path, exist_ok=True)  # an empty mount point on the host, as /workspace
            mounts.append(f"mount --bind {shlex.quote(str(host_folder))} {shlex.quote(inside_path)}")
        mounts.append(f"mount --bind {shlex.quote(str(volume))} /mnt")
        for target in SANDBOX_DIRS:
            os.makedirs(target, exist_ok=True)  # /workspace: an empty mount point on the host
            mounts.append(f"mount --rbind {shlex.quote(str(pod.folder / target.strip('/')))} {target}")
        # sftp-server is named by its path in SSH_ORIGINAL_COMMAND (sshd hands a subsystem to the
        # ForceCommand that way); everything else is a shell command, run by bash as on a pod.
        inner = (" && ".join(mounts) + ' && cd /root && export HOME=/root && '
                 'exec /bin/bash -c "${SSH_ORIGINAL_COMMAND:-exec /bin/bash -l}"')
        enter = pod.folder / "enter"
        enter.write_text(f"#!/bin/bash\nexport LIUM_TEST_POD_ID={pod.id} RELAY_TEST_MARK={shlex.quote(self.mark)}\n"
                         f"exec unshare --mount --propagation private -- /bin/bash -c {shlex.quote(inner)}\n")
        enter.chmod(0o755)
        pod.port = free_port()
        config = pod.folder / "sshd_config"
        config.write_text(f"Port {pod.port}\nListenAddress 127.0.0.1\nHostKey {self.host_key}\n"
                          f"PidFile {pod.folder / 'sshd.pid'}\nUsePAM no\nStrictModes no\nPasswordAuthentication no\n"
                          "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
                          f"AuthorizedKeysFile {pod.folder / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
                          f"ForceCommand {enter}\nSubsystem sftp {SFTP_SERVER}\nLogLevel ERROR\n"
                          "MaxStartups 100\nMaxSessions 100\n")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation folder (Debian's unit makes it)
        log = open(pod.folder / "sshd.log", "ab")  # noqa: SIM115 (sshd's own stderr, kept with the pod)
        pod.sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=log,
                                    env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "RELAY_TEST_MARK": self.mark,
                                         "LIUM_TEST_POD_ID": pod.id},
                                    start_new_session=True)
        give_up = time.time() + 10
        while time.time() < give_up:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", pod.port), timeout=1):
                return
            time.sleep(0.05)

    def _kill(self, pod: Pod) -> None:
        """Everything the pod ran, as when its host vanishes: its sshd and the sessions it forked
        (sshd rewrites its own environment, so they are found as its descendants), and whatever
        left them (`nohup setsid`), found by the mark in its environment."""
        needle = f"LIUM_TEST_POD_ID={pod.id}".encode()
        for _ in range(100):
            parents: dict[int, int] = {}
            found = set()
            for name in os.listdir("/proc"):
                if not name.isdigit() or int(name) == os.getpid():
                    continue
                with contextlib.suppress(OSError, ValueError, IndexError):
                    with open(f"/proc/{name}/stat", "rb") as handle:
                        stat = handle.read()
                    if stat[stat.rindex(b")") + 2:][:1] == b"Z":
                        continue
                    parents[int(name)] = int(stat[stat.rindex(b")") + 2:].split()[1])
                    with open(f"/proc/{name}/environ", "rb") as handle:
                        if needle in handle.read().split(b"\0"):
                            found.add(int(name))
            if pod.sshd is not None and pod.sshd.poll() is None:
                found.add(pod.sshd.pid)
            grown = True
            while grown:
                more = {pid for pid, parent in parents.items() if parent in found} - found
                grown = bool(more)
                found |= more
            if not found:
                break
            for pid in found:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            if pod.sshd is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    pod.sshd.wait(1)
            time.sleep(0.02)

    def preempt(self, ref: str, remove: bool = False) -> None:
        """The host vanished: the pod's processes die; it stays listed as BROKEN or is gone; its
        node is not offered for host_lost_seconds."""
        with self.lock:
            pod = self.find(ref)
            assert pod is not None, ref
            self.lost_until[pod.node_id] = time.time() + self.host_lost_seconds
            self._kill(pod)
            if remove:
                pod.ended = time.time()
                self.removed.append(self.pods.pop(pod.id))
            else:
                pod.status = "BROKEN"

    def remove(self, pod_id: str) -> None:
        with self.lock:
            pod = self.pods.pop(pod_id)
            pod.ended = time.time()
            self.removed.append(pod)
        self._kill(pod)


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code  # the platform's `error.code`, when it sends one


class LiumHandler(http.server.BaseHTTPRequestHandler):
    server: LiumApi
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def reply(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            data = json.loads(raw or b"{}")
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def do_GET(self) -> None:
        self.route("GET")

    def do_POST(self) -> None:
        self.route("POST")

    def do_DELETE(self) -> None:
        self.route("DELETE")

    def route(self, method: str) -> None:
        api = self.server
        path = urllib.parse.urlsplit(self.path).path.rstrip("/")
        body = self.body() if method in ("POST", "DELETE") else {}
        api.requests.append((method, path))
        if not self.headers.get("X-API-KEY"):
            self.reply(401, {"detail": "Not authenticated"})
            return
        if api.api_key and self.headers["X-API-KEY"] != api.api_key:  # the key of no account
            self.reply(401, {"detail": "Invalid API key"})
            return
        parts = path.strip("/").split("/")
        try:
            answer = self.answer(method, parts, body)
        except ApiError as exc:
            error = {"error": {"code": exc.code, "message": str(exc)}} if exc.code else {}
            self.reply(exc.status, {"detail": str(exc), **error})
            return
        if answer is None:
            self.reply(404, {"detail": f"no route {method} {path}"})
        else:
            self.reply(200, answer)

    def answer(self, method: str, parts: list[str], body: dict) -> object:
        api = self.server
        if method == "GET":
            if parts == ["users", "me"]:
                return {"id": "user-1", "email": "relay@example.com", "stripe_customer_id": "cus_test", "balance": api.balance()}
            if parts == ["version"]:
                return {"version": "test", "features": api.features}
            if parts == ["executors"]:
                return [api.executor(node) for node in api.offered()]
            if parts == ["executors", "infiniband-clusters"]:
                return api.fabric_offers()
            if parts == ["executors", "deployment-estimate"]:
                return {}
            if parts == ["templates"]:
                return [api.template(), api.cluster_template()]
            if parts == ["templates", TEMPLATE_ID]:
                return api.template()
            if parts == ["templates", CLUSTER_TEMPLATE_ID]:
                return api.cluster_template()
            if parts == ["volumes"]:
                return api.volumes
            if parts == ["ssh-keys"]:
                return api.ssh_keys
            if parts == ["pods"]:
                return api.listed()
            if len(parts) == 3 and parts[0] == "pods" and parts[2] == "events":
                return []
            if parts == ["machines"]:
                return [{"name": "NVIDIA H200"}]
            return None
        if method == "POST":
            if parts == ["ssh-keys"]:
                key = {"id": str(uuid.uuid4()), "name": body.get("name", ""), "public_key": body.get("public_key", "")}
                api.ssh_keys.append(key)
                return key
            if parts == ["executors", "cluster", "rent"]:
                return api.rent_cluster(body, self.headers.get("Idempotency-Key") or "")
            if len(parts) == 3 and parts[0] == "executors" and parts[2] == "rent":
                return api.rent(body, parts[1])
            if len(parts) == 3 and parts[0] == "pods" and parts[2] == "schedule-removal":
                pod = api.pods.get(parts[1])
                if pod is None:
                    raise ApiError(404, "pod not found")
                pod.removal_scheduled_at = str(body.get("removal_scheduled_at") or "")
                return {"success": True}
            return None
        if method == "DELETE" and len(parts) == 2 and parts[0] == "clusters":
            return api.remove_cluster(urllib.parse.unquote(parts[1]))
        if method == "DELETE" and len(parts) == 2 and parts[0] == "pods":
            if parts[1] not in api.pods:
                raise ApiError(404, "pod not found")
            api.remove(parts[1])
            return {"success": True, "message": "pod removed"}
        return None
