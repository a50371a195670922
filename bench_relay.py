#!/usr/bin/env python3
"""relay-trainer benchmarks: figures, printed side by side with their baselines.

    python bench_relay.py            # everything (about 9 minutes; env-route downloads ~130 MB from PyPI)
    python bench_relay.py renewals   # one part: renewals | hostile | tls | viewers | takeover | slime-stop | ray-nodes | footprint | hub | standby | env-route

Targets (from the relay-core issue): renewals at least half a bare stdlib HTTP server's
throughput; takeover after SIGKILL at most 1.0 x TTL + 2 s, after SIGTERM under 1 s plus
restore; worker + watchdog under 1% of a core and under 40 MB while a trainer runs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.client
import http.server
import json
import multiprocessing
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
import urllib.request
from pathlib import Path

from testing.harness import Cluster, free_port, ray_slime_env, ray_slime_node_environments, relay, wait_for

SIMULATED_WORKERS = (200, 1000)
CLIENT_PROCESSES = 4
DURATION = 4.0
SECRET = "bench-secret-0123456789abcdef"


# --------------------------------------------------------------------------- renewals/s


class BareHandler(http.server.BaseHTTPRequestHandler):
    """The baseline: a stdlib server that reads the body and answers a fixed JSON object."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        data = b'{"ok": true, "lease_expires_in_sec": 60}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


class BareServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the commander's backlog too: same conditions


def serve_bare(port_queue: multiprocessing.Queue) -> None:
    server = BareServer(("127.0.0.1", 0), BareHandler)
    port_queue.put(server.server_address[1])
    server.serve_forever()


def client_process(port: int, leases: list[dict], duration: float, secret: str, out: multiprocessing.Queue,
                   measure_after: float = 0.0) -> None:
    """Each simulated worker: a thread with a keep-alive connection renewing in a loop; what
    it measures are the renewals that start after `measure_after` seconds."""
    latencies: list[float] = []
    lock = threading.Lock()
    measure_from = time.monotonic() + measure_after
    stop_at = time.monotonic() + duration

    def simulate(lease: dict) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine = []
        step = 0
        while time.monotonic() < stop_at:
            step += 1
            body = json.dumps({"run_id": lease["run_id"], "worker_id": lease["worker_id"],
                               "lease_token": lease["token"], "step": step}).encode()
            headers = {"Content-Type": "application/json"}
            if secret:
                headers.update(relay.signed_headers(secret, "POST", "/api/lease/renew", body))
            started = time.perf_counter()
            try:
                conn.request("POST", "/api/lease/renew", body, headers)
                resp = conn.getresponse()
                resp.read()
                ok = resp.status == 200
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                ok = False
            if ok and time.monotonic() >= measure_from:
                mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=simulate, args=(lease,)) for lease in leases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out.put(latencies)


def load(port: int, leases: list[dict], secret: str, duration: float = DURATION, measure_after: float = 0.0) -> dict:
    out: multiprocessing.Queue = multiprocessing.Queue()
    chunks = [leases[i::CLIENT_PROCESSES] for i in range(CLIENT_PROCESSES)]
    procs = [multiprocessing.Process(target=client_process, args=(port, chunk, duration, secret, out, measure_after))
             for chunk in chunks]
    for proc in procs:
        proc.start()
    latencies = [x for _ in procs for x in out.get()]
    for proc in procs:
        proc.join()
    latencies.sort()
    return {"rate": len(latencies) / (duration - measure_after),
            "p50": latencies[len(latencies) // 2] * 1000 if latencies else float("nan"),
            "p99": latencies[int(len(latencies) * 0.99)] * 1000 if latencies else float("nan")}


def bench_renewals(tmp: Path) -> list[tuple[str, str, str]]:
    rows = []
    ports: multiprocessing.Queue = multiprocessing.Queue()
    bare_server = multiprocessing.Process(target=serve_bare, args=(ports,), daemon=True)
    bare_server.start()
    bare_port = ports.get(timeout=10)
    cluster = Cluster(tmp)
    try:
        cluster.start_commander(lease=600, secret=SECRET)
        client = cluster.client()
        leases = []
        for n in range(max(SIMULATED_WORKERS)):
            run_id, worker_id = f"bench-{n}", f"w{n}"
            body = client.post("/api/lease/acquire", {"run_id": run_id, "worker_id": worker_id, "mode": "sft"}).body
            leases.append({"run_id": run_id, "worker_id": worker_id, "token": body["lease_token"]})
        for workers in SIMULATED_WORKERS:
            relayed = load(cluster.port, leases[:workers], SECRET)
            bare = load(bare_port, leases[:workers], "")
            rows.append((f"renewals/s, {workers} simulated workers (HMAC on)",
                         f"{relayed['rate']:.0f}/s (p50 {relayed['p50']:.1f} ms, p99 {relayed['p99']:.1f} ms)",
                         f"bare stdlib server {bare['rate']:.0f}/s (p50 {bare['p50']:.1f} ms, p99 {bare['p99']:.1f} ms); "
                         f"ratio {relayed['rate'] / bare['rate']:.2f} (target >= 0.5)"))
    finally:
        cluster.close()
        bare_server.terminate()
        bare_server.join()
    return rows


# --------------------------------------------------------------------------- under attack

HOSTILE_IDLE, HOSTILE_DRIP, HOSTILE_WORKERS = 2000, 200, 20


def bench_hostile(tmp: Path) -> list[tuple[str, str, str]]:
    """Renewals of workers whose connections are open when 2,000 idle and 200 dripping
    connections arrive (more than the commander's 1,024-connection cap), beside a quiet run."""
    cluster = Cluster(tmp)
    try:
        cluster.start_commander(lease=600, secret=SECRET)
        client = cluster.client()
        leases = []
        for n in range(HOSTILE_WORKERS):
            body = client.post("/api/lease/acquire", {"run_id": f"r{n}", "worker_id": f"w{n}", "mode": "sft"}).body
            leases.append({"run_id": f"r{n}", "worker_id": f"w{n}", "token": body["lease_token"]})
        quiet = load(cluster.port, leases, SECRET, 6.0, 2.0)
        measured: dict = {}
        loader = threading.Thread(target=lambda: measured.update(load(cluster.port, leases, SECRET, 10.0, 4.0)))
        loader.start()
        time.sleep(1.0)  # the workers' connections are open and renewing
        hostile = cluster.spawn("hostile", ["--port", str(cluster.port), "--idle", str(HOSTILE_IDLE), "--drip",
                                            str(HOSTILE_DRIP), "--seconds", "12"], module="testing.hostile_clients")
        loader.join()
        hostile.wait(30)
        stats = json.loads(cluster.log("hostile").strip().splitlines()[-1])
        rss = int(Path(f"/proc/{cluster.commander.pid}/status").read_text().split("VmHWM:")[1].split()[0]) / 1024
    finally:
        cluster.close()
    return [(f"renewals/s, {HOSTILE_WORKERS} workers, {HOSTILE_IDLE} idle + {HOSTILE_DRIP} dripping hostile connections",
             f"{measured['rate']:.0f}/s (p50 {measured['p50']:.1f} ms, p99 {measured['p99']:.1f} ms); "
             f"{stats['opened']} hostile connections opened, {stats['answered_503']} got a 503; commander peak RSS "
             f"{rss:.0f} MB",
             f"quiet: {quiet['rate']:.0f}/s (p50 {quiet['p50']:.1f} ms, p99 {quiet['p99']:.1f} ms)")]


VIEWER_RUNS, VIEWERS = 40, 16


def bench_viewers(tmp: Path) -> list[tuple[str, str, str]]:
    """One worker's renewals while 16 viewers reload the page of 40 full runs in a loop: the
    commander's lock is held to copy the records, not to render them."""
    cluster = Cluster(tmp)
    try:
        cluster.start_commander(lease=600, secret=SECRET)
        client = cluster.client()
        for n in range(VIEWER_RUNS):  # each run with a full loss curve and log window
            held = {"run_id": f"v{n}", "worker_id": f"w{n}"}
            token = client.post("/api/lease/acquire", dict(held, mode="sft")).body["lease_token"]
            for batch in range(20):
                client.post("/api/lease/renew", dict(held, lease_token=token, step=batch * 100 + 99, log_lines=[
                    f"step {batch} " + "x" * 100] * 10, losses=[[batch * 100 + i, 1.0 / (i + 1)] for i in range(100)]))
        started = time.perf_counter()
        client.get("/")
        page_ms = (time.perf_counter() - started) * 1000
        quiet = renewal_latencies(cluster.url, "", True)
        stop = threading.Event()
        pages = []

        def view() -> None:
            viewer = cluster.client()
            while not stop.is_set():
                viewer.get("/")
                pages.append(1)

        viewers = [threading.Thread(target=view) for _ in range(VIEWERS)]
        for thread in viewers:
            thread.start()
        try:
            busy = renewal_latencies(cluster.url, "", True)
        finally:
            stop.set()
            for thread in viewers:
                thread.join()
    finally:
        cluster.close()
    return [(f"renewal latency, one worker, {VIEWERS} viewers reloading the page of {VIEWER_RUNS} full runs",
             f"p50 {busy[0]:.2f} ms, p99 {busy[1]:.2f} ms ({len(pages)} pages served meanwhile)",
             f"no viewers: p50 {quiet[0]:.2f} ms, p99 {quiet[1]:.2f} ms; one page {page_ms:.0f} ms")]


def renewal_latencies(url: str, ca_file: str, keep_alive: bool, count: int = 300) -> tuple[float, float]:
    """p50 and p99 (ms) of one worker's renewals, back to back, over its kept-alive connection
    or a new one each time (the client before keep-alive)."""
    client, run_id = relay.CommanderClient(url, SECRET, ca_file=ca_file), f"r-{keep_alive}-{time.monotonic()}"
    token = client.post("/api/lease/acquire", {"run_id": run_id, "worker_id": "w", "mode": "sft"}).body["lease_token"]
    latencies = []
    for step in range(count):
        if not keep_alive:
            client._drop_connection()  # noqa: SLF001 (what every renewal cost before keep-alive)
        started = time.perf_counter()
        client.post("/api/lease/renew", {"run_id": run_id, "worker_id": "w", "lease_token": token, "step": step})
        latencies.append((time.perf_counter() - started) * 1000)
    latencies.sort()
    return latencies[count // 2], latencies[int(count * 0.99)]


def bench_tls(tmp: Path) -> list[tuple[str, str, str]]:
    cert, key = str(tmp / "c.crt"), str(tmp / "c.key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "2", "-keyout", key, "-out", cert, "-subj", "/CN=bench", "-addext",
                    "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    figures = {}
    for scheme in ("http", "https"):
        cluster = Cluster(tmp / scheme)
        (tmp / scheme).mkdir()
        try:
            cluster.ca_file = cert if scheme == "https" else ""
            cluster.start_commander(lease=600, secret=SECRET,
                                    extra=("--tls-cert", cert, "--tls-key", key) if scheme == "https" else ())
            for keep_alive in (True, False):
                figures[scheme, keep_alive] = renewal_latencies(cluster.url, cluster.ca_file, keep_alive)
        finally:
            cluster.close()

    def text(scheme: str, keep_alive: bool) -> str:
        p50, p99 = figures[scheme, keep_alive]
        return f"p50 {p50:.2f} ms, p99 {p99:.2f} ms"

    return [("renewal latency, one worker, kept-alive connection: TLS", text("https", True),
             f"plain HTTP {text('http', True)}"),
            ("renewal latency, one worker, a new connection per renewal: TLS", text("https", False),
             f"plain HTTP {text('http', False)}")]


# --------------------------------------------------------------------------- takeover


def bench_takeover(tmp: Path) -> list[tuple[str, str, str]]:
    rows = []
    ttl = 4.0
    for how in (signal.SIGKILL, signal.SIGTERM):
        cluster = Cluster(tmp / how.name)
        cluster.tmp.mkdir()
        try:
            cluster.start_commander(lease=ttl)
            env = {"MOCK_MAX_STEPS": "400", "MOCK_STEP_SECONDS": "0.05"}
            first = cluster.start_worker("a", env=env)
            wait_for("a checkpoint", lambda c=cluster: (c.run("r1").get("latest_checkpoint") or {}).get("iteration", 0) >= 5)
            cluster.start_worker("b", env=env)
            wait_for("b standing by", lambda c=cluster: "standing by" in c.log("b"))
            time.sleep(ttl / 3)  # land the kill at a typical point between two renewals
            killed = time.time()
            os.kill(first.pid, how)
            wait_for("b to take over", lambda c=cluster: c.run("r1").get("holder") == "b", 30, 0.01)
            run = cluster.run("r1")
            granted = run["leases"][-1]["started_at"]
            resumed = wait_for("b's trainer", lambda c=cluster: c.trainer_pids(worker_id="b"), 30, 0.01)
            assert resumed
            trainer_started = time.time()
        finally:
            cluster.close()
        takeover = granted - killed
        target = "<= 1.0 x TTL + 2 s" if how == signal.SIGKILL else "< 1 s + restore"
        rows.append((f"takeover after {how.name} (TTL {ttl:g} s)",
                     f"{takeover:.2f} s = {takeover / ttl:.2f} x TTL; trainer running after {trainer_started - killed:.2f} s",
                     f"target {target}"))
    return rows


# --------------------------------------------------------------------------- stopping slime on real Ray


def bench_slime_stop(tmp: Path) -> list[tuple[str, str, str]]:
    """SIGTERM to a worker whose trainer is slime's train.py stand-in on a real Ray cluster (in a
    private PID namespace, as in the tests): time until the worker exits, sealed and released,
    with nothing of the trainer left."""
    (tmp / "base_torch_dist").mkdir()
    ray_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    cluster = Cluster(tmp)
    grace = 30
    try:
        cluster.start_commander(lease=5)
        ns = cluster.start_worker_in_pid_namespace("a", env=ray_slime_env(tmp, ray_dir), total_steps=12,
                                                   stop_grace_seconds=grace, stall_timeout_seconds=900)
        wait_for("a sealed checkpoint", lambda: (cluster.run("r1").get("latest_checkpoint") or {}).get("iteration", -1) >= 1,
                 300)
        processes = len(ns.processes())
        killed = time.monotonic()
        os.kill(ns.worker, signal.SIGTERM)
        wait_for("the worker to exit", lambda: ns.exit_code() is not None, 60, 0.01)
        exited = time.monotonic() - killed
        left = ns.processes()
        status = cluster.run("r1").get("status")
        steps = next((line for line in cluster.log("a").splitlines() if "[trainer] stopped in" in line), "")
    finally:
        cluster.close()
        shutil.rmtree(ray_dir, ignore_errors=True)
    return [("SIGTERM stop of slime on real Ray (CPU)",
             f"worker exited in {exited:.1f} s, run {status}, {len(left)} of {processes} trainer processes left; "
             f"{steps.split('] ', 1)[-1]}",
             f"target < 10 s (stop_grace_seconds {grace}), nothing left")]


def bench_ray_nodes(tmp: Path) -> list[tuple[str, str, str]]:
    """slime's stand-in on two real Ray nodes on this machine (each in its own PID namespace, as
    in the tests), 4 rollouts with a save every 2: wall time from the first `ray start` to the
    job's end, and the peak memory of both nodes' processes (the sum of their Pss)."""
    (tmp / "base_torch_dist").mkdir()
    ray_dirs = [tempfile.mkdtemp(prefix="ray", dir="/tmp") for _ in range(2)]
    cluster = Cluster(tmp)
    try:
        started = time.monotonic()
        nodes = [cluster.start_in_pid_namespace(f"node{k}", ["bash", "-c", env["SLIME_SFT_CMD"]], env)
                 for k, env in enumerate(ray_slime_node_environments(tmp, ray_dirs, "bench-ray-nodes", 4))]
        peak = 0.0
        while nodes[0].exit_code() is None and time.monotonic() - started < 300:
            total = 0.0
            for pid in [pid for node in nodes for pid in node.processes()]:
                with contextlib.suppress(OSError, KeyError):
                    total += memory_mb(pid)["pss"]
            peak = max(peak, total)
            time.sleep(0.5)
        seconds, status = time.monotonic() - started, nodes[0].exit_code()
    finally:
        cluster.close()
        for folder in ray_dirs:
            shutil.rmtree(folder, ignore_errors=True)
    return [("slime stand-in on 2 real Ray nodes x 2 GPUs (CPU), 4 rollouts",
             f"{seconds:.1f} s from `ray start` to the job's end (exit {status}); peak {peak:.0f} MB Pss of both nodes",
             "figure only (the test suite starts three such runs)")]


# --------------------------------------------------------------------------- footprint


def cpu_and_wakeups(pid: int) -> tuple[float, int]:
    """CPU seconds and wake-ups (voluntary context switches: it slept, something woke it)
    of every thread of `pid`.

    CPU from schedstat (nanoseconds the scheduler ran each thread), not utime/stime: those
    are sampled at the 100 Hz tick, and a thread that wakes on a timer tends to run right
    at a tick, so a process that polls is charged whole ticks for microseconds of work.
    """
    cpu, switches = 0.0, 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as handle:
                cpu += int(handle.read().split()[0]) / 1e9
            with open(f"/proc/{pid}/task/{tid}/status") as handle:
                switches += sum(int(line.split()[1]) for line in handle if line.startswith("voluntary_ctxt_switches"))
        except OSError:  # a thread that ended in between
            continue
    return cpu, switches


def memory_mb(pid: int) -> dict[str, float]:
    """Rss, Pss (shared pages split between their users: the figure that adds up across
    processes) and Uss (pages only this process has), in MB."""
    with open(f"/proc/{pid}/smaps_rollup") as handle:
        kb = {line.split(":")[0]: int(line.split()[1]) for line in handle if line.rstrip().endswith("kB")}
    return {"rss": kb["Rss"] / 1024, "pss": kb["Pss"] / 1024, "uss": (kb["Private_Clean"] + kb["Private_Dirty"]) / 1024}


def footprint(tmp: Path, lease: float, window: float) -> tuple[float, float, dict, dict, dict]:
    """Share of a core and wake-ups per second of worker + watchdog over `window` seconds
    of a steady run (a step every 0.5 s, a checkpoint every 5 s), and their memory."""
    cluster = Cluster(tmp)
    try:
        cluster.start_commander(lease=lease)
        worker = cluster.start_worker("a", env={"MOCK_MAX_STEPS": "100000", "MOCK_STEP_SECONDS": "0.5",
                                                "MOCK_SAVE_EVERY": "10"})
        wait_for("the trainer", lambda: cluster.trainer_pids(), 20)
        watchdogs = wait_for("the watchdog", lambda: [p for p in relay.processes_with_env(f"RELAY_TEST_MARK={cluster.mark}")
                                                     if Path(f"/proc/{p}/comm").read_text().strip() == "relay-watchdog"], 10)
        pids = [worker.pid, *watchdogs]
        time.sleep(2)  # past start-up: measure the steady state
        before = [cpu_and_wakeups(p) for p in pids]
        time.sleep(window)
        after = [cpu_and_wakeups(p) for p in pids]
        worker_mem, watchdog_mem = memory_mb(worker.pid), memory_mb(watchdogs[0])
        trainer_mem = memory_mb(next(iter(cluster.trainer_pids())))
    finally:
        cluster.close()
    used = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
    wakeups = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    return 100 * used / window, wakeups / window, worker_mem, watchdog_mem, trainer_mem


def bench_footprint(tmp: Path) -> list[tuple[str, str, str]]:
    rows = []
    for lease in (6.0, 60.0):  # the bench's short lease (renewals every 2 s), then the default
        part = tmp / f"lease-{lease:g}"
        part.mkdir()
        share, wakeups, worker_mem, watchdog_mem, trainer_mem = footprint(part, lease, 10.0)
        pss = worker_mem["pss"] + watchdog_mem["pss"]
        rows.append((f"worker + watchdog while a trainer runs ({lease:g} s lease)",
                     f"{share:.2f}% of a core ({wakeups:.1f} wake-ups/s); {pss:.1f} MB PSS (worker {worker_mem['pss']:.1f}, "
                     f"watchdog {watchdog_mem['pss']:.1f}: {watchdog_mem['uss']:.1f} MB its own, the rest shared "
                     f"copy-on-write); RSS {worker_mem['rss']:.1f} + {watchdog_mem['rss']:.1f} MB",
                     f"target < 1% of a core, < 40 MB; the mock trainer (`relay.py mock-trainer`) here: {trainer_mem['pss']:.1f} MB PSS"))
    return rows


# --------------------------------------------------------------------------- the Hub

CHECKPOINT_MB = 300


def serve_hub(port_queue: multiprocessing.Queue, token: str, download_bytes_per_second: float = 0.0) -> None:
    from testing.hub_server import HubServer

    os.nice(10)  # it stands for the remote Hub: on a pod it takes none of the trainer's CPU
    server = HubServer(token)
    server.download_bytes_per_second = download_bytes_per_second
    port_queue.put(server.server_address[1])
    server.serve_forever()


def mock_run_seconds(tmp: Path, name: str) -> float:
    """Wall time of a 60-step mock run whose steps mostly wait, as a GPU-bound step does."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "MOCK_"))}
    env.update(RELAY_CKPT_DIR=str(tmp / name), MOCK_MAX_STEPS="60", MOCK_STEP_SECONDS="0.05", MOCK_SAVE_EVERY="20")
    started = time.perf_counter()
    subprocess.run([sys.executable, str(Path(relay.__file__)), "mock-trainer"], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def hub_path_figures(tmp: Path, endpoint: str, token: str, transfer: str, out: multiprocessing.Queue) -> None:
    """In a fresh interpreter (huggingface_hub reads HF_HUB_DISABLE_XET once, at import): the
    upload time of the checkpoint in `tmp` on one path, and the mock trainer's time alone and
    while uploads run back to back."""
    os.environ.update(HF_ENDPOINT=endpoint, HF_TOKEN=token, HF_HOME=str(tmp / f"hf-home-{transfer}"),
                      HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1")

    def fresh_store(n: int) -> relay.HubStore:
        """A store on a new repo: it lacks every file, so an upload sends all the bytes."""
        cfg = relay.RunConfig(commander_url="http://127.0.0.1:9", run_id="bench", mode="sft", hf_transfer=transfer,
                              hf_repo=f"tester/bench-{transfer}-{n}", l1_root=str(tmp / "l1"))
        store = relay.HubStore(cfg)
        store.check()
        return store

    store = fresh_store(0)
    ckpt = relay.CheckpointDir(store.cfg.run_dir, require_dataset_state=False)
    manifest = ckpt.load_manifest(1)
    started = time.perf_counter()
    store.upload(ckpt, manifest, [], None, "bench", lambda: True)
    upload = time.perf_counter() - started
    alone = min(mock_run_seconds(tmp, f"alone-{transfer}-{n}") for n in range(2))
    uploading = threading.Event()

    def upload_in_a_loop() -> None:
        relay.yield_cpu_to_the_trainer()  # as the worker's Hub sync thread does
        n = 0
        while not uploading.is_set():
            n += 1
            fresh_store(n).upload(ckpt, manifest, [], None, "bench", lambda: True)

    uploader = threading.Thread(target=upload_in_a_loop)
    uploader.start()
    try:
        with_sync = min(mock_run_seconds(tmp, f"sync-{transfer}-{n}") for n in range(2))
    finally:
        uploading.set()
        uploader.join()
    out.put((upload, alone, with_sync))


def bench_hub(tmp: Path) -> list[tuple[str, str, str]]:
    """Both paths side by side, each in a process of its own, against one local Hub server.
    Xet's CAS is hf_xet's local:// store: its chunking, compression and writes run in the
    uploading process (as on a pod), its network leg is a folder."""
    token = "hf_bench_token_0123456789"
    ports: multiprocessing.Queue = multiprocessing.Queue()
    server = multiprocessing.Process(target=serve_hub, args=(ports, token), daemon=True)
    server.start()
    rows = []
    try:
        endpoint = f"http://127.0.0.1:{ports.get(timeout=10)}"
        cfg = relay.RunConfig(commander_url="http://127.0.0.1:9", run_id="bench", mode="sft", l1_root=str(tmp / "l1"))
        ckpt = relay.CheckpointDir(cfg.run_dir, require_dataset_state=False)
        shard_dir = Path(ckpt.path) / relay.iteration_dirname(1)
        shard_dir.mkdir(parents=True)
        for n in range(3):
            (shard_dir / f"shard_{n}.distcp").write_bytes(os.urandom(CHECKPOINT_MB // 3 << 20))
        (Path(ckpt.path) / relay.TRACKER_FILE).write_text("1\n")
        manifest = ckpt.seal(1, 1, "bench")
        started = time.perf_counter()
        shutil.copytree(shard_dir, tmp / "copy")
        copy = time.perf_counter() - started
        mb = manifest.total_bytes / (1 << 20)
        spawn = multiprocessing.get_context("spawn")
        for transfer, how in (("xet", "hf_xet: chunking, dedup, xorbs to a local:// CAS, one commit"),
                              ("lfs", "sha256 given by the manifest, batch API, 3 PUTs, one commit")):
            results: multiprocessing.Queue = spawn.Queue()
            child = spawn.Process(target=hub_path_figures, args=(tmp, endpoint, token, transfer, results))
            child.start()
            upload, alone, with_sync = results.get(timeout=1800)
            child.join()
            rows += [
                (f"Hub upload of a {mb:.0f} MB checkpoint, hf_transfer: {transfer} ({how}; local server)",
                 f"{mb / upload:.0f} MB/s ({upload:.1f} s)",
                 f"plain file copy {mb / copy:.0f} MB/s ({copy:.2f} s); ratio {copy / upload:.2f}"),
                (f"mock trainer, 60 GPU-like steps, while {transfer} uploads run back to back",
                 f"{with_sync:.2f} s ({100 * (with_sync / alone - 1):+.1f}%)",
                 f"without a sync {alone:.2f} s; target within 2%"),
            ]
    finally:
        server.terminate()
        server.join()
    return rows


# --------------------------------------------------------------------------- the nodes of a cluster

def bench_gather(tmp: Path) -> list[tuple[str, str, str]]:
    """Node 0 gathering a member's shards over the cluster's network (here loopback): the
    member's signed listing (it hashes its shards once), then each file streamed and checked
    against it.  The alternative, every member uploading its own shards to the Hub, would move
    the same bytes over the Hub's uplink instead (the hub part measures that path)."""
    secret = "bench-secret-" + "x" * 32
    member_cfg = relay.RunConfig(commander_url="http://127.0.0.1:9", run_id="bench", mode="sft", l1_root=str(tmp / "member"))
    node0_cfg = relay.RunConfig(commander_url="http://127.0.0.1:9", run_id="bench", mode="sft", l1_root=str(tmp / "node0"))
    member = relay.CheckpointDir(member_cfg.run_dir, require_dataset_state=False)
    node0 = relay.CheckpointDir(node0_cfg.run_dir, require_dataset_state=False)
    shard_dir = Path(member.path) / relay.iteration_dirname(1)
    shard_dir.mkdir(parents=True)
    for rank in range(2, 5):
        (shard_dir / f"__{rank}_0.distcp").write_bytes(os.urandom(CHECKPOINT_MB // 3 << 20))
    port = free_port()
    server = relay.NodeCheckpointServer("127.0.40.2", port, member, secret)
    try:
        peer = relay.NodePeer(f"127.0.40.2:{port}", secret)
        started = time.perf_counter()
        files = relay.checked_file_listing(peer.ask("/shards/1")["files"])
        listed = time.perf_counter() - started
        started = time.perf_counter()
        copied = peer.copy_files(files, node0, lambda: False)
        moved = time.perf_counter() - started
    finally:
        server.shutdown()
        server.server_close()
    mb = copied / (1 << 20)
    return [(f"node 0 gathers a member's {mb:.0f} MB of shards (signed listing, streamed, SHA-256 checked; loopback)",
             f"{mb / moved:.0f} MB/s ({moved:.1f} s) after a {listed:.1f} s listing",
             "a real overlay: 10-400 Gb/s; the Hub upload of the same bytes: the hub part")]


# --------------------------------------------------------------------------- a ready standby

STANDBY_CHECKPOINT_MB = 300
POD_DOWNLOAD_MB_PER_S = 50  # a pod's download rate from the Hub (an assumption: plain HTTPS, no Xet)
BIG_CHECKPOINT_TRAINER = f"""
import os, time
ckpt = os.environ["RELAY_CKPT_DIR"]
if not os.environ["RELAY_RESUME_STEP"]:  # a cold start saves one big checkpoint; a resumed one trains on
    os.makedirs(os.path.join(ckpt, "iter_0000001"))
    for n in range(3):
        with open(os.path.join(ckpt, "iter_0000001", f"shard_{{n}}.distcp"), "wb") as handle:
            handle.write(os.urandom({STANDBY_CHECKPOINT_MB // 3 << 20}))
    with open(os.path.join(ckpt, "latest_checkpointed_iteration.txt"), "w") as handle:
        handle.write("1\\n")
print("step 1", flush=True)
time.sleep(3600)
"""


def bench_standby(tmp: Path) -> list[tuple[str, str, str]]:
    """Holder's death to the standby's trainer running, a standby without prefetch and then
    one with it (the second takes over from the first: same checkpoint, same revision)."""
    token, ttl = "hf_bench_token_0123456789", 4.0
    ports: multiprocessing.Queue = multiprocessing.Queue()
    server = multiprocessing.Process(target=serve_hub, args=(ports, token, POD_DOWNLOAD_MB_PER_S * (1 << 20)), daemon=True)
    server.start()
    cluster = Cluster(tmp)
    cluster.hf_transfer = "lfs"  # the pod's download rate is held by the server, which Xet's local CAS bypasses
    cluster.hub = types.SimpleNamespace(url=f"http://127.0.0.1:{ports.get(timeout=10)}", token=token)
    (tmp / "trainer.py").write_text(BIG_CHECKPOINT_TRAINER)
    common = {"hf_repo": "tester/bench-standby", "require_dataset_state": False, "hf_sync_interval_seconds": 1,
              "trainer_command": f"{sys.executable} {tmp / 'trainer.py'}"}
    measured = {}
    try:
        cluster.start_commander(lease=ttl)
        holder = cluster.start_worker("a", l1_root=str(tmp / "pod-a"), **common)
        wait_for("the checkpoint on the Hub", lambda: (cluster.run("r1").get("hub") or {}).get("iteration") == 1, 120)
        for standby, prefetch in (("b", False), ("c", True)):
            proc = cluster.start_worker(standby, l1_root=str(tmp / f"pod-{standby}"), hf_prefetch=prefetch, **common)
            ready = "prefetched checkpoint" if prefetch else "standing by"
            wait_for(f"{standby}: {ready}", lambda s=standby, r=ready: r in cluster.log(s), 60)
            killed = time.time()
            os.kill(holder.pid, signal.SIGKILL)
            wait_for(f"{standby}'s trainer", lambda s=standby: cluster.trainer_pids(worker_id=s), 120, 0.01)
            running = time.time() - killed
            measured[prefetch] = (running, cluster.run("r1")["leases"][-1]["started_at"] - killed)
            holder = proc
    finally:
        cluster.close()
        server.terminate()
        server.join()
    (with_prefetch, granted), (without, granted_without) = measured[True], measured[False]
    return [(f"standby takeover, {STANDBY_CHECKPOINT_MB} MB checkpoint, Hub at {POD_DOWNLOAD_MB_PER_S} MB/s "
             f"(TTL {ttl:g} s): holder's death to the standby's trainer running",
             f"prefetched while standing by: {with_prefetch:.2f} s (lease granted after {granted:.2f} s)",
             f"without prefetch: {without:.2f} s (lease granted after {granted_without:.2f} s)")]


# --------------------------------------------------------------------------- the trainer's environment on a member

ENV_REQUIREMENTS = ("torch==2.13.0+cpu", "ray[default]==2.60.0", "numpy")  # a stand-in for slime's (much larger) Python
LOCAL_TORCH_WHEELS = "/opt/wheels"  # this machine's CPU torch wheel (PyPI's torch is a CUDA build of several GB)
PYPI = ["--isolated", "--disable-pip-version-check", "--index-url", "https://pypi.org/simple",
        "--find-links", LOCAL_TORCH_WHEELS]  # --isolated: no pip config, so no local mirror in between


def timed(command: list[str] | str, **kwargs: object) -> float:
    os.sync()  # the writes of the step before are not this one's to flush
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, **kwargs)
    return time.perf_counter() - started


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / (1 << 20)


def lock_file(wheels: Path) -> str:
    """A pip lock: one pinned line with its sha256 per wheel `pip download` chose (the name and
    version are the first two fields of a wheel's file name)."""
    lines = []
    for wheel in sorted(wheels.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        lines.append(f"{name}=={version} --hash=sha256:{relay.sha256_file(str(wheel))}")
    return "\n".join(lines) + "\n"


def new_venv_with_lock(env: Path, lock: Path, source: list[str]) -> float:
    """What a member does on the lock route: a new venv, then `pip install --no-deps` of the lock."""
    os.sync()
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    subprocess.run([str(env / "bin" / "python"), "-m", "pip", "install", "-q", "--no-cache-dir", "--no-deps",
                    "--require-hashes", "-r", str(lock), *source], check=True)
    return time.perf_counter() - started


def check_env_imports(env: Path) -> None:
    subprocess.run([str(env / "bin" / "python"), "-c", "import numpy, ray, torch; torch.ones(2).numpy()"], check=True)


def archive_through_hub(archive: Path, env: Path, endpoint: str, token: str, out: multiprocessing.Queue) -> None:
    """In a fresh interpreter (HF_ENDPOINT is read at import): the real huggingface_hub + hf_xet
    uploads the archive once, then a member downloads it and unpacks it where it was packed."""
    os.environ.update(HF_ENDPOINT=endpoint, HF_TOKEN=token, HF_HOME=str(archive.parent / "hf-home"),
                      HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    from huggingface_hub import HfApi, hf_hub_download

    api, repo = HfApi(), "tester/slime-env"
    api.create_repo(repo, private=True)
    started = time.perf_counter()
    api.upload_file(path_or_fileobj=str(archive), path_in_repo=archive.name, repo_id=repo)
    upload = time.perf_counter() - started
    xet = any(getattr(entry, "xet_hash", None) for entry in api.list_repo_tree(repo) if entry.path == archive.name)
    shutil.rmtree(env)  # the member: no environment, only the lium-cluster image
    started = time.perf_counter()
    path = hf_hub_download(repo, archive.name, local_dir=str(archive.parent / "member"))
    download = time.perf_counter() - started
    unpack = timed(f"zstd -dc {shlex.quote(path)} | tar -x -C {shlex.quote(str(env.parent))}", shell=True)
    out.put((upload, xet, download, unpack))


class QuietFileHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def bench_env_route(tmp: Path) -> list[tuple[str, str, str]]:
    """The routes by which slime's Python could reach a cluster member that runs only Lium's
    cluster image, on one stand-in environment (torch CPU + ray[default] in a venv): pip from a
    lock (PyPI, then a local wheel cache), a packed archive through the Hub stand-in (real
    huggingface_hub + hf_xet), and node 0 streaming it to a member over loopback HTTP."""
    if shutil.which("zstd") is None or shutil.which("curl") is None:
        raise SystemExit("env-route needs zstd and curl (apt-get install zstd curl)")
    wheels, lock = tmp / "wheels", tmp / "lock.txt"
    resolve = timed([sys.executable, "-m", "pip", "download", "-q", "--no-cache-dir", *PYPI, "-d", str(wheels),
                     *ENV_REQUIREMENTS])
    lock.write_text(lock_file(wheels))
    wheels_mb = folder_mb(wheels)
    torch_mb = sum(w.stat().st_size for w in wheels.glob("torch-*.whl")) / (1 << 20)
    download = timed([sys.executable, "-m", "pip", "download", "-q", "--no-cache-dir", "--no-deps", "--require-hashes",
                      *PYPI, "-d", str(tmp / "wheels-again"), "-r", str(lock)])
    from_pypi = new_venv_with_lock(tmp / "from-pypi", lock, PYPI)
    shutil.rmtree(tmp / "from-pypi")
    env = tmp / "slime-env"  # a venv is not relocatable: it is packed and unpacked at this path
    from_cache = new_venv_with_lock(env, lock, ["--isolated", "--no-index", "--find-links", str(wheels)])
    check_env_imports(env)
    env_mb = folder_mb(env)
    archive = tmp / "archive" / "slime-env.tar.zst"
    archive.parent.mkdir()
    pack = timed(f"tar -c -C {shlex.quote(str(env.parent))} {env.name} | zstd -q -T0 -o {shlex.quote(str(archive))}",
                 shell=True)
    archive_mb = archive.stat().st_size / (1 << 20)

    token = "hf_bench_token_0123456789"
    ports: multiprocessing.Queue = multiprocessing.Queue()
    server = multiprocessing.Process(target=serve_hub, args=(ports, token), daemon=True)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{ports.get(timeout=10)}"
        spawn = multiprocessing.get_context("spawn")
        results: multiprocessing.Queue = spawn.Queue()
        child = spawn.Process(target=archive_through_hub, args=(archive, env, endpoint, token, results))
        child.start()
        upload, xet, hub_download, hub_unpack = results.get(timeout=1800)
        child.join()
    finally:
        server.terminate()
        server.join()
    check_env_imports(env)

    # The overlay route: node 0 serves the archive, a member streams it straight into tar.
    node0 = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietFileHandler, directory=str(archive.parent)))
    threading.Thread(target=node0.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{node0.server_address[1]}/{archive.name}"
        started = time.perf_counter()
        with urllib.request.urlopen(url) as response:
            while response.read(1 << 20):
                pass
        stream = time.perf_counter() - started
        shutil.rmtree(env)
        streamed_unpack = timed(f"curl -sf {url} | zstd -dc | tar -x -C {shlex.quote(str(env.parent))}", shell=True)
    finally:
        node0.shutdown()
        node0.server_close()
    check_env_imports(env)

    what = (f"a venv of {' + '.join(ENV_REQUIREMENTS)}: {len(lock.read_text().splitlines())} wheels, "
            f"{wheels_mb:.0f} MB of wheels ({torch_mb:.0f} MB torch from this disk), {env_mb:.0f} MB installed")
    hub_total = hub_download + hub_unpack
    return [
        (f"env route: the environment ({what})", f"zstd archive {archive_mb:.0f} MB (packed in {pack:.1f} s, "
         f"{env_mb / pack:.0f} MB/s)", "figure only"),
        ("env route (a): pip install --no-deps --require-hashes -r lock.txt into a new venv, from PyPI",
         f"{from_pypi:.1f} s ({env_mb / from_pypi:.0f} MB/s installed)",
         f"the wheels alone from PyPI: {download:.1f} s ({(wheels_mb - torch_mb) / download:.0f} MB/s over the network; "
         f"resolving + downloading the first time {resolve:.1f} s)"),
        ("env route (a): the same from a local wheel cache (--no-index --find-links)",
         f"{from_cache:.1f} s ({env_mb / from_cache:.0f} MB/s installed)",
         f"install only: {from_cache / from_pypi:.2f} of the PyPI route's time"),
        (f"env route (b): archive on the Hub stand-in (hf_xet: {'yes' if xet else 'NO'}), hf_hub_download + "
         "unpacked (zstd -d into tar -x), imports torch and ray",
         f"{hub_total:.1f} s (download {hub_download:.1f} s, {archive_mb / hub_download:.0f} MB/s; unpack "
         f"{hub_unpack:.1f} s, {env_mb / hub_unpack:.0f} MB/s written)",
         f"the one-time upload: {upload:.1f} s ({archive_mb / upload:.0f} MB/s); pip from the cache {from_cache:.1f} s"),
        ("env route (c): node 0 serves the archive over HTTP to a member on loopback",
         f"{archive_mb / stream:.0f} MB/s read ({stream:.2f} s); streamed into zstd -d and tar -x: {streamed_unpack:.1f} s",
         "figure only (a real overlay: its NIC's rate)"),
    ]


# --------------------------------------------------------------------------- main

PARTS = {"renewals": bench_renewals, "hostile": bench_hostile, "tls": bench_tls, "viewers": bench_viewers, "takeover": bench_takeover,
         "slime-stop": bench_slime_stop, "ray-nodes": bench_ray_nodes, "footprint": bench_footprint, "hub": bench_hub, "standby": bench_standby,
         "gather": bench_gather, "env-route": bench_env_route}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("parts", nargs="*", metavar="PART",
                        help=f"which figures to measure: {', '.join(PARTS)} (default: all)")
    chosen = parser.parse_args(argv).parts or list(PARTS)
    for name in chosen:
        if name not in PARTS:
            parser.error(f"unknown part {name!r} (choose from {', '.join(PARTS)})")
    rows = []
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        for name in chosen:
            part = Path(tmp) / name
            part.mkdir()
            print(f"running {name} ...", file=sys.stderr, flush=True)
            rows += PARTS[name](part)
    print(f"\nrelay-trainer {relay.VERSION} on {os.cpu_count()} cores, Python {sys.version.split()[0]}\n")
    print("| figure | measured | baseline / target |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
