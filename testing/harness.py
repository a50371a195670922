"""Test harness: real relay processes on loopback, cleaned up even when a test fails.

Every process a test starts carries RELAY_TEST_MARK=<uuid> in its environment; every
descendant inherits it (trainers in their own sessions too), so teardown kills exactly the
processes this test started, found through /proc/PID/environ, and nothing else.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from collections.abc import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import relay  # noqa: E402

RELAY = str(ROOT / "relay.py")
# The path the workers' Hub uploads and downloads take (run.yaml hf_transfer): Xet, as in
# production, unless RELAY_TEST_HF_TRANSFER=lfs asks for a pass on the plain LFS path.
HF_TRANSFER = os.environ.get("RELAY_TEST_HF_TRANSFER", "xet")


def wait_for(what: str, condition: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05) -> Any:
    """Poll `condition` until it is truthy; fail naming `what` after `timeout` seconds."""
    give_up = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= give_up:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# Ports a test hands to a process it starts.  A port the kernel picked (bind to 0) is free
# only until the process binds it, and meanwhile another pytest-xdist worker may be handed the
# same: so each worker draws from a block of its own below the kernel's ephemeral range
# (32768 and up, where bind-to-0 and outgoing connections land), never twice in a session,
# skipping any port something else holds.
PORT_BLOCK, PORT_BLOCKS, FIRST_PORT = 1500, 8, 20000
_ports_drawn = itertools.count()


def free_port() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    base = FIRST_PORT + PORT_BLOCK * (int(worker[2:] or 0) % PORT_BLOCKS)
    for _ in range(PORT_BLOCK):
        port = base + next(_ports_drawn) % PORT_BLOCK
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port left in {base}..{base + PORT_BLOCK - 1}")


def environ_of(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            raw = handle.read()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


RAY_SLIME = str(ROOT / "testing" / "fake_slime_ray.py")


# slime's scripts submit with these (docs/slime.md); the same on every node
RAY_SLIME_RUNTIME_ENV = json.dumps({"env_vars": {"CUDA_DEVICE_MAX_CONNECTIONS": "1", "NCCL_NVLS_ENABLE": "0",
                                                 "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}})


def ray_node_ports(*more: str) -> str:
    """`ray start` options giving one Ray node private ports (other Ray nodes, of this test and of
    others, run on this machine): the node's own daemons, 12 worker ports, and `more` (the
    head's)."""
    names = (*more, "node-manager-port", "object-manager-port", "runtime-env-agent-port",
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port")
    workers = ",".join(str(free_port()) for _ in range(12))
    return " ".join(f"--{name} {free_port()}" for name in names) + f" --worker-port-list {workers}"


def ray_slime_job(tmp: Path, nodes: str, num_rollout: int, extra: str) -> str:
    """`ray job submit` of the stand-in for slime's train.py on `nodes` nodes of $RELAY_NUM_GPUS
    GPUs, from the head (its job API on 127.0.0.1:$RELAY_RAY_DASHBOARD_PORT, as relay's stop step
    expects); `tmp/base_torch_dist` is its --ref-load, `extra` more of slime's arguments."""
    return (f"ray job submit --address http://127.0.0.1:$RELAY_RAY_DASHBOARD_PORT --submission-id $RELAY_RAY_JOB_ID "
            f"--runtime-env-json '{RAY_SLIME_RUNTIME_ENV}' -- {sys.executable} {RAY_SLIME} --actor-num-nodes {nodes} "
            f"--actor-num-gpus-per-node $RELAY_NUM_GPUS --ref-load {tmp / 'base_torch_dist'} --num-rollout {num_rollout} "
            f"--save-interval 2 --async-save --rollout-batch-size 8 --global-batch-size 2 --fake-step-seconds 0.25 "
            f"{extra} $RELAY_SLIME_ARGS")


def ray_slime_env(tmp: Path, ray_dir: str, num_rollout: int = 12, gpus: int = 2, extra: str = "") -> dict[str, str]:
    """The README's SFT command with the stand-in for slime's train.py, on loopback and private
    ports: `ray start --head` with its temp folder in `ray_dir` (short: Ray's socket paths),
    then `ray job submit` (`ray_slime_job`), on a pod whose `nvidia-smi -L` lists `gpus` GPUs."""
    command = (
        f"ray start --head --node-ip-address 127.0.0.1 --num-cpus 2 --num-gpus $RELAY_NUM_GPUS --disable-usage-stats "
        f"--dashboard-host 127.0.0.1 --dashboard-port $RELAY_RAY_DASHBOARD_PORT "
        f"{ray_node_ports('port', 'ray-client-server-port')} --temp-dir {ray_dir} && "
        f"{ray_slime_job(tmp, '1', num_rollout, extra)}")
    return {"SLIME_SFT_CMD": command, "RELAY_RAY_DASHBOARD_PORT": str(free_port()), "FAKE_GPU_COUNT": str(gpus),
            "PATH": f"{ROOT / 'testing' / 'bin'}:{os.environ['PATH']}"}


def ray_slime_multinode_env(tmp: Path, ray_dirs: list[str], num_rollout: int = 4, gpus_per_node: int = 2,
                            extra: str = "") -> dict[str, str]:
    """slime's multi-node launch (docs/en/get_started/quick_start.md, scripts/run-deepseek-r1.sh)
    for len(ray_dirs) nodes on this machine: ONE command for every node, which reads relay's
    per-node environment (RELAY_NODE_RANK, RELAY_NUM_NODES, RELAY_MASTER_ADDR, RELAY_NODE_IP,
    RELAY_NUM_GPUS, RELAY_CKPT_DIR, RELAY_SLIME_ARGS, RELAY_RAY_JOB_ID).

    Node 0 runs `ray start --head` on $RELAY_NODE_IP, waits until Ray reports all
    RELAY_NUM_NODES x RELAY_NUM_GPUS GPUs ($RELAY_WAIT_FOR_NODES, relay's own wait: it says how
    many it has meanwhile), then `ray job submit` (`ray_slime_job`) and exits with the job's status; node
    k > 0 runs `ray start --address $RELAY_MASTER_ADDR:$TEST_RAY_HEAD_PORT ... --block` in the
    foreground.  On real nodes the head's port is a constant (6379) and every node has the same
    ports; here the nodes share one machine, so the head's port travels in TEST_RAY_HEAD_PORT
    and node k's own ports and temp folder (ray_dirs[k]: Ray's session folder, logs and
    sockets, as each real node has its /tmp) in TEST_RAY_NODE<k>_ARGS.  One CPU per node: the
    ranks ask none (this machine has 2 cores), the RolloutManager one."""
    head_port = free_port()
    env = {f"TEST_RAY_NODE{k}_ARGS": f"{ray_node_ports(*(('ray-client-server-port',) if k == 0 else ()))} "
                                     f"--temp-dir {folder}" for k, folder in enumerate(ray_dirs)}
    node = ("--node-ip-address $RELAY_NODE_IP --num-cpus 1 --num-gpus $RELAY_NUM_GPUS --disable-usage-stats "
            "${!node_args}")
    command = (
        'node_args=TEST_RAY_NODE${RELAY_NODE_RANK}_ARGS; '
        'if [[ "$RELAY_NODE_RANK" == 0 ]]; then '
        f"ray start --head --port $TEST_RAY_HEAD_PORT --dashboard-host 127.0.0.1 "
        f"--dashboard-port $RELAY_RAY_DASHBOARD_PORT {node} && "
        f"$RELAY_WAIT_FOR_NODES --every 5 && {ray_slime_job(tmp, '$RELAY_NUM_NODES', num_rollout, extra)}; "
        f"else exec ray start --address $RELAY_MASTER_ADDR:$TEST_RAY_HEAD_PORT {node} --block; fi")
    # (relay's launch script runs $SLIME_MEMBER_CMD on nodes k > 0: here the same command)
    return {**env, "SLIME_SFT_CMD": command, "SLIME_MEMBER_CMD": command, "TEST_RAY_HEAD_PORT": str(head_port),
            "RELAY_RAY_PORT": str(head_port),  # where relay's launch script waits for the head on nodes k > 0
            "RELAY_RAY_DASHBOARD_PORT": str(free_port()), "FAKE_GPU_COUNT": str(gpus_per_node),
            "PATH": f"{ROOT / 'testing' / 'bin'}:{os.environ['PATH']}"}


def ray_slime_node_environments(tmp: Path, ray_dirs: list[str], job_id: str, num_rollout: int = 4,
                                extra: str = "") -> list[dict[str, str]]:
    """What relay's workers give each node of a multi-node run, for `ray_slime_multinode_env`'s
    command: node k on 127.0.20.(k+1) with 2 GPUs and its own checkpoint folder tmp/node<k>."""
    env = ray_slime_multinode_env(tmp, ray_dirs, num_rollout=num_rollout, extra=extra)
    nodes = []
    for k in range(len(ray_dirs)):
        ckpt = tmp / f"node{k}"
        ckpt.mkdir(exist_ok=True)
        nodes.append({**env, "RELAY_NODE_RANK": str(k), "RELAY_NUM_NODES": str(len(ray_dirs)),
                      "RELAY_MASTER_ADDR": "127.0.20.1", "RELAY_NODE_IP": f"127.0.20.{k + 1}", "RELAY_NUM_GPUS": "2",
                      "RELAY_CKPT_DIR": str(ckpt), "RELAY_SLIME_ARGS": f"--load {ckpt} --save {ckpt}",
                      "RELAY_RAY_JOB_ID": job_id, "RELAY_RUN_ID": "r1",
                      "RELAY_WAIT_FOR_NODES": f"{sys.executable} {RELAY} wait-for-nodes"})
    return nodes


class Cluster:
    """A commander and workers for one test, all marked for cleanup."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.mark = uuid.uuid4().hex
        self.procs: list[subprocess.Popen] = []
        self.url = ""
        self.port = 0
        self.secret = ""
        self.ca_file = ""  # what clients verify an https:// commander with
        self.commander: subprocess.Popen | None = None
        self.hub: Any = None  # a testing.hub_server.HubServer the workers talk to, if any
        self.hf_transfer = HF_TRANSFER  # run.yaml hf_transfer of the workers it starts
        self.state_path = str(tmp / "commander_state.json")

    # -- processes ---------------------------------------------------------------------------

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "MOCK_", "SLIME_"))}
        env.update({"RELAY_TEST_MARK": self.mark, "MOCK_STEP_SECONDS": "0.04", "MOCK_MAX_STEPS": "40",
                    "MOCK_SAVE_EVERY": "5", "PYTHONUNBUFFERED": "1", "NO_PROXY": "127.0.0.1,localhost"})
        env.update(extra)
        return env

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None,
              wrap: tuple[str, ...] = (), module: str = "") -> subprocess.Popen:
        """`wrap`: a command that execs relay.py with a limit set (prlimit ...) or files held;
        `module`: `python -m module` (a far side or an attacker in testing/) instead of relay.py."""
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 (closed by the OS at exit; small)
        env = dict(env or self.env(), PYTHONPATH=str(ROOT)) if module else env or self.env()
        proc = subprocess.Popen([*wrap, sys.executable, *(["-m", module] if module else [RELAY]), *args], stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=self.tmp)
        proc.name = name  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def print_logs(self, last_lines: int = 60) -> None:
        for name in dict.fromkeys(proc.name for proc in self.procs if hasattr(proc, "name")):
            lines = self.log(name).splitlines()[-last_lines:]
            print(f"----- {name}.log (last {len(lines)} lines) -----", *lines, sep="\n")

    def close(self) -> None:
        for _ in range(50):
            pids = relay.processes_with_env(f"RELAY_TEST_MARK={self.mark}")
            for proc in self.procs:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            for proc in self.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.2)
            if not pids:
                break
        for log in self.tmp.rglob("*.log"):  # workers' logs, on fake Lium pods too
            for cgroup in re.findall(r"trainer started in its own cgroup (\S+)", log.read_text(errors="replace")):
                relay.remove_cgroup(cgroup)  # left when a test killed a worker and its watchdog

    # -- commander ---------------------------------------------------------------------------

    def start_commander(self, lease: float = 2, secret: str = "", port: int | None = None,
                        extra: tuple[str, ...] = (), env: dict[str, str] | None = None,
                        wrap: tuple[str, ...] = ()) -> str:
        self.secret = secret
        self.port = port or self.port or free_port()
        env = self.env(**(env or {}), **({"RELAY_SHARED_SECRET": secret} if secret else {}))
        self.commander = self.spawn("commander", ["serve", "--port", str(self.port), "--lease-seconds", str(lease),
                                                  "--state-path", self.state_path, *extra], env, wrap)
        self.url = f"{'https' if '--tls-cert' in extra else 'http'}://127.0.0.1:{self.port}"
        wait_for("the commander to answer /api/health", self.healthy, 15)
        return self.url

    def healthy(self) -> bool:
        try:
            return relay.CommanderClient(self.url, ca_file=self.ca_file).get("/api/health", timeout=1).status == 200
        except relay.CommanderUnreachable:
            return False

    def client(self, secret: str | None = None) -> relay.CommanderClient:
        return relay.CommanderClient(self.url, self.secret if secret is None else secret, timeout=5, ca_file=self.ca_file)

    def run(self, run_id: str) -> dict:
        reply = self.client().get(f"/api/runs/{run_id}")
        return reply.body if reply.status == 200 else {}

    def runs(self) -> dict:
        return self.client().get("/api/runs").body

    # -- workers -----------------------------------------------------------------------------

    def write_config(self, worker_id: str, run_id: str = "r1", **fields: Any) -> Path:
        config = {"commander_url": self.url, "run_id": run_id, "worker_id": worker_id, "mode": "sft",
                  "l1_root": str(self.tmp / "volume"), "stop_grace_seconds": 2, "commander_wait_seconds": 10,
                  "hf_transfer": self.hf_transfer}
        config.update(fields)
        path = self.tmp / f"{worker_id}.yaml"
        path.write_text(json.dumps(config))
        return path

    def start_worker(self, worker_id: str, run_id: str = "r1", env: dict[str, str] | None = None,
                     open_files: int = 0, **fields: Any) -> subprocess.Popen:
        """`open_files`: the worker starts holding that many more open files (fds 3 and up),
        as it does after a Hub prefetch."""
        config = self.write_config(worker_id, run_id, **fields)
        worker_env = self.env(**(env or {}))
        if self.hub is not None:  # each worker is its own pod: its own Hugging Face cache
            worker_env.update(HF_ENDPOINT=self.hub.url, HF_TOKEN=self.hub.token, HF_HUB_DISABLE_TELEMETRY="1",
                              HF_HOME=str(self.tmp / f"hf-home-{worker_id}"))
        if self.secret:
            worker_env["RELAY_SHARED_SECRET"] = self.secret
        hold = ("bash", "-c", 'for fd in $(seq 3 "$0"); do eval "exec $fd</dev/null"; done; exec "$@"',
                str(2 + open_files)) if open_files else ()
        return self.spawn(worker_id, ["worker", str(config)], worker_env, hold)

    def start_worker_in_pid_namespace(self, worker_id: str, run_id: str = "r1", env: dict[str, str] | None = None,
                                      **fields: Any) -> "PidNamespace":
        """A worker alone in a private PID namespace: there `ray stop --force` (which kills every
        Ray process it sees) and the stop's leftovers concern this worker's processes only."""
        config = self.write_config(worker_id, run_id, **fields)
        return self.start_in_pid_namespace(worker_id, [sys.executable, RELAY, "worker", str(config)], env)

    def start_in_pid_namespace(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> "PidNamespace":
        """`argv` alone in a private PID namespace, logging to `name`.log.  The namespace's first
        process stays after `argv` exits, so what it left behind stays visible; killing it (the
        fixture does, by its group) ends them all."""
        exit_file = self.tmp / f"{name}.exit"
        script = f'"$@"; echo $? > {exit_file}; exec sleep 3600'
        proc = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "bash", "-c", script, "ns", *argv],
                                stdout=open(self.tmp / f"{name}.log", "ab"),  # noqa: SIM115 (as spawn)
                                stderr=subprocess.STDOUT, env=self.env(**(env or {})), start_new_session=True,
                                cwd=self.tmp)
        proc.name = name  # type: ignore[attr-defined]
        self.procs.append(proc)
        return PidNamespace(proc, exit_file)

    def trainer_pids(self, run_id: str = "r1", worker_id: str | None = None) -> dict[int, dict[str, str]]:
        """Live trainer processes of a run (this test's only), with their environments."""
        found = {}
        for pid in relay.processes_with_env(f"RELAY_TEST_MARK={self.mark}"):
            env = environ_of(pid)
            if env.get("RELAY_RUN_ID") == run_id and (worker_id is None or env.get("RELAY_WORKER_ID") == worker_id):
                found[pid] = env
        return found

    def ckpt_dir(self, run_id: str = "r1", l1: str = "volume") -> Path:
        return self.tmp / l1 / "runs" / run_id / "ckpt"


class PidNamespace:
    """A worker started by `unshare --pid --fork` and what runs in its namespace (host pids)."""

    def __init__(self, unshare: subprocess.Popen, exit_file: Path) -> None:
        self.unshare, self.exit_file = unshare, exit_file
        self.init = wait_for("the namespace's first process", self._child_of_unshare, 15)
        self.ns = os.readlink(f"/proc/{self.init}/ns/pid")
        self.worker = wait_for("the worker in the namespace", lambda: self._child_of(self.init), 15)

    def _child_of(self, parent: int) -> int | None:
        return next((pid for pid, info in relay.process_table().items() if info.ppid == parent), None)

    def _child_of_unshare(self) -> int | None:
        return self._child_of(self.unshare.pid)

    def processes(self) -> dict[int, str]:
        """Live processes of the namespace but its first, with their command lines."""
        found = {}
        for pid, info in relay.process_table().items():
            with contextlib.suppress(OSError):
                if pid != self.init and not info.zombie and os.readlink(f"/proc/{pid}/ns/pid") == self.ns:
                    found[pid] = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        return found

    def exit_code(self) -> int | None:
        text = self.exit_file.read_text().strip() if self.exit_file.exists() else ""
        return int(text) if text else None


class TrainerOverlapMonitor:
    """Each trainer's life, judged exactly: when its first process was born and its last ended.

    Trainers are told apart by their lease epoch (a trainer is the process tree whose
    processes share one).  A process is found by scanning /proc every 20 ms; its birth is read
    from /proc (the kernel's start time, 10 ms ticks) and its end is seen the moment it
    happens, through a pidfd that becomes readable at exit: a trainer that outlives its lease
    by a millisecond shows it, whatever the scan missed.  Times are wall-clock seconds, as the
    commander's lease records are (`started_at` of a grant).
    """

    def __init__(self, cluster: Cluster, run_id: str = "r1") -> None:
        self.cluster, self.run_id = cluster, run_id
        self.born: dict[str, float] = {}  # epoch -> its first process's birth
        self.ended: dict[str, float] = {}  # epoch -> its last process's end, once all have ended
        self._alive: dict[int, tuple[str, int]] = {}  # pid -> (epoch, pidfd)
        self._seen: set[tuple[int, int]] = set()  # (pid, start ticks): a reused pid is a new process
        self._lock = threading.Lock()
        self._exits = select.epoll()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._scan, daemon=True),
                         threading.Thread(target=self._wait_for_exits, daemon=True)]
        self._boot_wall = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
        self._tick = os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> "TrainerOverlapMonitor":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        self._exits.close()

    @property
    def epochs_seen(self) -> set[str]:
        return set(self.born)

    @property
    def overlaps(self) -> list[tuple[str, str]]:
        """Pairs of epochs whose trainers were alive at one instant."""
        with self._lock:
            running = {epoch: (born, self.ended.get(epoch, float("inf"))) for epoch, born in self.born.items()}
        return [(a, b) for a in running for b in running
                if a < b and max(running[a][0], running[b][0]) < min(running[a][1], running[b][1])]

    def _scan(self) -> None:
        while not self._stop.is_set():
            for pid, env in self.cluster.trainer_pids(self.run_id).items():
                started = relay.process_start_ticks(pid)
                if started is None or (pid, started) in self._seen:
                    continue
                self._seen.add((pid, started))
                epoch = env.get("RELAY_LEASE_EPOCH", "?")
                born = self._boot_wall + started / self._tick
                try:
                    pidfd = os.pidfd_open(pid)
                except ProcessLookupError:  # ended between the scan and now: now is an upper bound
                    pidfd = -1
                with self._lock:
                    self.born[epoch] = min(self.born.get(epoch, born), born)
                    self.ended.pop(epoch, None)
                    if pidfd < 0:
                        self._end(epoch, time.time())
                    else:
                        self._alive[pidfd] = (epoch, pid)
                        self._exits.register(pidfd, select.EPOLLIN)
            self._stop.wait(0.02)

    def _wait_for_exits(self) -> None:
        while not self._stop.is_set():
            for pidfd, _ in self._exits.poll(0.1):
                now = time.time()
                with self._lock:
                    epoch, _pid = self._alive.pop(pidfd)
                    self._exits.unregister(pidfd)
                    os.close(pidfd)
                    self._end(epoch, now)

    def _end(self, epoch: str, now: float) -> None:
        """One process of `epoch` ended: the trainer has ended when none of its is left."""
        if not any(other == epoch for other, _ in self._alive.values()):
            self.ended[epoch] = now


def reference_model(tmp: Path, max_steps: int = 40, save_every: int = 5) -> bytes:
    """The final model.json of an uninterrupted mock run."""
    ckpt = tmp / f"reference-{max_steps}-{save_every}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "MOCK_"))}
    env.update(RELAY_CKPT_DIR=str(ckpt), MOCK_MAX_STEPS=str(max_steps), MOCK_SAVE_EVERY=str(save_every),
               MOCK_STEP_SECONDS="0")
    subprocess.run([sys.executable, RELAY, "mock-trainer"], env=env, check=True, stdout=subprocess.DEVNULL)
    return (ckpt / relay.iteration_dirname(max_steps) / "model.json").read_bytes()
