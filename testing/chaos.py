"""Chaos: one run, three competing workers, a local Hub, seeded random faults for a fixed time.

    python -m testing.chaos --seconds 300 --seed 7    # the long version; test_relay.py runs a short one

Faults: SIGKILL of the holder's worker; of its whole pod (worker, watchdog and trainer at
once); of its watchdog; SIGSTOP of its worker for longer than the TTL, then SIGCONT; SIGKILL
of the commander and a restart (at once, or after longer than the TTL); Hub errors (500, 429)
and stalls; a full disk on one worker's L1 (a small tmpfs in a private mount namespace; the
fault is left out where `unshare --mount` is not allowed).  Attacker faults: more idle,
dripping and half-handshaken connections than the commander's file limit allows (it runs
with 256 open files); floods of oversized headers and bodies; a man in the middle on every
worker's path (testing/mitm_proxy.py, forwarding honestly between faults) forging 409s,
grants and stretched TTLs; the same path holding every answer back, around the lease's margin
(`net-delay`).  The commander has a shared secret, as on the internet.  Each worker has its own L1
folder, so a handoff restores from L1 or from the Hub.  The faults come in rounds, each kind
once a round in a seeded order, so a run of one round has met every kind.

Invariants, checked from outside: (1) at no instant do two trainers of the run execute
(each trainer's birth and end, exactly, against the grants); (2) the commander's latest
checkpoint is retrievable at the end, every file of it with the SHA-256 its manifest names,
and every Hub revision it ever recorded still holds its checkpoint; (3) epochs only grow,
and so does the recorded checkpoint; (4) the run completes and its final model.json equals an
uninterrupted run's; (5) the commander's state file always parses.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from testing.harness import Cluster, TrainerOverlapMonitor, environ_of, free_port, reference_model, relay, wait_for
from testing.hub_server import Fault, HubServer

WORKERS = ("w1", "w2", "w3")
FAULTS = ("kill-worker", "kill-pod", "kill-watchdog", "stop-worker", "restart-commander", "commander-down",
          "hub-errors", "hub-stall", "disk-full", "conn-flood", "header-flood", "mitm", "net-delay")
COMMANDER_FILE_LIMIT = 256  # so that a few hundred hostile connections are more than it may open
SMALL_DISK = "w3"  # its L1 is a 4 MB tmpfs in a mount namespace of its own, which "disk-full" fills
HUB_REPO = "tester/chaos"


@dataclass
class ChaosReport:
    seed: int
    ttl: float
    faults: collections.Counter = field(default_factory=collections.Counter)
    cannot_run_here: set[str] = field(default_factory=set)  # kinds this machine does not allow
    violations: list[str] = field(default_factory=list)
    takeovers: list[float] = field(default_factory=list)  # seconds from a fault to the next grant
    completed: bool = False

    def summary(self) -> str:
        kinds = " ".join(f"{k}={v}" for k, v in sorted(self.faults.items())) or "none"
        takeover = "none"
        if self.takeovers:
            multiples = [t / self.ttl for t in self.takeovers]
            takeover = f"median {statistics.median(multiples):.2f} x TTL, max {max(multiples):.2f} x TTL"
        return (f"chaos seed={self.seed} ttl={self.ttl:g}s faults: {kinds}; violations: {len(self.violations)}; "
                f"takeovers ({len(self.takeovers)}): {takeover}; completed: {self.completed}")


class StateSampler:
    """Reads the commander's state file and run record continuously: invariants 3 and 5."""

    def __init__(self, cluster: Cluster, report: ChaosReport) -> None:
        self.cluster, self.report = cluster, report
        self.hub_records: dict[str, dict] = {}
        self.last_epoch = 0
        self.last_checkpoint = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                raw = open(self.cluster.state_path, "rb").read()
            except FileNotFoundError:
                continue
            try:
                run = json.loads(raw)["runs"].get("r1")
            except (ValueError, KeyError) as exc:
                self.report.violations.append(f"state file did not parse: {exc}")
                continue
            if not run:
                continue
            if run["epoch"] < self.last_epoch:
                self.report.violations.append(f"epoch went back from {self.last_epoch} to {run['epoch']}")
            self.last_epoch = max(self.last_epoch, run["epoch"])
            checkpoint = (run.get("latest_checkpoint") or {}).get("iteration", -1)
            if checkpoint < self.last_checkpoint:
                self.report.violations.append(f"the recorded checkpoint went back from {self.last_checkpoint} to {checkpoint}")
            self.last_checkpoint = max(self.last_checkpoint, checkpoint)
            if run.get("hub"):
                self.hub_records[run["hub"]["revision"]] = run["hub"]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class Chaos:
    def __init__(self, tmp: Path, seed: int, seconds: float, ttl: float, steps: int = 0) -> None:
        self.tmp, self.seconds, self.ttl = tmp, seconds, ttl
        self.rng = random.Random(seed)
        self.report = ChaosReport(seed, ttl)
        self.steps = steps or max(60, int(seconds * 10))
        self.secret = random.Random(seed).randbytes(32).hex()
        self.forge_switch = tmp / "forge"  # the man in the middle forges while this file exists
        self.delay_file = tmp / "delay"  # and holds every answer back by what this file says while it exists
        self.schedule: list[str] = []  # the faults left in this round
        self.proxy_url = ""
        self.watcher: relay.CommanderClient | None = None
        self.hub = HubServer().start()
        self.cluster = Cluster(tmp)
        self.cluster.hub = self.hub
        self.workers: dict[str, object] = {}
        self.fillers: list[Path] = []
        self.small_disks = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                           "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True).returncode == 0

    def start_worker(self, name: str) -> None:
        l1 = self.tmp / f"l1-{name}"
        fields = {"l1_root": str(l1), "hf_repo": HUB_REPO, "hf_sync_interval_seconds": 1, "stop_grace_seconds": 1,
                  "commander_url": self.proxy_url}
        env = {"MOCK_MAX_STEPS": str(self.steps), "MOCK_STEP_SECONDS": "0.05", "CHAOS_POD": name}
        if name != SMALL_DISK or not self.small_disks:
            self.workers[name] = self.cluster.start_worker(name, env=env, **fields)
            return
        l1.mkdir(exist_ok=True)
        config = self.cluster.write_config(name, **fields)
        worker_env = self.cluster.env(**env, HF_ENDPOINT=self.hub.url, HF_TOKEN=self.hub.token,
                                      HF_HOME=str(self.tmp / f"hf-home-{name}"), RELAY_SHARED_SECRET=self.secret)
        script = (f"mount -t tmpfs -o size=4m tmpfs {l1} && exec {sys.executable} {Path(relay.__file__)} "
                  f"worker {config}")
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], stdout=log,
                                stderr=subprocess.STDOUT, env=worker_env, start_new_session=True, cwd=self.tmp)
        self.cluster.procs.append(proc)
        self.workers[name] = proc

    def fill_small_disk(self) -> None:
        """Fill w3's tmpfs from outside its mount namespace, through /proc/PID/root."""
        proc = self.workers.get(SMALL_DISK)
        if proc is None or proc.poll() is not None:
            return
        filler = Path(f"/proc/{proc.pid}/root") / str(self.tmp / f"l1-{SMALL_DISK}").lstrip("/") / "filler"
        with contextlib.suppress(OSError), open(filler, "wb") as handle:
            while True:
                handle.write(b"\0" * (1 << 16))
        self.fillers.append(filler)

    def free_small_disk(self) -> None:
        for filler in self.fillers:
            with contextlib.suppress(OSError):
                filler.unlink()
        self.fillers.clear()

    def pod_pids(self, name: str) -> list[int]:
        return [pid for pid in relay.processes_with_env(f"CHAOS_POD={name}") if environ_of(pid).get("RELAY_TEST_MARK") ==
                self.cluster.mark]

    def record(self) -> dict:
        """The run's record ({} when the commander does not answer): over one kept-alive
        connection, which a flood of hostile connections does not shut out."""
        if self.watcher is None:
            self.watcher = self.cluster.client()
        try:
            reply = self.watcher.get("/api/runs/r1")
        except relay.CommanderUnreachable:
            return {}
        return reply.body if reply.status == 200 else {}

    def holder(self) -> str:
        return self.record().get("holder", "")

    def start_commander(self) -> None:
        self.cluster.start_commander(lease=self.ttl, secret=self.secret,
                                     wrap=("prlimit", f"--nofile={COMMANDER_FILE_LIMIT}:{COMMANDER_FILE_LIMIT}", "--"))

    def start_proxy(self) -> None:
        port = free_port()
        self.cluster.spawn("proxy", ["--port", str(port), "--commander", self.cluster.url, "--switch",
                                     str(self.forge_switch), "--delay-file", str(self.delay_file)],
                           module="testing.mitm_proxy")
        wait_for("the man in the middle to listen", lambda: "proxy on" in self.cluster.log("proxy"))
        self.proxy_url = f"http://127.0.0.1:{port}"

    def hostile(self, *counts: str) -> None:
        """Hostile connections for two TTLs, in a process of their own (it ends by itself)."""
        self.cluster.spawn("hostile", ["--port", str(self.cluster.port), "--seconds", str(2 * self.ttl), *counts],
                           module="testing.hostile_clients")

    def next_fault(self) -> str:
        """The next fault of this round (each kind once a round, in a seeded order)."""
        if not self.schedule:
            self.schedule = list(FAULTS)
            self.rng.shuffle(self.schedule)
        return self.schedule.pop()

    def inject(self, kind: str) -> None:
        with self.hub.lock:
            self.hub.faults.clear()  # a Hub outage lasts until the next fault, as outages last a while
        self.free_small_disk()  # so does a full disk
        if kind == "disk-full" and not self.small_disks:
            self.report.cannot_run_here.add(kind)
            return
        record = self.record()
        holder, epoch = record.get("holder", ""), record.get("epoch", 0)
        proc = self.workers.get(holder)
        started = time.time()
        if kind in ("kill-worker", "kill-pod", "kill-watchdog", "stop-worker") and proc is None:
            self.schedule.append(kind)  # nobody holds the run right now: later in this round
            return
        self.report.faults[kind] += 1
        if kind == "kill-worker":
            os.kill(proc.pid, signal.SIGKILL)
        elif kind == "kill-pod":
            for pid in self.pod_pids(holder):
                os.kill(pid, signal.SIGKILL)
        elif kind == "kill-watchdog":
            for pid in self.pod_pids(holder):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "relay-watchdog":
                    os.kill(pid, signal.SIGKILL)
        elif kind == "stop-worker":
            os.kill(proc.pid, signal.SIGSTOP)
            time.sleep(self.ttl * self.rng.uniform(1.2, 2.0))
            os.kill(proc.pid, signal.SIGCONT)
        elif kind in ("restart-commander", "commander-down"):
            os.killpg(self.cluster.commander.pid, signal.SIGKILL)
            self.cluster.commander.wait()
            time.sleep(0.2 if kind == "restart-commander" else self.ttl * 1.5)
            self.start_commander()
        elif kind == "hub-errors":
            self.hub.inject(Fault("/commit/", status=500, count=self.rng.randint(1, 3)))
            self.hub.inject(Fault("/preupload/", status=429, count=1, retry_after=1))
        elif kind == "hub-stall":
            self.hub.inject(Fault("/api/models/", status=0, delay=self.ttl, count=2))
        elif kind == "disk-full":
            self.fill_small_disk()
        elif kind == "conn-flood":
            self.hostile("--idle", "200", "--drip", "100", "--half-tls", "50")
        elif kind == "header-flood":
            self.hostile("--big-headers", "40", "--big-bodies", "40")
        elif kind == "mitm":
            self.forge_switch.touch()
            time.sleep(self.ttl * self.rng.uniform(1.5, 3.0))
            self.forge_switch.unlink()
        elif kind == "net-delay":  # around the margin: late answers believed, or renewals timing out
            self.delay_file.write_text(f"{relay.lease_margin(self.ttl) * self.rng.uniform(0.5, 2.5):.3f}")
            time.sleep(self.ttl * self.rng.uniform(1.5, 3.0))
            self.delay_file.unlink()
        if kind in ("kill-worker", "kill-pod", "stop-worker"):
            self.measure_takeover(epoch, started)
        for name, worker in self.workers.items():  # a replaced pod: its worker comes back
            if worker.poll() is not None and self.record().get("status") != "COMPLETED":
                self.start_worker(name)

    def measure_takeover(self, epoch: int, since: float) -> None:
        try:
            wait_for("a new grant", lambda: self.record().get("epoch", 0) > epoch, self.ttl * 6, 0.02)
        except AssertionError:
            self.report.violations.append(f"no takeover within {6 * self.ttl:g} s after a fault at epoch {epoch}")
            return
        lease = next(lease for lease in self.record()["leases"] if lease["epoch"] == epoch + 1)
        self.report.takeovers.append(max(0.0, lease["started_at"] - since))

    def run(self) -> ChaosReport:
        try:
            self.start_commander()
            self.start_proxy()
            for name in WORKERS:
                self.start_worker(name)
            sampler = StateSampler(self.cluster, self.report)
            with TrainerOverlapMonitor(self.cluster) as monitor:
                stop_faults = time.monotonic() + self.seconds
                while ((time.monotonic() < stop_faults or self.schedule or not self.report.faults)
                       and self.record().get("status") != "COMPLETED"):
                    time.sleep(self.ttl * self.rng.uniform(0.5, 1.5))
                    self.inject(self.next_fault())
                with self.hub.lock:
                    self.hub.faults.clear()
                self.free_small_disk()
                try:
                    wait_for("the run to complete", lambda: self.record().get("status") == "COMPLETED",
                             180 + self.steps * 0.05)
                    self.report.completed = True
                except AssertionError as exc:
                    self.report.violations.append(str(exc))
            sampler.stop()
            if monitor.overlaps:
                self.report.violations.append(f"two trainers at once, epochs {monitor.overlaps[0]}")
            self.check_the_end(sampler)
        finally:
            self.cluster.close()
            self.hub.stop()
        return self.report

    def check_the_end(self, sampler: StateSampler) -> None:
        run = self.record()
        epochs = [lease["epoch"] for lease in run["leases"]]
        if epochs != sorted(set(epochs)):
            self.report.violations.append(f"lease epochs not strictly growing: {epochs}")
        if not self.retrievable(run["latest_checkpoint"], run.get("hub") or {}):
            self.report.violations.append(f"acknowledged checkpoint {run['latest_checkpoint']} is whole neither in any "
                                          "L1 nor on the Hub")
        for revision, record in sampler.hub_records.items():
            files = self.hub.files_at(HUB_REPO, revision)
            manifest = f"runs/r1/ckpt/{relay.iteration_dirname(record['iteration'])}/relay_manifest.json"
            if manifest not in files or relay.Manifest.from_bytes(files[manifest]).digest != record["manifest_sha256"]:
                self.report.violations.append(f"recorded Hub revision {revision[:12]} lacks checkpoint {record['iteration']}")
        final = [self.tmp / f"l1-{name}" / "runs" / "r1" / "ckpt" / relay.iteration_dirname(self.steps) / "model.json"
                 for name in WORKERS]
        produced = {str(path): path.read_bytes() for path in final if path.exists()}
        hub = run.get("hub") or {}
        if hub.get("iteration") == self.steps:  # w3's L1 is a tmpfs gone with its namespace: the Hub holds its copy
            files = self.hub.files_at(HUB_REPO, hub["revision"])
            produced[f"hub@{hub['revision'][:12]}"] = files.get(f"runs/r1/ckpt/{relay.iteration_dirname(self.steps)}/model.json")
        expected = reference_model(self.tmp, self.steps)
        if not produced:
            self.report.violations.append(f"no copy of the final model at all (run {run['status']}, hub {hub})")
        for where, model in produced.items():
            if model != expected:
                self.report.violations.append(f"the final model in {where} differs from an uninterrupted run's")


    def retrievable(self, recorded: dict, hub: dict) -> bool:
        """The acknowledged checkpoint, read back where a restore would find it (a worker's
        L1, or the Hub at the recorded revision): its manifest is the one recorded and every
        file has the size and SHA-256 the manifest names."""
        iteration = recorded["iteration"]
        copies = []
        for name in WORKERS:
            ckpt = relay.CheckpointDir(str(self.tmp / f"l1-{name}" / "runs" / "r1"), True)
            manifest = ckpt.load_manifest(iteration)
            if manifest is not None:
                read = {rel: (Path(ckpt.path) / rel).read_bytes() if (Path(ckpt.path) / rel).exists() else None
                        for rel in manifest.files}
                copies.append((manifest, read))
        if hub.get("iteration") == iteration:
            files = self.hub.files_at(HUB_REPO, hub["revision"])
            raw = files.get(f"runs/r1/ckpt/{relay.iteration_dirname(iteration)}/relay_manifest.json")
            if raw is not None:
                manifest = relay.Manifest.from_bytes(raw)
                copies.append((manifest, {rel: files.get(f"runs/r1/ckpt/{rel}") for rel in manifest.files}))
        return any(manifest.digest == recorded["manifest_sha256"] and all(
            data is not None and [len(data), hashlib.sha256(data).hexdigest()] == list(manifest.files[rel])
            for rel, data in read.items()) for manifest, read in copies)


def run_chaos(tmp: Path, seed: int, seconds: float, ttl: float = 2.0, steps: int = 0) -> ChaosReport:
    return Chaos(tmp, seed, seconds, ttl, steps).run()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--seed", type=int, default=random.SystemRandom().randrange(10**6))
    parser.add_argument("--ttl", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=0, help="the run's length (default: 10 per second of faults)")
    parser.add_argument("--keep", action="store_true", help="keep the workers' logs and L1 folders, and say where")
    args = parser.parse_args()
    if args.keep:
        tmp = tempfile.mkdtemp(prefix="relay-chaos-")
        report = run_chaos(Path(tmp), args.seed, args.seconds, args.ttl, args.steps)
        print(f"kept in {tmp}")
    else:
        with tempfile.TemporaryDirectory(prefix="relay-chaos-") as tmp:
            report = run_chaos(Path(tmp), args.seed, args.seconds, args.ttl, args.steps)
    print(report.summary())
    for violation in report.violations:
        print(f"VIOLATION: {violation}")
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
