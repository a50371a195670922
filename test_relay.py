"""What relay-trainer promises its users, one behaviour per test.

Real processes on loopback: a commander, workers, their watchdogs and trainers.  The helpers
in testing/ start them, mark them, and kill exactly them at the end of each test.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import http.client
import http.server
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from testing.harness import (RELAY, Cluster, PidNamespace, TrainerOverlapMonitor, free_port, ray_slime_env,
                             ray_slime_multinode_env, ray_slime_node_environments, reference_model, relay, wait_for)

FAKE_CLIS = os.path.join(os.path.dirname(RELAY), "testing", "bin")  # a stand-in for `nvidia-smi`

# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()
        c.print_logs()  # shown by pytest only when the test failed


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> bytes:
    return reference_model(tmp_path_factory.mktemp("reference"))


def final_model(cluster: Cluster, run_id: str = "r1", l1: str = "volume", steps: int = 40) -> bytes:
    return (cluster.ckpt_dir(run_id, l1) / relay.iteration_dirname(steps) / "model.json").read_bytes()


def completed(cluster: Cluster, run_id: str = "r1") -> dict:
    run = cluster.run(run_id)
    return run if run.get("status") == "COMPLETED" else {}


def checkpoint_at_least(cluster: Cluster, iteration: int, run_id: str = "r1") -> bool:
    return (cluster.run(run_id).get("latest_checkpoint") or {}).get("iteration", -1) >= iteration


def resumed_from(run: dict, worker_id: str) -> list[str]:
    return [e["msg"] for e in run["events"] if e["msg"].startswith(f"{worker_id} resumes from")]


def raw_request(cluster: Cluster, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", cluster.port, timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read(), dict(resp.getheaders())
    finally:
        conn.close()


# --------------------------------------------------------------------------- the demo


def test_demo_relays_a_run_through_a_kill_and_proves_the_result_equals_an_uninterrupted_run(tmp_path, reference):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "MOCK_"))}
    result = subprocess.run([sys.executable, RELAY, "demo", "--keep"], capture_output=True, text=True, env=env,
                            timeout=90)
    kept = re.search(r"demo files kept in (\S+)", result.stdout)
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SIGKILL -> worker-a" in result.stdout and "worker-b took over" in result.stdout
        assert "identical: the relayed run equals an uninterrupted run" in result.stdout
        # not on the demo's word: its relayed result against our own uninterrupted run
        timeline = re.findall(r"epoch (\d+)\s+(worker-\w)\s+steps\s+(\d+) ->", result.stdout)
        assert [(epoch, worker) for epoch, worker, _ in timeline] == [("1", "worker-a"), ("2", "worker-b")]
        assert 0 < int(timeline[1][2]) < 40  # worker-b resumed mid-run, not from the start
        relayed = Path(kept.group(1)) / "volume" / "runs" / "demo" / "ckpt" / relay.iteration_dirname(40)
        assert (relayed / "model.json").read_bytes() == reference
    finally:
        if kept:
            shutil.rmtree(kept.group(1), ignore_errors=True)


# --------------------------------------------------------------------------- handoffs

# Tests that interrupt worker a mid-run pace its trainer so that it is surely still running
# when the checkpoint they wait for is sealed, even on a loaded machine.
MID_RUN = {"MOCK_STEP_SECONDS": "0.1"}


def frozen_until_b_takes_over(cluster: Cluster, worker_a: subprocess.Popen) -> dict:
    """SIGSTOP worker a (its watchdog runs on) until b holds the run, with a's trainer gone by
    then; thaw a; the completed run."""
    os.kill(worker_a.pid, signal.SIGSTOP)
    try:
        wait_for("b to take over", lambda: cluster.run("r1").get("holder") == "b", timeout=10)
        assert not cluster.trainer_pids(worker_id="a")
    finally:
        os.kill(worker_a.pid, signal.SIGCONT)
    return wait_for("the run to complete", lambda: completed(cluster), 30)


def test_a_killed_worker_loses_its_trainer_and_a_standby_resumes_from_the_last_checkpoint(cluster, reference):
    cluster.start_commander(lease=2)
    with TrainerOverlapMonitor(cluster) as monitor:
        worker_a = cluster.start_worker("a", env=MID_RUN)
        wait_for("a to hold the run", lambda: cluster.run("r1").get("holder") == "a")
        worker_b = cluster.start_worker("b")
        wait_for("a sealed checkpoint 10", lambda: checkpoint_at_least(cluster, 10))
        assert cluster.trainer_pids(worker_id="a"), cluster.log("a")
        os.kill(worker_a.pid, signal.SIGKILL)
        wait_for("a's trainer to die with its worker", lambda: not cluster.trainer_pids(worker_id="a"), timeout=10)
        run = wait_for("the run to complete", lambda: completed(cluster), 30)
    assert monitor.overlaps == [], f"two trainers of one run alive at once: {monitor.overlaps[:3]}"
    assert monitor.ended["1"] <= run["leases"][1]["started_at"]  # a's trainer ended before b was granted the run
    assert [lease["worker_id"] for lease in run["leases"]] == ["a", "b"]
    resumes = resumed_from(run, "b")
    assert resumes and "cold start" not in resumes[0], resumes
    assert int(resumes[0].split("checkpoint ")[1].split()[0]) >= 10
    assert final_model(cluster) == reference
    assert worker_b.wait(30) == 0


def test_a_frozen_worker_has_its_trainer_killed_before_the_run_is_granted_to_anyone_else(cluster, reference):
    cluster.start_commander(lease=2)
    with TrainerOverlapMonitor(cluster) as monitor:
        worker_a = cluster.start_worker("a", env=MID_RUN)
        wait_for("a sealed checkpoint 5", lambda: checkpoint_at_least(cluster, 5))
        worker_b = cluster.start_worker("b")
        run = frozen_until_b_takes_over(cluster, worker_a)  # the worker alone: its watchdog keeps running
    assert monitor.overlaps == [], f"two trainers of one run alive at once: {monitor.overlaps[:3]}"
    assert {"1", "2"} <= monitor.epochs_seen
    assert monitor.ended["1"] <= run["leases"][1]["started_at"]  # a's trainer ended before b was granted the run
    assert final_model(cluster) == reference
    assert worker_a.wait(30) == 0  # thawed, it finds its lease gone, stands by, sees COMPLETED
    assert worker_b.wait(30) == 0


@pytest.mark.slow(45)
def test_answers_held_back_past_the_margin_still_end_the_trainer_before_the_commander_lets_the_lease_go(cluster):
    """The worker's deadline counts from when it SENT a renewal, never from the answer: the
    commander's expiry counts from when it received it, which is later."""
    from testing.wire_proxy import WireProxy

    ttl = 15.0  # margin 3 s; a renewal every 5 s, each waiting up to 5 s for its answer
    margin = relay.lease_margin(ttl)
    cluster.start_commander(lease=ttl)
    path = WireProxy(cluster.port).start()
    path.answer_delay = margin + 1.2  # a deadline counted from the answer would outlive the commander's expiry
    try:
        with TrainerOverlapMonitor(cluster) as monitor:
            cluster.start_worker("a", commander_url=path.url, env={"MOCK_STEP_SECONDS": "0.2", "MOCK_MAX_STEPS": "1000"})
            wait_for("a to renew through the slow path", lambda: len(path.renewals_forwarded) >= 2, 60)
            cluster.start_worker("b", env={"MOCK_MAX_STEPS": "1000"})
            path.cut_after_next_renewal_answer()  # a believes that renewal; nothing of a's reaches the commander after
            wait_for("the path to be cut", path.cut.is_set, 30)
            wait_for("b to be granted the run", lambda: cluster.run("r1").get("holder") == "b", ttl + 20)
            wait_for("a's trainer to have ended", lambda: "1" in monitor.ended, 10)
        run = cluster.run("r1")
    finally:
        path.stop()
    commander_expiry = path.renewals_forwarded[-1] + ttl  # the last renewal it received, plus the TTL
    assert monitor.ended["1"] <= commander_expiry - margin / 2, "a's trainer outlived its deadline"
    assert monitor.ended["1"] <= run["leases"][1]["started_at"]  # and so ended before b was granted the run
    assert monitor.overlaps == []
    assert run["leases"][0]["why"].startswith("expired")


def test_sigterm_releases_the_lease_so_a_standby_takes_over_well_under_the_ttl(cluster, reference):
    cluster.start_commander(lease=10)  # waiting for the lease to expire would take 10 s or more
    worker_a = cluster.start_worker("a", env=MID_RUN)
    wait_for("a sealed checkpoint 5", lambda: checkpoint_at_least(cluster, 5))
    cluster.start_worker("b")
    wait_for("b standing by", lambda: "standing by" in cluster.log("b"))
    assert [standby["worker_id"] for standby in cluster.run("r1")["standbys"]] == ["b"]
    worker_a.send_signal(signal.SIGTERM)
    wait_for("b to take over", lambda: cluster.run("r1").get("holder") == "b", timeout=10)
    assert worker_a.wait(30) == 0
    run = wait_for("the run to complete", lambda: completed(cluster), 30)
    # released, not expired: b's grant came with a's release, not after its 10 s (bench_relay.py takeover: the time)
    assert run["leases"][0]["why"].startswith("preempted")
    assert run["leases"][1]["started_at"] - run["leases"][0]["ended_at"] < 10
    assert final_model(cluster) == reference


def test_a_commander_killed_and_restarted_mid_run_keeps_the_run_going_and_never_repeats_an_epoch(cluster, reference):
    cluster.start_commander(lease=3)
    worker = cluster.start_worker("a", env={"MOCK_STEP_SECONDS": "0.1"})
    wait_for("a sealed checkpoint 5", lambda: checkpoint_at_least(cluster, 5))
    os.killpg(cluster.commander.pid, signal.SIGKILL)
    cluster.commander.wait()
    # Down for longer than the lease: the worker must stop its trainer, then come back.
    wait_for("the worker to stop its trainer without a commander", lambda: not cluster.trainer_pids(), timeout=10)
    cluster.start_commander(lease=3)
    run = wait_for("the run to complete", lambda: completed(cluster), 40)
    epochs = [lease["epoch"] for lease in run["leases"]]
    assert epochs == sorted(set(epochs)) and len(epochs) >= 2, epochs
    assert run["epoch"] == epochs[-1]
    assert final_model(cluster) == reference
    assert worker.wait(30) == 0


def test_one_commander_relays_many_runs_at_once_each_with_its_own_holder(cluster):
    cluster.start_commander(lease=3)
    run_ids = ["alpha", "beta", "gamma"]
    for n, run_id in enumerate(run_ids):
        cluster.start_worker(f"w{n}", run_id, env={"MOCK_MAX_STEPS": "60"})

    def all_held() -> bool:
        holders = {run["run_id"]: run["holder"] for run in cluster.runs()["runs"]}
        return holders == {run_id: f"w{n}" for n, run_id in enumerate(run_ids)}

    wait_for("each run held by its own worker at the same time", all_held, 20)
    for run_id in run_ids:
        wait_for(f"{run_id} to complete", lambda r=run_id: completed(cluster, r), 40)


# --------------------------------------------------------------------------- failures


def test_a_trainer_that_keeps_crashing_ends_the_run_as_failed(cluster):
    cluster.start_commander(lease=2, extra=("--max-failed-leases", "2"))
    worker = cluster.start_worker("a", trainer_command="echo boom >&2; exit 3", max_trainer_restarts=1)
    assert worker.wait(40) == 1
    run = cluster.run("r1")
    assert run["status"] == "FAILED"
    assert [lease["why"].split(":")[0] for lease in run["leases"]] == ["failed", "failed"]
    log = cluster.log("a")
    assert "[trainer] boom" in log and "trainer exited with status 3" in log
    late = cluster.start_worker("late", trainer_command="exit 3")
    assert late.wait(15) == 1


def relay_cli(cluster: Cluster, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, RELAY, *args, "--commander-url", cluster.url], capture_output=True, text=True,
                          timeout=30, env=cluster.env(**env))


@pytest.mark.slow(12)
def test_cancel_stops_the_holder_gracefully_keeps_its_checkpoint_and_no_standby_takes_over(cluster):
    secret = "s-" + uuid.uuid4().hex
    cluster.start_commander(lease=3, secret=secret)
    holder = cluster.start_worker("a", env={"MOCK_MAX_STEPS": "3000"})
    wait_for("a to hold the run and seal checkpoint 10", lambda: checkpoint_at_least(cluster, 10), 30)
    standby = cluster.start_worker("b", env={"MOCK_MAX_STEPS": "3000"})
    wait_for("b to stand by", lambda: "standing by" in cluster.log("b"), 15)
    viewer_try = relay_cli(cluster, "cancel", "r1", RELAY_VIEWER_SECRET=secret + "-not-shared")
    assert viewer_try.returncode == 2 and "needs a secret: export RELAY_SHARED_SECRET" in viewer_try.stderr
    cancel = relay_cli(cluster, "cancel", "r1", RELAY_SHARED_SECRET=secret)
    assert cancel.returncode == 0 and cancel.stdout.startswith("run r1 CANCELLED: a stops its trainer"), cancel.stderr
    assert holder.wait(30) == 0 and standby.wait(30) == 0
    assert "stopping: the run was cancelled" in cluster.log("a")
    assert "run r1 is CANCELLED; nothing to do" in cluster.log("b")
    run = cluster.run("r1")
    assert (run["status"], run["holder"]) == ("CANCELLED", "")
    assert [(lease["worker_id"], lease["why"]) for lease in run["leases"]] == [("a", "preempted: the run was cancelled")]
    sealed = run["latest_checkpoint"]["iteration"]
    assert sealed >= 10 and (cluster.tmp / "volume" / "runs" / "r1" / "sealed" / f"iter_{sealed:07d}.json").exists()
    assert not cluster.trainer_pids()


@pytest.mark.slow(12)
def test_a_failed_run_retried_goes_back_to_pending_and_the_next_worker_resumes_from_its_last_checkpoint(cluster):
    cluster.start_commander(lease=2, extra=("--max-failed-leases", "1"))
    crashing = cluster.start_worker("a", trainer_command=f"{sys.executable} {RELAY} mock-trainer; exit 3",
                                    max_trainer_restarts=0, env={"MOCK_MAX_STEPS": "12"})
    assert crashing.wait(40) == 1
    failed = cluster.run("r1")
    assert failed["status"] == "FAILED" and failed["latest_checkpoint"]["iteration"] >= 10
    early = relay_cli(cluster, "retry", "r2")
    assert early.returncode == 2 and "unknown run 'r2'" in early.stderr
    retry = relay_cli(cluster, "retry", "r1")
    assert retry.returncode == 0 and retry.stdout.startswith("run r1 is PENDING again"), retry.stderr
    assert cluster.run("r1")["status"] == "PENDING"
    again = relay_cli(cluster, "retry", "r1")
    assert again.returncode == 2 and "is PENDING: only a FAILED or CANCELLED run is retried" in again.stderr
    assert cluster.start_worker("b", env={"MOCK_MAX_STEPS": "20"}).wait(40) == 0
    run = cluster.run("r1")
    assert (run["status"], run["step"], [lease["epoch"] for lease in run["leases"]]) == ("COMPLETED", 20, [1, 2])
    resume = resumed_from(run, "b")[0]
    assert int(resume.split("checkpoint ")[1].split()[0]) == failed["latest_checkpoint"]["iteration"], resume


def watchdog_of(worker: int) -> int | None:
    for pid, info in relay.process_table().items():
        with contextlib.suppress(OSError):
            if info.ppid == worker and not info.zombie and open(f"/proc/{pid}/comm").read().strip() == "relay-watchdog":
                return pid
    return None


def test_a_dead_watchdog_is_replaced_and_the_trainer_never_runs_without_one(cluster, reference):
    cluster.start_commander(lease=3)
    worker = cluster.start_worker("a", env=MID_RUN)
    first = set(wait_for("a trainer", lambda: cluster.trainer_pids(), 20))
    dead = wait_for("a's watchdog", lambda: watchdog_of(worker.pid), 10)
    os.kill(dead, signal.SIGKILL)
    wait_for("the unguarded trainer to be stopped", lambda: not first & set(cluster.trainer_pids()), 10)
    second = set(wait_for("a trainer started again", lambda: cluster.trainer_pids(), 20))
    wait_for("a new watchdog (its name set once Python has started)",
             lambda: watchdog_of(worker.pid) not in (None, dead), 10)
    assert not first & second
    assert worker.wait(60) == 0 and final_model(cluster) == reference
    assert "the watchdog died: stopping the trainer" in cluster.log("a")


def test_a_stalled_trainer_is_killed_with_everything_it_started(cluster):
    cluster.start_commander(lease=2, extra=("--max-failed-leases", "1"))
    worker = cluster.start_worker("a", trainer_command="setsid sleep 300 & sleep 300", stall_timeout_seconds=1,
                                  max_trainer_restarts=0)
    assert worker.wait(30) == 1
    assert "trainer stalled" in cluster.log("a")
    assert cluster.run("r1")["status"] == "FAILED"
    wait_for("no trainer process left, the setsid child included", lambda: not cluster.trainer_pids(), 10)


def test_on_sigterm_a_trainer_commands_child_gets_the_grace_to_finish_its_work(cluster):
    cluster.start_commander(lease=2)
    saved = cluster.tmp / "saved"
    handler = ("import signal, sys, time, pathlib; print('step 1/9 loss 1', flush=True)\n"
               "def save(*_):\n time.sleep(1.5); pathlib.Path(sys.argv[1]).write_text('saved'); sys.exit(0)\n"
               "signal.signal(signal.SIGTERM, save); time.sleep(300)")
    worker = cluster.start_worker("a", stop_grace_seconds=6,
                                  trainer_command=f"{sys.executable} -c \"{handler}\" {saved}; echo ended")
    wait_for("the trainer to run", lambda: "[trainer] step 1/9" in cluster.log("a"), 20)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(15) == 0
    assert saved.read_text() == "saved"  # bash -c died at once; its child still had its grace


def test_a_late_worker_for_a_completed_run_goes_home_with_exit_0(cluster):
    cluster.start_commander(lease=2)
    first = cluster.start_worker("a", env={"MOCK_MAX_STEPS": "10"})
    assert first.wait(30) == 0
    assert completed(cluster)
    late = cluster.start_worker("late")
    assert late.wait(30) == 0
    assert "is COMPLETED; nothing to do" in cluster.log("late")
    assert [lease["worker_id"] for lease in cluster.run("r1")["leases"]] == ["a"]


def test_a_damaged_newest_checkpoint_is_skipped_for_an_older_sound_one(cluster, reference):
    cluster.start_commander(lease=2)
    worker_a = cluster.start_worker("a", env={"MOCK_STEP_SECONDS": "0.1"})
    wait_for("a sealed checkpoint 15", lambda: checkpoint_at_least(cluster, 15))
    worker_a.send_signal(signal.SIGTERM)
    assert worker_a.wait(30) == 0
    ckpt = relay.CheckpointDir(str(cluster.ckpt_dir().parent), True)
    sealed = ckpt.sealed_iterations()
    newest, older = sealed[-1], sealed[-2]
    (cluster.ckpt_dir() / relay.iteration_dirname(newest) / "model.json").write_text('{"step": 0}')
    cluster.start_worker("b")
    run = wait_for("the run to complete", lambda: completed(cluster), 30)
    assert resumed_from(run, "b")[0].startswith(f"b resumes from checkpoint {older} ")
    assert final_model(cluster) == reference


def test_l1_keeps_only_the_last_n_sealed_checkpoints(cluster, reference):
    cluster.start_commander(lease=2)
    worker = cluster.start_worker("a", keep_last_checkpoints=2, env={"MOCK_SAVE_EVERY": "2"})
    assert worker.wait(30) == 0
    ckpt = relay.CheckpointDir(str(cluster.ckpt_dir().parent), True)
    assert len(ckpt.sealed_iterations()) <= 2 and ckpt.sealed_iterations()[-1] == 40
    assert len(ckpt.iterations_on_disk()) <= 2
    assert final_model(cluster) == reference


# --------------------------------------------------------------------------- the commander's API


def test_a_stale_lease_can_neither_renew_nor_report_nor_release(cluster):
    cluster.start_commander(lease=2)
    client = cluster.client()
    first = client.post("/api/lease/acquire", {"run_id": "r1", "worker_id": "w1", "mode": "sft"}).body
    assert first["status"] == "granted" and first["epoch"] == 1
    second = wait_for("w2 to be granted after w1's lease expired", lambda: (lambda b: b if b["status"] == "granted"
                      else None)(client.post("/api/lease/acquire", {"run_id": "r1", "worker_id": "w2", "mode": "sft"}).body),
                      timeout=6, interval=0.2)
    assert second["epoch"] == 2
    stale = {"run_id": "r1", "worker_id": "w1", "lease_token": first["lease_token"]}
    assert client.post("/api/lease/renew", dict(stale, step=5)).status == 409
    report = {"run_id": "r1", "lease_token": first["lease_token"], "step": 99,
              "latest_ckpt": {"iteration": 99, "manifest_sha256": "0" * 64},
              "hf": {"repo": "tester/x", "revision": "a" * 40, "iteration": 99, "manifest_sha256": "0" * 64}}
    assert client.post("/api/job/report", report).status == 409
    assert client.post("/api/lease/release", dict(stale, status="COMPLETED")).status == 409
    run = cluster.run("r1")
    assert (run["holder"], run["epoch"], run["latest_checkpoint"], run["hub"], run["status"]) == (
        "w2", 2, None, None, "RUNNING")


def test_a_release_records_the_checkpoint_and_last_lines_a_lost_report_would_have_carried(cluster):
    cluster.start_commander(lease=30)
    client = cluster.client()
    token = client.post("/api/lease/acquire", {"run_id": "r1", "worker_id": "w1", "mode": "sft"}).body["lease_token"]
    final = {"iteration": 40, "manifest_sha256": "c" * 64, "bytes": 270, "files": 2}
    assert client.post("/api/lease/release", {"run_id": "r1", "worker_id": "w1", "lease_token": token,
                                              "status": "COMPLETED", "step": 40, "latest_ckpt": final,
                                              "log_lines": ["step 40/40 loss 0.1"]}).status == 200
    run = cluster.run("r1")
    assert (run["status"], run["step"], run["latest_checkpoint"]["iteration"]) == ("COMPLETED", 40, 40)
    assert run["latest_checkpoint"]["manifest_sha256"] == "c" * 64 and run["log_tail"] == ["step 40/40 loss 0.1"]


class RedirectingServer(http.server.ThreadingHTTPServer):
    """Answers every request with a 307 to `target` (a commander that moved, or a trap)."""

    def __init__(self, target: str) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                self.send_response(307)
                self.send_header("Location", target + self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_GET  # noqa: N815

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()


def test_a_redirect_is_never_followed_by_a_worker_or_status(cluster, tmp_path):
    cluster.start_commander(lease=30, secret="r" * 40)
    trap = RedirectingServer(cluster.url)  # followed, the signed request would reach a real commander
    try:
        elsewhere = f"http://127.0.0.1:{trap.server_address[1]}"
        env = {**cluster.env(), "RELAY_SHARED_SECRET": cluster.secret}
        status = subprocess.run([sys.executable, RELAY, "status", "--commander-url", elsewhere], capture_output=True,
                                text=True, timeout=30, env=env)
        config = cluster.write_config("a", commander_url=elsewhere, commander_wait_seconds=1)
        worker = subprocess.run([sys.executable, RELAY, "worker", str(config)], capture_output=True, text=True,
                                timeout=60, env=env)
    finally:
        trap.shutdown()
        trap.server_close()
    assert status.returncode == 2 and worker.returncode == 2, status.stderr + worker.stderr
    assert "Traceback" not in status.stderr + worker.stderr
    assert cluster.runs()["runs"] == []  # nothing reached the commander the redirect pointed at


def test_requests_without_a_valid_fresh_signature_get_401(cluster):
    secret = "s-" + uuid.uuid4().hex
    cluster.start_commander(lease=5, secret=secret)
    assert raw_request(cluster, "GET", "/api/health")[0] == 200
    assert raw_request(cluster, "GET", "/api/runs")[0] == 401
    with pytest.raises(relay.CommanderUnsigned) as refused:  # the commander cannot sign for a secret it lacks
        cluster.client(secret="wrong").get("/api/runs")
    assert refused.value.reply.status == 401
    assert cluster.client().get("/api/runs").status == 200
    body = json.dumps({"run_id": "r1", "worker_id": "w1", "mode": "sft"}).encode()
    headers = relay.signed_headers(secret, "POST", "/api/lease/acquire", body)
    assert raw_request(cluster, "POST", "/api/lease/acquire", body, headers)[0] == 200
    status, answer, _ = raw_request(cluster, "POST", "/api/lease/acquire", body, headers)  # replayed
    assert status == 401 and b"replayed" in answer
    tampered = relay.signed_headers(secret, "POST", "/api/lease/acquire", body)
    assert raw_request(cluster, "POST", "/api/lease/acquire", body.replace(b"w1", b"w2"), tampered)[0] == 401
    old = str(int(time.time()) - 400)
    stale = {"X-Relay-Timestamp": old, "X-Relay-Nonce": uuid.uuid4().hex,
             "X-Relay-Signature": relay.request_signature(secret, old, "a" * 32, "GET", "/api/runs", b"")}
    stale["X-Relay-Nonce"] = "a" * 32
    assert raw_request(cluster, "GET", "/api/runs", headers=stale)[0] == 401
    status, _, page_headers = raw_request(cluster, "GET", "/")
    assert status == 401 and page_headers.get("WWW-Authenticate", "").startswith("Basic")
    import base64
    basic = {"Authorization": "Basic " + base64.b64encode(f"me:{secret}".encode()).decode()}
    assert raw_request(cluster, "GET", "/", headers=basic)[0] == 200
    assert secret not in cluster.log("commander")


def self_signed_certificate(folder: Path, name: str) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key, made with the README's own openssl command."""
    cert, key = str(folder / f"{name}.crt"), str(folder / f"{name}.key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "30", "-keyout", key, "-out", cert, "-subj", f"/CN={name}",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=30)
    return cert, key


def https_request(cluster: Cluster, method: str, path: str, headers: dict | None = None):
    import ssl

    context = ssl.create_default_context(cafile=cluster.ca_file)
    conn = http.client.HTTPSConnection("127.0.0.1", cluster.port, timeout=5, context=context)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_workers_relay_a_run_through_a_tls_commander_and_a_wrong_ca_stops_a_worker_with_exit_2(cluster, tmp_path):
    cert, key = self_signed_certificate(tmp_path, "commander")
    impostor, _ = self_signed_certificate(tmp_path, "impostor")
    secret, viewer = "s-" + uuid.uuid4().hex, "v-" + uuid.uuid4().hex
    cluster.ca_file = cert
    # On every address, but reached over loopback only: TLS lets the shared secret open the page.
    cluster.start_commander(lease=3, secret=secret, extra=("--host", "0.0.0.0", "--tls-cert", cert, "--tls-key", key),
                            env={"RELAY_VIEWER_SECRET": viewer})
    assert cluster.url.startswith("https://")
    wrong = cluster.start_worker("wrong", commander_ca_file=impostor)
    assert wrong.wait(20) == 2
    lines = cluster.log("wrong").strip().splitlines()
    assert len(lines) == 1 and "failed the TLS check" in lines[0] and "Traceback" not in lines[0], lines
    worker_a = cluster.start_worker("a", env=MID_RUN, commander_ca_file=cert)
    wait_for("a sealed checkpoint 5", lambda: checkpoint_at_least(cluster, 5))
    worker_a.send_signal(signal.SIGTERM)
    assert worker_a.wait(30) == 0
    worker_b = cluster.start_worker("b", commander_ca_file=cert)
    run = wait_for("the relayed run to complete", lambda: completed(cluster), 30)
    assert worker_b.wait(30) == 0
    assert [lease["worker_id"] for lease in run["leases"]] == ["a", "b"]
    assert https_request(cluster, "GET", "/", basic_auth(secret))[0] == 200
    env = cluster.env(RELAY_VIEWER_SECRET=viewer)
    status = subprocess.run([sys.executable, RELAY, "status", "--commander-url", cluster.url, "--ca-file", cert],
                            capture_output=True, text=True, timeout=20, env=env)
    assert status.returncode == 0 and status.stdout.splitlines()[1].split()[:2] == ["r1", "COMPLETED"], status.stderr
    untrusted = subprocess.run([sys.executable, RELAY, "logs", "r1", "--commander-url", cluster.url,
                                "--ca-file", impostor], capture_output=True, text=True, timeout=20, env=env)
    assert untrusted.returncode == 2 and "failed the TLS check" in untrusted.stderr and not untrusted.stdout


def test_the_viewer_secret_opens_the_page_metrics_runs_and_logs_and_gets_401_on_every_post(cluster):
    secret, viewer = "s-" + uuid.uuid4().hex, "v-" + uuid.uuid4().hex
    cluster.start_commander(lease=30, secret=secret, env={"RELAY_VIEWER_SECRET": viewer})
    token = cluster.client().post("/api/lease/acquire", {"run_id": "r1", "worker_id": "w1", "mode": "sft"}).body["lease_token"]
    state_before = open(cluster.state_path, "rb").read()
    for path in ("/", "/metrics"):
        assert raw_request(cluster, "GET", path, headers=basic_auth(viewer))[0] == 200, path
    reader = cluster.client(secret=viewer)
    for path in ("/api/runs", "/api/runs/r1", "/api/runs/r1/logs?after=0"):
        assert reader.get(path).status == 200, path
    held = {"run_id": "r1", "worker_id": "w1", "lease_token": token}
    writes = {"/api/lease/acquire": {"run_id": "r2", "worker_id": "w2", "mode": "sft"},
              "/api/lease/renew": dict(held, step=5), "/api/job/report": dict(held, step=5, msg="viewer was here"),
              "/api/lease/release": dict(held, status="COMPLETED")}
    for path, payload in writes.items():
        answer = reader.post(path, payload)
        assert answer.status == 401 and "only read" in answer.body["error"], (path, answer)
    assert open(cluster.state_path, "rb").read() == state_before
    assert cluster.run("r1")["holder"] == "w1" and len(cluster.runs()["runs"]) == 1
    env = cluster.env(RELAY_VIEWER_SECRET=viewer)
    for command in (["status", "--run", "r1"], ["logs", "r1"]):
        result = subprocess.run([sys.executable, RELAY, *command, "--commander-url", cluster.url], capture_output=True,
                                text=True, timeout=20, env=env)
        assert result.returncode == 0, result.stderr


# Arriving "from the network" without any traffic leaving loopback: a network namespace of the
# test's own, whose loopback device also carries an address outside 127/8, with the commander
# and its client both inside.  FROM_THE_NETWORK runs in it: the page asked for with each secret.
NETWORK_ADDRESS = "192.0.2.10"
FROM_THE_NETWORK = """
import base64, http.client, json, os, subprocess, sys, time
port = 8080  # the namespace's own: no other test's
commander = subprocess.Popen([sys.executable, sys.argv[1], "serve", "--host", "0.0.0.0", "--port", str(port),
                              "--state-path", sys.argv[2]], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
try:
    for _ in range(200):
        try:
            http.client.HTTPConnection("127.0.0.1", port, timeout=1).request("GET", "/api/health")
            break
        except OSError:
            time.sleep(0.05)
    answers = {}
    for who in ("RELAY_SHARED_SECRET", "RELAY_VIEWER_SECRET"):
        for path in ("/", "/metrics"):
            conn = http.client.HTTPConnection(sys.argv[3], port, timeout=5)
            auth = base64.b64encode(("u:" + os.environ[who]).encode()).decode()
            conn.request("GET", path, headers={"Authorization": "Basic " + auth})
            answer = conn.getresponse()
            body = answer.read().decode(errors="replace")
            answers[who + " " + path] = [answer.status, answer.getheader("WWW-Authenticate", ""), body[:300]]
    print(json.dumps(answers))
finally:
    commander.kill()
"""


def test_on_plain_http_the_page_takes_the_shared_secret_over_loopback_only_and_the_viewer_secret_anywhere(cluster):
    secret, viewer = "s-" + uuid.uuid4().hex, "v-" + uuid.uuid4().hex
    # Bound to every address, as the README's setup (0.0.0.0, plain HTTP) has it.
    cluster.start_commander(lease=30, secret=secret, extra=("--host", "0.0.0.0"), env={"RELAY_VIEWER_SECRET": viewer})
    for path in ("/", "/metrics"):  # over loopback: this machine, or an SSH tunnel to it
        assert raw_request(cluster, "GET", path, headers=basic_auth(secret))[0] == 200
        assert raw_request(cluster, "GET", path, headers=basic_auth(viewer))[0] == 200
    assert cluster.client().get("/api/runs").status == 200  # signed requests never send the secret itself
    assert "the shared secret only from this machine or an SSH tunnel" in cluster.log("commander")
    # From the network: a password in clear, refused when it is the shared secret.
    script = f"ip link set lo up && ip addr add {NETWORK_ADDRESS}/32 dev lo && exec \"$@\""
    inside = subprocess.run(["unshare", "--net", "bash", "-c", script, "netns", sys.executable, "-c", FROM_THE_NETWORK,
                             RELAY, str(cluster.tmp / "netns_state.json"), NETWORK_ADDRESS],
                            capture_output=True, text=True, timeout=60, env={**cluster.env(), "RELAY_SHARED_SECRET": secret,
                                                                              "RELAY_VIEWER_SECRET": viewer})
    if inside.returncode != 0 and "unshare" in inside.stderr:
        pytest.skip(f"no network namespace of our own here: {inside.stderr.strip()}")
    answers = json.loads(inside.stdout.strip().splitlines()[-1])
    for path in ("/", "/metrics"):
        status, challenge, body = answers[f"RELAY_SHARED_SECRET {path}"]
        assert status == 401 and '{"error": "the shared secret is refused here' in body, body
        assert "plain HTTP on a public address" in body
        assert challenge.startswith("Basic")
        assert answers[f"RELAY_VIEWER_SECRET {path}"][0] == 200


def test_malformed_requests_get_a_4xx_with_an_error_and_leave_state_unchanged(cluster):
    cluster.start_commander(lease=30)
    client = cluster.client()
    token = client.post("/api/lease/acquire", {"run_id": "r1", "worker_id": "w1", "mode": "sft"}).body["lease_token"]
    state_before = open(cluster.state_path, "rb").read()

    def view() -> list:
        runs = cluster.runs()["runs"]
        for run in runs:
            run.pop("lease_expires_in_sec"), run.pop("lease_age_sec"), run.pop("standby_window_sec")  # durations
        return runs

    before = view()
    renew = {"run_id": "r1", "worker_id": "w1", "lease_token": token}
    bad_requests = [
        ("POST", "/api/lease/acquire", b"{not json"),
        ("POST", "/api/lease/acquire", b"[1, 2]"),
        ("POST", "/api/lease/acquire", b"\xff\xfe"),
        ("POST", "/api/lease/acquire", b"[" * 100000),
        ("POST", "/api/lease/acquire", json.dumps({"run_id": "../etc", "worker_id": "w", "mode": "sft"}).encode()),
        ("POST", "/api/lease/acquire", json.dumps({"run_id": 5, "worker_id": "w", "mode": "sft"}).encode()),
        ("POST", "/api/lease/acquire", json.dumps({"run_id": "r1", "worker_id": "w", "mode": "ppo"}).encode()),
        ("POST", "/api/lease/acquire", json.dumps({"run_id": "r1", "worker_id": "w9", "mode": "rl"}).encode()),
        ("POST", "/api/lease/renew", json.dumps(dict(renew, step=-1)).encode()),
        ("POST", "/api/lease/renew", json.dumps(dict(renew, step="ten")).encode()),
        ("POST", "/api/lease/renew", json.dumps(dict(renew, step=True)).encode()),
        ("POST", "/api/lease/release", json.dumps(dict(renew, status="BOGUS")).encode()),
        ("POST", "/api/job/report", json.dumps({"run_id": "r1", "lease_token": token,
                                                 "latest_ckpt": {"iteration": "x"}}).encode()),
        ("POST", "/api/job/report", json.dumps({"run_id": "r1", "lease_token": token,
                                                 "hf": {"repo": "a/b", "revision": "main", "iteration": 1}}).encode()),
        ("POST", "/api/job/report", json.dumps({"run_id": "nope", "lease_token": token}).encode()),
        ("GET", "/api/runs/nope", b""),
        ("GET", "/api/nothing-here", b""),
        ("DELETE", "/api/runs", b""),
        ("GET", "/api/lease/acquire", b""),
    ]
    for method, path, body in bad_requests:
        status, answer, _ = raw_request(cluster, method, path, body, {"Content-Type": "application/json"})
        assert 400 <= status < 500, (method, path, body[:40], status, answer[:200])
        assert "error" in json.loads(answer), answer
    assert raw_request(cluster, "POST", "/api/lease/acquire", b"{}", {"Content-Length": "abc"})[0] == 400
    oversize = http.client.HTTPConnection("127.0.0.1", cluster.port, timeout=5)
    oversize.putrequest("POST", "/api/lease/acquire")
    oversize.putheader("Content-Length", str(2 << 20))
    oversize.endheaders()  # the commander answers from the header, without reading 2 MiB
    assert oversize.getresponse().status == 413
    oversize.close()
    assert open(cluster.state_path, "rb").read() == state_before
    assert view() == before
    assert cluster.healthy()


def test_a_commander_that_cannot_write_its_state_file_answers_503_and_acknowledges_nothing_it_did_not_keep(cluster):
    # Past RLIMIT_FSIZE every write fails with EFBIG, as on a full disk (Python ignores SIGXFSZ).
    cluster.start_commander(lease=30, wrap=("prlimit", "--fsize=24000", "--"))
    client = cluster.client()
    acquired, refused = [], None
    for n in range(200):
        reply = client.post("/api/lease/acquire", {"run_id": f"r{n}", "worker_id": "w", "mode": "sft"})
        if reply.status != 200:
            refused = (f"r{n}", reply)
            break
        acquired.append(f"r{n}")
    assert refused is not None and refused[1].status == 503
    assert "cannot write its state file" in refused[1].body["error"]
    assert sorted(run["run_id"] for run in cluster.runs()["runs"]) == sorted(acquired)  # rolled back
    assert cluster.run(refused[0]) == {}
    cluster.commander.kill()
    cluster.commander.wait(10)
    cluster.start_commander(lease=30)  # no limit now: the file on disk is whole and holds what was acknowledged
    assert sorted(run["run_id"] for run in cluster.runs()["runs"]) == sorted(acquired)


def test_the_state_file_keeps_only_a_hash_of_each_lease_token(cluster):
    cluster.start_commander(lease=30)
    token = cluster.client().post("/api/lease/acquire", {"run_id": "r1", "worker_id": "w", "mode": "sft"}).body["lease_token"]
    state = Path(cluster.state_path).read_text()
    assert token not in state and relay.token_digest(token) in state


@pytest.mark.slow(15)
def test_the_commander_keeps_at_most_200_events_500_leases_and_2000_loss_points_thinned_over_the_whole_run(cluster):
    cluster.start_commander(lease=30)
    client = cluster.client()
    for n in range(510):  # each lease adds events of its own
        worker = f"w{n % 2}"
        token = client.post("/api/lease/acquire", {"run_id": "r1", "worker_id": worker, "mode": "sft"}).body["lease_token"]
        if n < 509:
            assert client.post("/api/lease/release", {"run_id": "r1", "worker_id": worker, "lease_token": token,
                                                      "status": "PREEMPTED"}).status == 200
    for batch in range(30):  # 3000 loss points, 100 a renewal
        points = [[batch * 100 + i, 1.0 / (batch * 100 + i + 1)] for i in range(100)]
        assert client.post("/api/lease/renew", {"run_id": "r1", "worker_id": worker, "lease_token": token,
                                                "step": batch * 100 + 99, "losses": points}).status == 200
    run = cluster.run("r1")
    assert len(run["events"]) == 200 and len(run["leases"]) == 500
    steps = [step for step, _ in run["losses"]]
    assert 1000 <= len(steps) <= 2000 and steps == sorted(steps)
    assert steps[0] < 100 and steps[-1] == 2999  # thinned across the run, not cut to its last part


def test_a_signed_request_from_the_future_is_refused(cluster):
    cluster.start_commander(lease=30, secret="s" * 40)
    body = json.dumps({"run_id": "r1", "worker_id": "w", "mode": "sft"}).encode()
    stamp, nonce = str(int(time.time()) + 400), uuid.uuid4().hex
    signature = relay.request_signature(cluster.secret, stamp, nonce, "POST", "/api/lease/acquire", body)
    status, answer, _ = raw_request(cluster, "POST", "/api/lease/acquire", body, {
        "X-Relay-Timestamp": stamp, "X-Relay-Nonce": nonce, "X-Relay-Signature": signature,
        "X-Relay-Protocol": str(getattr(relay, "PROTOCOL", 1)), "Content-Type": "application/json"})
    assert status == 401 and "X-Relay-Timestamp" in json.loads(answer)["error"]
    assert cluster.run("r1") == {}


def test_commander_state_is_private_and_a_corrupt_state_file_stops_it_with_a_clear_error(cluster):
    cluster.start_commander(lease=5)
    cluster.client().post("/api/lease/acquire", {"run_id": "r1", "worker_id": "w1", "mode": "sft"})
    assert stat.S_IMODE(os.stat(cluster.state_path).st_mode) == 0o600
    os.killpg(cluster.commander.pid, signal.SIGKILL)
    cluster.commander.wait()
    with open(cluster.state_path, "w") as handle:
        handle.write('{"format": "relay-commander-state", "runs": {"r1": {"run_')
    result = subprocess.run([sys.executable, RELAY, "serve", "--port", "0", "--state-path", cluster.state_path],
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 2
    assert "corrupt" in result.stderr and "Traceback" not in result.stderr
    assert open(cluster.state_path).read().endswith('"run_')  # never silently replaced


def test_serve_refuses_a_public_address_without_a_secret(tmp_path):
    result = subprocess.run([sys.executable, RELAY, "serve", "--host", "0.0.0.0", "--port", "0",
                             "--state-path", str(tmp_path / "s.json")],
                            capture_output=True, text=True, timeout=20, env={"PATH": os.environ["PATH"]})
    assert result.returncode == 2
    assert "without a shared secret" in result.stderr and "Traceback" not in result.stderr


def test_serve_refuses_a_short_shared_secret_on_a_public_address(tmp_path):
    result = subprocess.run([sys.executable, RELAY, "serve", "--host", "0.0.0.0", "--port", "0",
                             "--state-path", str(tmp_path / "s.json")], capture_output=True, text=True, timeout=20,
                            env={"PATH": os.environ["PATH"], "RELAY_SHARED_SECRET": "sixteen-bytes-ok"})
    assert result.returncode == 2 and "at least 32" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_state_file_field_of_the_wrong_type_stops_the_commander_at_start_with_a_clear_error(cluster):
    cluster.start_commander(lease=5)
    cluster.client().post("/api/lease/acquire", {"run_id": "r1", "worker_id": "w1", "mode": "sft"})
    os.killpg(cluster.commander.pid, signal.SIGKILL)
    cluster.commander.wait()
    state = json.loads(open(cluster.state_path).read())
    state["runs"]["r1"]["step"] = "ten"
    with open(cluster.state_path, "w") as handle:
        json.dump(state, handle)
    result = subprocess.run([sys.executable, RELAY, "serve", "--port", "0", "--state-path", cluster.state_path],
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "runs.r1.step is a str, not int" in result.stderr


def test_wrong_page_passwords_are_slowed_down_per_address_and_the_server_header_names_no_python(cluster):
    secret = "s-" + uuid.uuid4().hex
    cluster.start_commander(lease=30, secret=secret)
    assert raw_request(cluster, "GET", "/", headers=basic_auth("guess-1"))[0] == 401
    status, body, headers = raw_request(cluster, "GET", "/", headers=basic_auth(secret))
    assert status == 429 and "too many wrong passwords" in json.loads(body)["error"]  # not even checked
    assert cluster.client().get("/api/runs").status == 200  # signed requests are not slowed
    wait_for("the pause after one wrong password to pass",
             lambda: raw_request(cluster, "GET", "/", headers=basic_auth(secret))[0] == 200, 5)
    assert headers["Server"] == "relay-commander" and "Python" not in str(headers)


@pytest.mark.slow(15)
def test_idle_connections_are_closed_after_seconds_also_after_a_tls_handshake_and_a_dripping_one_at_its_deadline(
        cluster, tmp_path):
    import ssl

    cert, key = self_signed_certificate(tmp_path, "commander")
    cluster.ca_file = cert
    cluster.start_commander(lease=30, secret="s-" + uuid.uuid4().hex, extra=("--tls-cert", cert, "--tls-key", key))
    context = ssl.create_default_context(cafile=cert)
    opened = time.monotonic()
    idle = context.wrap_socket(socket.create_connection(("127.0.0.1", cluster.port)), server_hostname="127.0.0.1")
    drip = context.wrap_socket(socket.create_connection(("127.0.0.1", cluster.port)), server_hostname="127.0.0.1")
    request = b"POST /api/lease/renew HTTP/1.1\r\nHost: c\r\nX-Padding: " + b"a" * 1000
    closed_after: dict[str, float] = {}
    for sent in range(len(request)):  # a byte every 0.2 s: a deadline per byte would never pass
        for name, sock in (("idle", idle), ("drip", drip)):
            sock.settimeout(0.01 if name not in closed_after else None)
            if name in closed_after:
                continue
            try:
                if sock.recv(100) == b"":
                    closed_after[name] = time.monotonic() - opened
            except TimeoutError:
                pass
            except OSError:
                closed_after[name] = time.monotonic() - opened
        if len(closed_after) == 2 or time.monotonic() - opened > 40:
            break
        with contextlib.suppress(OSError):
            drip.sendall(request[sent:sent + 1])
        time.sleep(0.2)
    assert set(closed_after) == {"idle", "drip"}, closed_after
    assert closed_after["idle"] < closed_after["drip"] < 30, closed_after  # 5 s idle, 10 s for a whole request


def via_client(client: relay.CommanderClient, run_id: str = "r1") -> dict:
    """The run as one kept-alive client sees it (a new connection may meet a full commander)."""
    reply = client.get(f"/api/runs/{run_id}")
    return reply.body if reply.status == 200 else {}


@pytest.mark.slow(45)
def test_a_run_renews_and_completes_while_more_connections_than_the_commanders_file_limit_idle_drip_or_stall(
        cluster, tmp_path):
    cert, key = self_signed_certificate(tmp_path, "commander")
    cluster.ca_file = cert
    cluster.start_commander(lease=3, secret="s-" + uuid.uuid4().hex, extra=("--tls-cert", cert, "--tls-key", key),
                            wrap=("prlimit", "--nofile=256:256", "--"))
    assert "open-file limit 256; at most 192 connections at once" in cluster.log("commander")
    watcher = cluster.client()
    worker = cluster.start_worker("a", env={"MOCK_STEP_SECONDS": "0.1", "MOCK_MAX_STEPS": "150"},
                                  commander_ca_file=cert)
    wait_for("a to train and renew", lambda: via_client(watcher).get("step", 0) >= 15, 30)
    hostile = cluster.spawn("hostile", ["--port", str(cluster.port), "--idle", "150", "--drip", "100", "--half-tls",
                                        "100", "--tls-idle", "20", "--seconds", "25"], module="testing.hostile_clients")
    wait_for("the hostile connections to be open", lambda: "holding" in cluster.log("hostile"), 30)
    run = wait_for("the run to complete", lambda: via_client(watcher).get("status") == "COMPLETED"
                   and via_client(watcher), 60)
    assert worker.wait(30) == 0
    assert [(lease["worker_id"], lease["why"].split(":")[0]) for lease in run["leases"]] == [("a", "completed")]
    assert hostile.wait(40) == 0
    stats = json.loads(cluster.log("hostile").strip().splitlines()[-1])
    assert stats["opened"] > 400 and stats["closed_by_commander"] > 256, stats  # past the cap and the file limit
    assert stats["longest_drip_seconds"] < 30, stats
    assert "Traceback" not in cluster.log("commander")


@pytest.mark.slow(20)
def test_floods_of_huge_headers_and_bodies_keep_the_commanders_memory_bounded_and_over_the_cap_get_a_fast_503(
        cluster):
    cluster.start_commander(lease=30, secret="s-" + uuid.uuid4().hex, wrap=("prlimit", "--nofile=128:128", "--"))  # at most 64 connections
    client = cluster.client()
    held = {"run_id": "r1", "worker_id": "w1"}
    token = client.post("/api/lease/acquire", dict(held, mode="sft")).body["lease_token"]

    def peak_rss_mb() -> float:
        status = Path(f"/proc/{cluster.commander.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024

    before = peak_rss_mb()
    hostile = cluster.spawn("hostile", ["--port", str(cluster.port), "--big-headers", "60", "--big-bodies", "60",
                                        "--idle", "30", "--seconds", "8"], module="testing.hostile_clients")
    wait_for("the hostile connections to be open", lambda: "holding" in cluster.log("hostile"), 30)
    renewals = []
    while hostile.poll() is None:
        renewals.append(client.post("/api/lease/renew", dict(held, lease_token=token)).status)
        time.sleep(0.1)
    stats = json.loads(cluster.log("hostile").strip().splitlines()[-1])
    assert stats["answered_503"] > 0 and stats["answered_4xx"] > 0, stats
    assert renewals and set(renewals) == {200}
    assert peak_rss_mb() - before < 100, (before, peak_rss_mb())  # 100 such connections took 2.8 GB before


@pytest.mark.slow(30)
def test_a_man_in_the_middle_forging_409s_grants_and_long_ttls_neither_stops_a_run_nor_starts_a_second_trainer(
        cluster, tmp_path):
    cluster.start_commander(lease=3, secret="s-" + uuid.uuid4().hex)
    paths = {}
    for worker in ("a", "b"):  # each worker's own path to the commander, forging while its switch file exists
        port = free_port()
        cluster.spawn(f"proxy-{worker}", ["--port", str(port), "--commander", cluster.url, "--switch",
                                          str(tmp_path / f"forge-{worker}")], module="testing.mitm_proxy")
        wait_for("the proxy to listen", lambda w=worker: "proxy on" in cluster.log(f"proxy-{w}"))
        paths[worker] = f"http://127.0.0.1:{port}"
    with TrainerOverlapMonitor(cluster) as monitor:
        worker_a = cluster.start_worker("a", env={"MOCK_STEP_SECONDS": "0.1", "MOCK_MAX_STEPS": "80"},
                                        commander_url=paths["a"])
        wait_for("a sealed checkpoint 5", lambda: checkpoint_at_least(cluster, 5))
        (tmp_path / "forge-a").touch()  # from now on a's renewals meet forged 409s and stretched TTLs
        (tmp_path / "forge-b").touch()  # and b's "denied" answers become grants
        cluster.start_worker("b", commander_url=paths["b"])
        wait_for("forged 409s and TTLs to a and forged grants to b", lambda: cluster.log("proxy-a").count(
            "forged 409") >= 3 and "stretched ttl" in cluster.log("proxy-a") and "forged grant" in cluster.log(
            "proxy-b"), 15)
        assert (cluster.run("r1")["epoch"], cluster.run("r1")["holder"]) == (1, "a")
        (tmp_path / "forge-b").unlink()  # b may now take over for real
        run = frozen_until_b_takes_over(cluster, worker_a)  # its watchdog holds the deadline a stretched TTL set
    assert monitor.overlaps == [], f"two trainers of one run alive at once: {monitor.overlaps[:3]}"
    assert [lease["worker_id"] for lease in run["leases"]] == ["a", "b"]
    assert "lease lost: the commander refused" not in cluster.log("a")
    assert 1 <= cluster.log("a").count("without the commander's signature was ignored") <= 3  # once per thread


def test_a_frozen_worker_trusts_no_longer_lease_than_its_run_allows_whatever_the_commander_grants(cluster):
    cluster.start_commander(lease=30)
    worker = cluster.start_worker("a", env=MID_RUN, max_lease_seconds=2)
    wait_for("a sealed checkpoint 5", lambda: checkpoint_at_least(cluster, 5))
    assert "the commander grants 30 s leases; this worker trusts 2 s" in cluster.log("a")
    os.kill(worker.pid, signal.SIGSTOP)  # the worker alone: its watchdog holds a deadline of at most 2 s
    try:
        wait_for("the watchdog to kill the trainer", lambda: not cluster.trainer_pids(worker_id="a"), timeout=10)
        assert cluster.run("r1")["holder"] == "a"  # the commander's 30 s lease still runs
    finally:
        os.kill(worker.pid, signal.SIGCONT)


def test_an_old_worker_and_an_old_commander_are_refused_with_an_error_naming_the_protocol(cluster):
    secret = "s-" + uuid.uuid4().hex
    cluster.start_commander(lease=5, secret=secret)
    body = json.dumps({"run_id": "r1", "worker_id": "w1", "mode": "sft"}).encode()
    old_worker = relay.signed_headers(secret, "POST", "/api/lease/acquire", body)
    del old_worker["X-Relay-Protocol"]
    status, answer, _ = raw_request(cluster, "POST", "/api/lease/acquire", body, old_worker)
    assert status == 400 and "relay protocol 2" in json.loads(answer)["error"]
    assert cluster.run("r1") == {}
    proxy_port = free_port()
    cluster.spawn("old", ["--port", str(proxy_port), "--commander", cluster.url, "--mode", "old-commander"],
                  module="testing.mitm_proxy")
    wait_for("the old commander's stand-in to listen", lambda: "proxy on" in cluster.log("old"))
    worker = cluster.start_worker("new", commander_url=f"http://127.0.0.1:{proxy_port}")
    assert worker.wait(20) == 2
    lines = cluster.log("new").strip().splitlines()
    assert len(lines) == 1 and "with relay protocol 1" in lines[0] and "same relay.py" in lines[0], lines


def test_the_shared_secret_stays_out_of_ps_logs_state_and_the_trainer(cluster):
    secret = "topsecret-" + uuid.uuid4().hex
    cluster.start_commander(lease=3, secret=secret)
    worker = cluster.start_worker("a", env={"MOCK_MAX_STEPS": "30"})
    wait_for("a trainer running", lambda: cluster.trainer_pids(), 15)
    for pid in relay.processes_with_env(f"RELAY_TEST_MARK={cluster.mark}"):
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            assert secret.encode() not in handle.read()
    for env in cluster.trainer_pids().values():
        assert "RELAY_SHARED_SECRET" not in env
    assert worker.wait(30) == 0
    for name in ("commander", "a"):
        assert secret not in cluster.log(name)
    assert secret not in open(cluster.state_path).read()


# --------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("change, field", [
    ({"commander_url": None}, "commander_url"),
    ({"run_id": None}, "run_id"),
    ({"mode": None}, "mode"),
    ({"run_id": "bad id!"}, "run_id"),
    ({"mode": "ppo"}, "mode"),
    ({"commander_url": "ftp://example"}, "commander_url"),
    ({"keep_last_checkpoints": "three"}, "keep_last_checkpoints"),
    ({"keep_last_checkpoints": 0}, "keep_last_checkpoints"),
    ({"hf_repo": "no-slash"}, "hf_repo"),
    ({"hf_dry_run": "yes"}, "hf_dry_run"),
    ({"env": ["A=1"]}, "env"),
    ({"hf_rep": "user/repo"}, "hf_rep"),
    ({"rollout_trajectory_pattern": "rollout.pt"}, "rollout_trajectory_pattern"),
    ({"stall_timeout_seconds": -1}, "stall_timeout_seconds"),
    ({"l1_root": "/mnt/my volume"}, "l1_root"),
])
def test_a_config_mistake_exits_2_with_one_line_naming_the_field(tmp_path, change, field):
    config = {"commander_url": "http://127.0.0.1:9", "run_id": "r1", "mode": "sft", "l1_root": str(tmp_path)}
    config.update(change)  # (an l1_root with a space would reach slime as two words)
    config = {k: v for k, v in config.items() if v is not None}
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(config))
    result = subprocess.run([sys.executable, RELAY, "worker", str(path)], capture_output=True, text=True, timeout=20)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"'{field}'" in lines[0], result.stderr


def test_unreadable_yaml_and_an_unreachable_commander_exit_2_without_a_traceback(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("run_id: [unclosed\n")
    missing = tmp_path / "missing.yaml"
    unreachable = tmp_path / "unreachable.yaml"
    unreachable.write_text(json.dumps({"commander_url": "http://127.0.0.1:9", "run_id": "r1", "mode": "sft",
                                       "l1_root": str(tmp_path), "commander_wait_seconds": 0.5}))
    for path, words in ((broken, "not valid YAML"), (missing, "cannot read"), (unreachable, "cannot reach")):
        result = subprocess.run([sys.executable, RELAY, "worker", str(path)], capture_output=True, text=True, timeout=20)
        assert result.returncode == 2 and words in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert str(path) in result.stderr or "127.0.0.1:9" in result.stderr  # names what to fix


def test_the_seed_rollout_pattern_is_converted_to_one_slime_can_format(tmp_path):
    config = {"commander_url": "http://127.0.0.1:9", "run_id": "r1", "mode": "rl", "l1_root": str(tmp_path),
              "rollout_trajectory_pattern": "rollout_{rollout_id:08d}.pt"}
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(config))
    assert relay.load_run_config(str(path)).rollout_trajectory_pattern == "rollout_{rollout_id}.pt"


def test_status_shows_runs_as_a_table_and_as_json(cluster):
    cluster.start_commander(lease=2)
    worker = cluster.start_worker("a", env={"MOCK_MAX_STEPS": "10"})
    assert worker.wait(30) == 0
    table = subprocess.run([sys.executable, RELAY, "status", "--commander-url", cluster.url],
                           capture_output=True, text=True, timeout=20)
    assert table.returncode == 0
    header, row = table.stdout.splitlines()[:2]
    assert header.split()[:5] == ["RUN", "STATUS", "HOLDER", "EPOCH", "STEP"]
    assert row.split()[:5] == ["r1", "COMPLETED", "-", "1", "10"]
    as_json = subprocess.run([sys.executable, RELAY, "status", "--commander-url", cluster.url, "--json"],
                             capture_output=True, text=True, timeout=20)
    run = json.loads(as_json.stdout)["runs"][0]
    assert (run["status"], run["latest_checkpoint"]["iteration"]) == ("COMPLETED", 10)
    detail = subprocess.run([sys.executable, RELAY, "status", "--commander-url", cluster.url, "--run", "r1"],
                            capture_output=True, text=True, timeout=20)
    assert "epoch   1  a" in detail.stdout and "completed" in detail.stdout
    down = subprocess.run([sys.executable, RELAY, "status", "--commander-url", "http://127.0.0.1:9"],
                          capture_output=True, text=True, timeout=20)
    assert down.returncode == 2 and "cannot reach" in down.stderr


def test_status_and_logs_name_the_secret_to_set_and_take_a_url_without_a_scheme_or_from_the_environment(cluster):
    secret, viewer = "s-" + uuid.uuid4().hex, "v-" + uuid.uuid4().hex
    cluster.start_commander(lease=30, secret=secret, env={"RELAY_VIEWER_SECRET": viewer})
    assert cluster.client().post("/api/lease/acquire", {"run_id": "r1", "worker_id": "w1", "mode": "sft"}).status == 200
    bare = f"127.0.0.1:{cluster.port}"  # no scheme: http:// is meant

    def relay_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, RELAY, *args], capture_output=True, text=True, timeout=20, env=cluster.env(**env))

    no_secret = relay_cli("status", "--commander-url", bare)
    assert no_secret.returncode == 2, no_secret.stderr
    assert no_secret.stderr == (f"relay: error: the commander at http://{bare} needs a secret: export RELAY_VIEWER_SECRET "
                                "(reading only) or RELAY_SHARED_SECRET, as the commander has it\n")
    wrong = relay_cli("logs", "r1", "--commander-url", bare, RELAY_VIEWER_SECRET="not-" + viewer)
    assert wrong.returncode == 2 and wrong.stderr.startswith(
        f"relay: error: the commander at http://{bare} refuses RELAY_VIEWER_SECRET ("), wrong.stderr
    assert wrong.stderr.strip().endswith("export the RELAY_VIEWER_SECRET the commander was started with")
    from_env = relay_cli("status", "--run", "r1", RELAY_COMMANDER_URL=bare, RELAY_VIEWER_SECRET=viewer)
    assert from_env.returncode == 0 and "w1" in from_env.stdout, from_env.stderr


def test_status_says_a_url_that_is_not_a_relay_commander_is_not_one_without_showing_its_page(tmp_path):
    class AnyPage(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # a web server that answers every path with a page
            page = b"<html><body>Welcome to nginx!</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AnyPage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        result = subprocess.run([sys.executable, RELAY, "status", "--commander-url", url], capture_output=True, text=True,
                                timeout=20)
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 2, result.stderr
    assert result.stderr == (f"relay: error: {url} is not a relay commander (it answered /api/runs with HTTP 200): "
                             "check --commander-url or RELAY_COMMANDER_URL\n")


@pytest.mark.slow(14)
def test_a_worker_that_cannot_reach_the_commander_says_so_at_once_and_again_while_it_waits(cluster):
    from testing.harness import free_port

    cluster.port = free_port()
    cluster.url = f"http://127.0.0.1:{cluster.port}"  # nothing listens there yet
    worker = cluster.start_worker("a", commander_wait_seconds=60, env={"MOCK_MAX_STEPS": "5"})
    first = f"cannot reach the commander at {cluster.url}: [Errno 111] Connection refused; trying again for up to"
    wait_for("the worker to say it cannot reach the commander", lambda: first in cluster.log("a"), 10)
    wait_for("the worker to say it again", lambda: re.search(r"Connection refused; trying again .*\(for \d+ s now\)",
                                                             cluster.log("a")), 20)
    cluster.start_commander(port=cluster.port)
    assert worker.wait(40) == 0, cluster.log("a")
    assert f"reached the commander at {cluster.url} after" in cluster.log("a")


def test_status_shows_step_of_total_elapsed_time_gpu_spend_and_the_supervisor(cluster):
    cluster.start_commander(lease=2)
    assert cluster.start_worker("a", total_steps=10, env={"MOCK_MAX_STEPS": "10"}).wait(30) == 0
    spend = {"run_id": "r1", "spent_usd": 1.5, "budget_usd": 0, "pods": 1, "supervisor_pid": 4242}  # as launch-stack reports
    assert cluster.client().post("/api/runs/spend", spend).status == 200
    table = relay_cli(cluster, "status")
    header, row = (line.split("  ") for line in table.stdout.splitlines()[:2])
    columns = dict(zip([h.strip() for h in header if h.strip()], [c.strip() for c in row if c.strip()], strict=False))
    assert (columns["STEP"], columns["GPU SPEND"]) == ("10/10", "$1.50"), table.stdout
    assert re.fullmatch(r"\d+s", columns["ELAPSED"]) and columns["SUPERVISOR"].startswith("heard "), table.stdout
    detail = relay_cli(cluster, "status", "--run", "r1").stdout
    assert "supervisor: pid 4242, last heard" in detail and "GPU spend: $1.50 on 1 pod(s)" in detail
    assert cluster.client().post("/api/runs/spend", dict(spend, supervisor_pid=0)).status == 200  # it stopped
    assert "supervisor: none: the last one stopped" in relay_cli(cluster, "status", "--run", "r1").stdout


def test_logs_n_prints_only_the_last_lines(cluster):
    cluster.start_commander(lease=2)
    assert cluster.start_worker("a", env={"MOCK_MAX_STEPS": "20"}).wait(30) == 0
    every = relay_cli(cluster, "logs", "r1").stdout.splitlines()
    assert len(every) > 5
    assert relay_cli(cluster, "logs", "r1", "-n", "3").stdout.splitlines() == every[-3:]
    assert relay_cli(cluster, "logs", "r1", "-n", "0").stdout == ""


# --------------------------------------------------------------------------- the mock trainer


def test_the_mock_trainer_resumes_bit_exactly_from_a_checkpoint(tmp_path, reference):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "MOCK_"))}
    env.update(RELAY_CKPT_DIR=str(tmp_path / "ckpt"), MOCK_SAVE_EVERY="5", MOCK_STEP_SECONDS="0")
    first = subprocess.run([sys.executable, RELAY, "mock-trainer"], env=dict(env, MOCK_MAX_STEPS="15"),
                           capture_output=True, text=True, check=True)
    assert first.stdout.splitlines()[-1].startswith("step 15/15 loss ")
    second = subprocess.run([sys.executable, RELAY, "mock-trainer"], env=dict(env, MOCK_MAX_STEPS="40"),
                            capture_output=True, text=True, check=True)
    assert "resumed from iteration 15" in second.stdout
    steps = [line for line in second.stdout.splitlines() if line.startswith("step ")]
    assert steps[0].startswith("step 16/40") and len(steps) == 25
    assert (tmp_path / "ckpt" / "iter_0000040" / "model.json").read_bytes() == reference
    losses = [float(line.split()[-1]) for line in steps]
    assert losses[-1] < losses[0]  # it really learns


# --------------------------------------------------------------------------- the Hugging Face Hub (L2)

HUB_REPO = "tester/relay-ckpt"


@pytest.fixture
def hub():
    from testing.hub_server import HubServer

    server = HubServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["xet", "lfs"])
def transfer(request, cluster) -> str:
    """A key Hub test on both paths (run.yaml hf_transfer): Xet, what production takes, and plain
    LFS.  The other Hub tests take the harness's path (Xet; RELAY_TEST_HF_TRANSFER=lfs for a
    whole pass on LFS)."""
    cluster.hf_transfer = request.param
    return request.param


def hub_record(cluster: Cluster, run_id: str = "r1") -> dict:
    return cluster.run(run_id).get("hub") or {}


def test_a_pod_without_the_volume_resumes_from_the_hub_at_the_recorded_revision(cluster, hub, reference, transfer):
    hub.lfs_patterns = ("*/model.json",)  # the model goes through Xet or LFS, not as a regular file
    cluster.hub = hub
    cluster.start_commander(lease=2)
    on_hub = {"hf_repo": HUB_REPO, "hf_sync_interval_seconds": 0.5}
    worker_a = cluster.start_worker("a", l1_root=str(cluster.tmp / "pod-a"), env={"MOCK_STEP_SECONDS": "0.1"}, **on_hub)
    wait_for("a checkpoint of 10 or later on the Hub", lambda: hub_record(cluster).get("iteration", 0) >= 10, 30)
    os.kill(worker_a.pid, signal.SIGKILL)
    worker_b = cluster.start_worker("b", l1_root=str(cluster.tmp / "pod-b"), **on_hub)
    run = wait_for("the run to complete", lambda: completed(cluster), 40)
    resume = resumed_from(run, "b")[0]
    assert "in the Hub at" in resume and int(resume.split("checkpoint ")[1].split()[0]) >= 10, resume
    assert final_model(cluster, l1="pod-b") == reference
    final = hub_record(cluster)
    assert final["iteration"] == 40
    assert hub.files_at(HUB_REPO, final["revision"])["runs/r1/ckpt/iter_0000040/model.json"] == reference
    assert ("runs/r1/ckpt/iter_0000040/model.json" in hub.xet_paths_at(HUB_REPO, final["revision"])) == (transfer == "xet")
    assert worker_b.wait(30) == 0
    assert f"final model: {HUB_REPO} at revision {final['revision']}" in cluster.log("b")
    assert f"af commit --repo {HUB_REPO} --revision {final['revision']} --chute-id" in cluster.log("b")
    assert f"af chutes_push --repo {HUB_REPO} --revision {final['revision']}" in cluster.log("b")
    assert hub.repos[HUB_REPO].private
    for name in ("a", "b", "commander"):
        assert hub.token not in cluster.log(name)


def thread_nice_values(pid: int) -> dict[int, tuple[str, int]]:
    """Thread id -> (name, nice value) of every thread of `pid` (/proc/PID/task/TID/stat)."""
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            name, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
            found[int(tid)] = (name, int(fields[16]))  # field 19 of stat, counted from the state (field 3)
    return found


@pytest.mark.slow(12)
def test_every_thread_that_moves_checkpoints_through_xet_runs_at_low_priority_after_a_restore_and_an_upload(
        cluster, hub):
    """...and hf_xet's cache and logs stay in a bounded folder on the volume, while the trainer's
    environment keeps the user's own hf_xet settings."""
    hub.lfs_patterns = ("*/model.json",)
    cluster.hub, cluster.hf_transfer = hub, "xet"
    cluster.start_commander(lease=2)
    on_hub = {"hf_repo": HUB_REPO, "hf_sync_interval_seconds": 0.5}
    worker_a = cluster.start_worker("a", l1_root=str(cluster.tmp / "pod-a"), env={"MOCK_STEP_SECONDS": "0.1", "MOCK_MAX_STEPS": "400"}, **on_hub)
    wait_for("a checkpoint of 10 or later on the Hub", lambda: hub_record(cluster).get("iteration", 0) >= 10, 30)
    os.kill(worker_a.pid, signal.SIGKILL)
    restored = hub_record(cluster)["iteration"]
    # b restores through Xet on its main thread's behalf (hf_xet's pool is made then), then uploads.
    worker_b = cluster.start_worker("b", l1_root=str(cluster.tmp / "pod-b"), hf_xet_threads=3,
                                    env={"MOCK_STEP_SECONDS": "0.1", "HF_XET_HIGH_PERFORMANCE": "1",
                                             "MOCK_MAX_STEPS": "400"}, **on_hub)  # still training when looked at
    wait_for("b to upload a checkpoint after its restore",
             lambda: hub_record(cluster).get("iteration", 0) > restored and "fetched checkpoint" in cluster.log("b"), 30)
    threads = thread_nice_values(worker_b.pid)
    xet = [nice for name, nice in threads.values() if name.startswith(("hf-xet", "tracing-append"))]  # its log writer too
    assert xet and set(xet) == {relay.HUB_THREAD_NICENESS}, threads
    assert len(xet) <= 3 + 3, threads  # hf_xet_threads workers, its few blocking threads, its log writer
    assert threads[worker_b.pid][1] == 0, threads  # the main thread (lease renewals start there) keeps its priority
    assert list((cluster.tmp / "pod-b" / "runs" / "r1" / "hf-xet" / "b" / "logs").glob("xet_*.log"))
    assert not (cluster.tmp / "hf-home-b" / "xet").exists()  # nothing on the container disk
    trainer_env = next(iter(cluster.trainer_pids(worker_id="b").values()))
    assert trainer_env.get("HF_XET_HIGH_PERFORMANCE") == "1" and "TOKIO_WORKER_THREADS" not in trainer_env


@pytest.mark.slow(10)
@pytest.mark.parametrize("cas_status", [403, 503], ids=["the storage refuses", "the storage fails"])
def test_a_xet_storage_refusal_waits_half_an_hour_and_says_why_while_a_failure_is_retried_soon(
        cluster, hub, cas_status):
    from testing.xet_cas import FailingCas

    cas = FailingCas(cas_status).start()
    try:
        hub.cas_url, hub.lfs_patterns = cas.url, ("*/model.json",)
        cluster.hub, cluster.hf_transfer = hub, "xet"
        cluster.start_commander(lease=2)
        # hf_xet retries each request itself (5 times, 3 s apart by default): once is enough here
        worker = cluster.start_worker("a", hf_repo=HUB_REPO, hf_sync_interval_seconds=0.2,
                                      env={"MOCK_MAX_STEPS": "2000", "HF_XET_CLIENT_RETRY_MAX_ATTEMPTS": "1"})
        failing = wait_for("the storage's error on the run record", lambda: cluster.run("r1").get("sync_error") and
                           cluster.run("r1"), 30)
        first_failure = time.monotonic()
        if cas_status == 403:  # long enough for the short retries (2 s, then 4 s) to have happened
            wait_for("6 s of training after the refusal", lambda: time.monotonic() > first_failure + 6 and
                     cluster.run("r1")["step"] > failing["step"] + 20, 30)
        else:
            wait_for("a second failure", lambda: "failed (2 in a row)" in cluster.log("a"), 30)
        worker.send_signal(signal.SIGTERM)  # one last try, as at any stop
        assert worker.wait(30) == 0
    finally:
        cas.stop()
    failures = re.findall(r"upload of checkpoint \d+ failed \((\d+) in a row\): (.*); retrying in (\d+) s", cluster.log("a"))
    assert not cluster.run("r1")["hub"]
    if cas_status == 403:
        assert "403 Forbidden" in failing["sync_error"], failing["sync_error"]
        assert "a retry cannot fix this, next try in 30 min" in failing["sync_error"]
        assert len(failures) <= 2 and cas.uploads() <= 2 * 3, failures  # the first refusal, the last try at the stop
    else:
        assert "503" in failing["sync_error"] and "cannot fix" not in failing["sync_error"]
        assert [int(f[2]) for f in failures[:2]] == [2, 4], failures  # the short retries


def hub_downloads(hub) -> int:
    with hub.lock:
        return sum(1 for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path)


def test_a_standby_prefetches_the_recorded_checkpoint_and_takes_over_without_downloading(cluster, hub, reference):
    cluster.hub = hub
    cluster.start_commander(lease=2)
    on_hub = {"hf_repo": HUB_REPO, "hf_sync_interval_seconds": 0.5}
    worker_a = cluster.start_worker("a", l1_root=str(cluster.tmp / "pod-a"), env={"MOCK_STEP_SECONDS": "0.1"}, **on_hub)
    wait_for("a checkpoint of 10 or later on the Hub", lambda: hub_record(cluster).get("iteration", 0) >= 10, 30)
    for pid in cluster.trainer_pids(worker_id="a"):  # a holds the lease, its run stands still: one recorded revision
        os.kill(pid, signal.SIGSTOP)
    pod_a = relay.CheckpointDir(str(cluster.tmp / "pod-a" / "runs" / "r1"), True)
    recorded = wait_for("the trainer's last save on the Hub",
                        lambda: hub_record(cluster).get("iteration") == pod_a.tracker_iteration() and hub_record(cluster))
    cluster.start_worker("b", l1_root=str(cluster.tmp / "pod-b"), **on_hub)
    wait_for("b to prefetch the recorded checkpoint", lambda: "prefetched checkpoint" in cluster.log("b"), 30)
    assert hub_record(cluster) == recorded and cluster.run("r1")["holder"] == "a"
    prefetch = cluster.tmp / "pod-b" / "runs" / "r1" / "prefetch" / "b"
    assert sorted(os.listdir(prefetch / "sealed")) == [relay.iteration_dirname(recorded["iteration"]) + ".json"]
    downloads = hub_downloads(hub)
    os.kill(worker_a.pid, signal.SIGKILL)
    run = wait_for("the run to complete", lambda: completed(cluster), 40)
    assert hub_downloads(hub) == downloads, "b downloaded at its takeover"
    resume = resumed_from(run, "b")[0]
    assert f"checkpoint {recorded['iteration']} in the Hub at {recorded['revision'][:12]} (prefetched" in resume, resume
    assert final_model(cluster, l1="pod-b") == reference
    assert not prefetch.exists()  # moved into place: the holder's volume keeps no second copy


def test_the_recorded_revision_holds_its_checkpoint_and_a_stale_commit_on_the_branch_is_never_resumed(
        cluster, hub, reference):
    cluster.hub = hub
    cluster.start_commander(lease=2)
    on_hub = {"hf_repo": HUB_REPO, "hf_sync_interval_seconds": 0.5}
    worker_a = cluster.start_worker("a", l1_root=str(cluster.tmp / "pod-a"), env={"MOCK_STEP_SECONDS": "0.1"}, **on_hub)
    wait_for("a checkpoint of 10 or later on the Hub", lambda: hub_record(cluster).get("iteration", 0) >= 10, 30)
    worker_a.send_signal(signal.SIGTERM)
    assert worker_a.wait(30) == 0
    recorded = hub_record(cluster)
    files = hub.files_at(HUB_REPO, recorded["revision"])
    ckpt = f"runs/r1/ckpt/{relay.iteration_dirname(recorded['iteration'])}"
    manifest = relay.Manifest.from_bytes(files[f"{ckpt}/relay_manifest.json"])
    assert manifest.digest == recorded["manifest_sha256"] and manifest.iteration == recorded["iteration"]
    for rel, (size, _) in manifest.files.items():
        assert len(files[f"runs/r1/ckpt/{rel}"]) == size
    # A holder that lost its lease pushes anyway: the commit lands on the branch head...
    from huggingface_hub import CommitOperationAdd, HfApi  # noqa: PLC0415
    poison = relay.Manifest(recorded["iteration"] + 5, {"iter_0000099/model.json": [3, "0" * 64]})
    HfApi(endpoint=hub.url, token=hub.token).create_commit(HUB_REPO, [
        CommitOperationAdd(f"runs/r1/ckpt/{relay.iteration_dirname(poison.iteration)}/relay_manifest.json",
                           poison.to_bytes()),
        CommitOperationAdd("runs/r1/ckpt/latest_checkpointed_iteration.txt", f"{poison.iteration}\n".encode()),
    ], commit_message="stale holder")
    assert hub.head(HUB_REPO) != recorded["revision"]
    # ...but a new pod resumes from the recorded revision and the result is still exact.
    cluster.start_worker("b", l1_root=str(cluster.tmp / "pod-b"), **on_hub)
    run = wait_for("the run to complete", lambda: completed(cluster), 40)
    assert resumed_from(run, "b")[0].startswith(
        f"b resumes from checkpoint {recorded['iteration']} in the Hub at {recorded['revision'][:12]}")
    assert final_model(cluster, l1="pod-b") == reference
    # b's first commit named the recorded revision as its parent: the Hub said 412, b re-based
    assert [status for method, path, status in hub.requests if "/commit/" in path].count(412) == 1
    assert "the branch moved past" in cluster.log("b")


@pytest.mark.slow(22)
def test_a_failing_hub_never_stops_training_and_the_sync_recovers_without_losing_anything(cluster, hub, tmp_path):
    from testing.hub_server import Fault

    reference = reference_model(tmp_path, max_steps=80)

    cluster.hub = hub
    hub.inject(Fault("/commit/", status=500, count=2))
    hub.inject(Fault("/commit/", status=429, count=1, rate_limit_reset=3))  # the Hub's RateLimit: "api";r=0;t=3
    hub.inject(Fault("/preupload/", status=429, count=2, retry_after=1))
    cluster.start_commander(lease=2)
    worker = cluster.start_worker("a", hf_repo=HUB_REPO, hf_sync_interval_seconds=0.5,
                                  env={"MOCK_STEP_SECONDS": "0.1", "MOCK_MAX_STEPS": "80"})
    failing = wait_for("the sync failure to show in the run record", lambda: cluster.run("r1").get("sync_error") and
                       cluster.run("r1"), 30)
    assert "500" in failing["sync_error"] or "429" in failing["sync_error"]
    step_then = failing["step"]
    wait_for("training to go on meanwhile", lambda: cluster.run("r1")["step"] > step_then + 3, 20)
    run = wait_for("the run to complete", lambda: completed(cluster), 60)
    assert worker.wait(30) == 0
    assert run["sync_error"] == "" and run["hub"]["iteration"] == 80
    assert hub.files_at(HUB_REPO, run["hub"]["revision"])["runs/r1/ckpt/iter_0000080/model.json"] == reference
    statuses = [status for _, path, status in hub.requests if "/commit/" in path]
    assert statuses[:3] == [500, 500, 429] and statuses[-1] == 200
    assert re.search(r"failed \(3 in a row\): HTTP 429: .*; retrying in 3 s", cluster.log("a")), cluster.log("a")


CKPT_BYTES = 20_000  # one checkpoint's LFS file in the quota tests


def hub_checkpoints(hub, revision: str = "main") -> list[str]:
    return sorted({p.split("/")[3] for p in hub.files_at(HUB_REPO, revision) if p.startswith("runs/r1/ckpt/iter_")})


@pytest.mark.slow(18)
def test_a_run_uploading_far_more_than_the_hub_quota_keeps_the_newest_checkpoints_and_never_meets_the_limit(
        cluster, hub):
    # Checkpoints of 20 KB through the LFS path, a quota of 4 of them, about 10 uploaded.
    hub.lfs_threshold, hub.quota_bytes = CKPT_BYTES // 2, 4 * CKPT_BYTES
    cluster.hub = hub
    cluster.start_commander(lease=2)
    knobs = slime_env(FAKE_NUM_ROLLOUT="40", FAKE_SAVE_INTERVAL="2", FAKE_CKPT_BYTES=str(CKPT_BYTES),
                      FAKE_STEP_SECONDS="0.25")
    on_hub = {"hf_repo": HUB_REPO, "hf_sync_interval_seconds": 0.2}
    worker_a = cluster.start_worker("a", l1_root=str(cluster.tmp / "pod-a"), env=knobs, **on_hub)
    wait_for("checkpoint 21 on the Hub", lambda: hub_record(cluster).get("iteration", 0) >= 21, 60)
    os.kill(worker_a.pid, signal.SIGKILL)
    recorded = hub_record(cluster)
    # A fresh pod (another L1) restores the recorded revision, and the run completes.
    worker_b = cluster.start_worker("b", l1_root=str(cluster.tmp / "pod-b"), env=knobs, **on_hub)
    assert worker_b.wait(60) == 0
    run = cluster.run("r1")
    assert resumed_from(run, "b")[0].startswith(
        f"b resumes from checkpoint {recorded['iteration']} in the Hub at {recorded['revision'][:12]}")
    uploads = {p for c in hub.repos[HUB_REPO].commits.values() for p in c.files if p.endswith("/common.pt")}
    assert len(uploads) >= 8 and not [r for r in hub.requests if r[2] == 403]
    assert hub.repos[HUB_REPO].storage_bytes() <= 3 * CKPT_BYTES + 20_000  # (keep + 1) checkpoints + small files
    final = run["final_model"]
    assert final["iteration"] == 39 == run["latest_checkpoint"]["iteration"] and final["revision"] == hub.head(HUB_REPO)
    assert hub_checkpoints(hub) == sorted(p.split("/")[3] for p in uploads)[-2:]  # the newest 2, the final one too
    assert "runs/r1/ckpt/iter_0000039/common.pt" in hub.lfs_paths_at(HUB_REPO, final["revision"])
    pod_b = cluster.tmp / "pod-b" / "runs" / "r1" / "ckpt"
    assert hub.files_at(HUB_REPO, final["revision"])["runs/r1/ckpt/iter_0000039/common.pt"] == (
        pod_b / "iter_0000039" / "common.pt").read_bytes()
    assert f"final model: {HUB_REPO} at revision {final['revision']}" in cluster.log("b")


def test_a_full_hub_costs_a_few_requests_says_why_and_the_run_completes_naming_where_the_final_checkpoint_is(
        cluster, hub):
    hub.lfs_threshold, hub.quota_bytes = CKPT_BYTES // 2, 2 * CKPT_BYTES + CKPT_BYTES // 2  # holds 2 checkpoints
    cluster.hub = hub
    cluster.start_commander(lease=2)
    worker = cluster.start_worker("a", hf_repo=HUB_REPO, hf_sync_interval_seconds=0.2, hf_keep_last_checkpoints=0,
                                  env=slime_env(FAKE_NUM_ROLLOUT="30", FAKE_SAVE_INTERVAL="2",
                                                FAKE_CKPT_BYTES=str(CKPT_BYTES), FAKE_STEP_SECONDS="0.25"))
    failing = wait_for("the quota error on the run record", lambda: "storage limit" in cluster.run("r1").get(
        "sync_error", "") and cluster.run("r1"), 30)
    assert "HTTP 403: Private repository storage limit reached; a retry cannot fix this, next try in 30 min" in (
        failing["sync_error"])
    assert worker.wait(60) == 0
    run = cluster.run("r1")
    assert run["status"] == "COMPLETED" and run["step"] == 29 and run["latest_checkpoint"]["iteration"] == 29
    refused = [r for r in hub.requests if r[2] == 403]
    assert 1 <= len(refused) <= 2, refused  # the first refusal, then one last try for the final checkpoint
    on_hub = run["hub"]["iteration"]
    assert on_hub < 29 and run["final_model"] is None
    where = (f"the final checkpoint 29 is NOT on the Hub (the Hub has checkpoint {on_hub}): it is on a in "
             f"{cluster.ckpt_dir()}")
    assert where in run["leases"][-1]["why"] and where in cluster.log("a")
    assert "final model:" not in cluster.log("a") and "af commit" not in cluster.log("a")
    detail = relay.format_run_detail(run)
    assert "no final model on the Hub" in detail and "af commit" not in detail


def test_a_final_upload_that_outlasts_its_timeout_leaves_no_final_model_named_anywhere(cluster, hub):
    from testing.hub_server import Fault

    cluster.hub = hub
    hub.inject(Fault("/commit/", status=0, delay=30, count=5))  # a Hub that never answers a commit
    cluster.start_commander(lease=2)
    worker = cluster.start_worker("a", hf_repo=HUB_REPO, hf_sync_interval_seconds=3600, hf_final_sync_timeout_seconds=2,
                                  env={"MOCK_MAX_STEPS": "20", "MOCK_STEP_SECONDS": "0.02"})
    assert worker.wait(40) == 0
    run = cluster.run("r1")
    assert run["status"] == "COMPLETED" and run["final_model"] is None and not run["hub"]
    where = (f"the final checkpoint 20 is NOT on the Hub (the Hub has no checkpoint of this run): it is on a in "
             f"{cluster.ckpt_dir()}")
    assert where in run["leases"][-1]["why"] and "final model:" not in cluster.log("a")
    assert any(where in e["msg"] for e in run["events"] if e["msg"].startswith("run completed at step 20"))


@pytest.mark.slow(16)
def test_a_failed_hub_download_resumes_without_fetching_a_file_twice_and_stale_downloads_are_swept(
        cluster, hub, transfer):
    from testing.hub_server import Fault

    hub.lfs_threshold = CKPT_BYTES // 2
    cluster.hub = hub
    cluster.start_commander(lease=2)
    knobs = slime_env(FAKE_NUM_ROLLOUT="12", FAKE_SAVE_INTERVAL="2", FAKE_CKPT_BYTES=str(CKPT_BYTES),
                      FAKE_STEP_SECONDS="0.2")
    on_hub = {"hf_repo": HUB_REPO, "hf_sync_interval_seconds": 0.2}
    # Paced so that a loaded machine still kills it mid-run (six rollouts to go at the kill).
    worker_a = cluster.start_worker("a", l1_root=str(cluster.tmp / "pod-a"), env=dict(knobs, FAKE_STEP_SECONDS="1.0"),
                                    **on_hub)
    wait_for("checkpoint 5 on the Hub", lambda: hub_record(cluster).get("iteration", 0) >= 5, 30)
    os.kill(worker_a.pid, signal.SIGKILL)
    recorded = hub_record(cluster)
    ckpt_b = cluster.ckpt_dir(l1="pod-b")
    stale = ckpt_b / f"{relay.HUB_STAGING_PREFIX}{'0' * 40}"  # a download a killed worker left behind
    stale.mkdir(parents=True)
    (stale / "part.incomplete").write_bytes(b"x" * 1000)
    if transfer == "lfs":  # the checkpoint file's own download fails
        hub.inject(Fault(f"/{relay.iteration_dirname(recorded['iteration'])}/common.pt", status=404, method="GET"))
    else:  # the Xet read token the checkpoint file needs is refused once (a regular file needs none)
        hub.inject(Fault("/xet-read-token/", status=403))
    # No prefetch while standing by: this is about the restore's own download.
    worker_b = cluster.start_worker("b", l1_root=str(cluster.tmp / "pod-b"), env=knobs, hf_prefetch=False, **on_hub)
    assert worker_b.wait(60) == 0
    assert "fetching from the Hub failed (attempt 1 of 3)" in cluster.log("b")
    assert resumed_from(cluster.run("r1"), "b")[0].startswith(f"b resumes from checkpoint {recorded['iteration']} in the Hub")
    fetched = collections.Counter(path.rsplit("/", 1)[1] for method, path, _ in hub.requests
                                  if method == "GET" and f"/resolve/{recorded['revision']}/" in path)
    assert fetched["relay_manifest.json"] == 1, fetched
    assert fetched[f"global_dataset_state_dict_{recorded['iteration']}.pt"] == 1, fetched  # complete: not again
    if transfer == "lfs":
        assert fetched["common.pt"] == 2, fetched  # the failed file only
    else:
        tokens = [status for method, path, status in hub.requests if "/xet-read-token/" in path]
        assert tokens == [403, 200] and fetched["common.pt"] == 0, (tokens, fetched)  # through Xet, not GET
    assert not [p.name for p in ckpt_b.iterdir() if p.name.startswith(relay.HUB_STAGING_PREFIX)]
    # what b restored was exact: its run ends with the weights of an uninterrupted one
    assert (ckpt_b / relay.iteration_dirname(11) / "common.pt").read_bytes() == fake_slime_checkpoint(12, CKPT_BYTES)


@pytest.mark.slow(20)
def test_a_restore_killed_mid_file_fetches_again_only_the_file_it_had_not_finished_and_sweeps_its_remains(
        cluster, hub):
    """hf_transfer: lfs, whose downloads the test Hub can slow down; on Xet the same folder and
    the same client code skip the files already complete (see the failed-download test)."""
    big = 400_000
    hub.lfs_threshold = big // 2
    cluster.hub, cluster.hf_transfer = hub, "lfs"  # hub.download_bytes_per_second paces the plain HTTP path
    cluster.start_commander(lease=2)
    knobs = slime_env(FAKE_NUM_ROLLOUT="8", FAKE_SAVE_INTERVAL="2", FAKE_CKPT_BYTES=str(big), FAKE_STEP_SECONDS="0.5")
    on_hub = {"hf_repo": HUB_REPO, "hf_sync_interval_seconds": 0.2, "hf_prefetch": False}
    worker_a = cluster.start_worker("a", l1_root=str(cluster.tmp / "pod-a"), env=knobs, **on_hub)
    wait_for("checkpoint 3 on the Hub", lambda: hub_record(cluster).get("iteration", 0) >= 3, 30)
    os.kill(worker_a.pid, signal.SIGKILL)
    recorded = hub_record(cluster)
    hub.download_bytes_per_second = big / 4  # the checkpoint file takes 4 s: b is killed while it is in flight
    worker_b = cluster.start_worker("b", l1_root=str(cluster.tmp / "pod-b"), env=knobs, **on_hub)
    staging = cluster.ckpt_dir(l1="pod-b") / f"{relay.HUB_STAGING_PREFIX}{recorded['revision']}"
    manifest = staging / "runs" / "r1" / "ckpt" / relay.iteration_dirname(recorded["iteration"]) / "relay_manifest.json"
    # One file at a time: the manifest, then the checkpoint file (then the dataset state).
    partial = wait_for("the checkpoint file in flight", lambda: manifest.exists() and [
        p for p in staging.rglob("*.incomplete") if p.parent.name.startswith("iter_")], 30)[0]
    os.kill(worker_b.pid, signal.SIGKILL)
    worker_c = cluster.start_worker("c", l1_root=str(cluster.tmp / "pod-b"), env=knobs, **on_hub)  # the same volume
    # b's partial file goes before c's download starts (c's own takes 4 s), not with the folder at the end
    wait_for("b's partial file swept while c downloads", lambda: not partial.exists() and
             "fetched checkpoint" not in cluster.log("c"), 30)
    assert worker_c.wait(60) == 0
    assert resumed_from(cluster.run("r1"), "c")[0].startswith(f"c resumes from checkpoint {recorded['iteration']} in the Hub")
    fetched = collections.Counter(path.rsplit("/", 1)[1] for method, path, _ in hub.requests
                                  if method == "GET" and f"/resolve/{recorded['revision']}/" in path)
    assert fetched["relay_manifest.json"] == 1, fetched  # complete before the kill: not fetched again
    assert fetched["common.pt"] == 2, fetched  # the file in flight, from its start
    assert fetched[f"global_dataset_state_dict_{recorded['iteration']}.pt"] == 1, fetched
    assert not staging.exists()
    final = cluster.ckpt_dir(l1="pod-b") / relay.iteration_dirname(7) / "common.pt"
    assert final.read_bytes() == fake_slime_checkpoint(8, big)  # no byte of b's partial file in c's weights


UPLOAD_TWICE = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
import relay
cfg = relay.validate_run_config(relay.RunConfig(commander_url="http://127.0.0.1:9", run_id="r1", mode="sft",
                                                hf_repo=sys.argv[2], l1_root=sys.argv[3], hf_transfer=sys.argv[5]),
                                "test")
ckpt = relay.CheckpointDir(cfg.run_dir, require_dataset_state=False)
os.makedirs(os.path.join(ckpt.path, "iter_0000001"))
with open(os.path.join(ckpt.path, "iter_0000001", "common.pt"), "wb") as handle:
    handle.write(os.urandom(int(sys.argv[4])))
with open(os.path.join(ckpt.path, relay.TRACKER_FILE), "w") as handle:
    handle.write("1")
manifest = ckpt.seal(1, 1, "a")
store = relay.HubStore(cfg)
store.check()
outcomes = []
for attempt in range(2):
    try:
        outcomes.append(store.upload(ckpt, manifest, [], None, "checkpoint 1", lambda: True))
    except Exception as exc:
        outcomes.append(relay.hub_error_text(exc))
print(json.dumps(outcomes))
"""


def upload_twice(cluster: Cluster, hub, transfer: str, size: int = CKPT_BYTES) -> subprocess.CompletedProcess:
    """UPLOAD_TWICE in a process of its own (huggingface_hub reads HF_ENDPOINT at import)."""
    env = cluster.env(HF_ENDPOINT=hub.url, HF_TOKEN=hub.token, HF_HOME=str(cluster.tmp / "hf"))
    return subprocess.run([sys.executable, "-c", UPLOAD_TWICE, os.path.dirname(RELAY), HUB_REPO, str(cluster.tmp),
                           str(size), transfer], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("landed", [False, True], ids=["commit refused", "commit landed, answer lost"])
def test_a_commit_retry_sends_no_file_twice_and_a_commit_that_landed_despite_an_error_is_not_repeated(
        cluster, hub, landed, transfer):
    from testing.hub_server import Fault

    hub.lfs_threshold = CKPT_BYTES // 2
    hub.inject(Fault("/commit/", status=504, after=landed))
    result = upload_twice(cluster, hub, transfer)
    assert result.returncode == 0, result.stderr
    failed, revision = json.loads(result.stdout.splitlines()[-1])
    assert failed.startswith("HTTP 504") and revision == hub.head(HUB_REPO)
    checkpoint_file = "runs/r1/ckpt/iter_0000001/common.pt"
    assert checkpoint_file in hub.lfs_paths_at(HUB_REPO, revision)
    assert (checkpoint_file in hub.xet_paths_at(HUB_REPO, revision)) == (transfer == "xet")
    assert hub.preuploaded[checkpoint_file] == 1  # the retry reused the uploaded file: its bytes went once
    requests = collections.Counter((method, path.rsplit("/", 2)[-2]) for method, path, _ in hub.requests)
    assert [method for method, _, _ in hub.requests].count("PUT") == (transfer == "lfs")  # LFS: one PUT of the bytes
    assert requests["POST", "commit"] == (1 if landed else 2), requests
    assert ("had landed" in result.stderr + result.stdout) == landed


def test_a_hub_download_that_cannot_fit_on_the_volume_says_what_is_missing_before_it_starts(tmp_path):
    cfg = relay.validate_run_config(relay.RunConfig(commander_url="http://127.0.0.1:9", run_id="r1", mode="sft",
                                                    l1_root=str(tmp_path)), "test")
    relay.check_free_space(str(tmp_path), 1000, "fetching checkpoint 5 (1000 bytes)", cfg)  # fits: no word
    with pytest.raises(OSError) as refused:
        relay.check_free_space(str(tmp_path), 10 ** 18, "fetching checkpoint 5 (1000000000000000000 bytes)", cfg)
    assert re.fullmatch(rf"not enough free space in {tmp_path} for fetching checkpoint 5 \(1000000000000000000 "
                        r"bytes\): needs 1000000000.00 GB more, [0-9.]+ GB free \(the volume must hold "
                        r"\(keep_last_checkpoints \+ 2\) x one checkpoint: 5 here\)", str(refused.value))


def test_a_dry_run_sends_nothing_to_the_hub_and_says_what_it_would_upload(cluster, hub):
    cluster.hub = hub
    cluster.start_commander(lease=2)
    worker = cluster.start_worker("a", hf_repo=HUB_REPO, hf_dry_run=True, hf_sync_interval_seconds=0.5,
                                  env={"MOCK_MAX_STEPS": "20"})
    assert worker.wait(30) == 0
    assert hub.requests == []
    assert "dry run: would commit" in cluster.log("a")
    assert completed(cluster)


def test_rl_rollout_trajectories_arrive_on_the_hub_complete(cluster, hub):
    cluster.hub = hub
    cluster.start_commander(lease=2)
    worker = cluster.start_worker("a", mode="rl", hf_repo=HUB_REPO, hf_sync_interval_seconds=0.5,
                                  save_rollout_trajectories=True, rollout_trajectory_pattern="rollout_{rollout_id:08d}.pt",
                                  env={"MOCK_MAX_STEPS": "20"})
    assert worker.wait(40) == 0
    final = hub_record(cluster)
    files = hub.files_at(HUB_REPO, final["revision"])
    local = sorted((cluster.tmp / "volume" / "runs" / "r1" / "rollout").iterdir())
    assert [p.name for p in local] == sorted(f"rollout_{k}.pt" for k in range(1, 21))
    for path in local:
        assert files[f"runs/r1/rollout/00000000-00000999/{path.name}"] == path.read_bytes()


def test_trajectories_go_to_hub_folders_of_at_most_1000_files_and_a_rewritten_one_is_uploaded_again(tmp_path):
    cfg = relay.validate_run_config(relay.RunConfig(
        commander_url="http://127.0.0.1:9", run_id="r1", mode="rl", save_rollout_trajectories=True,
        l1_root=str(tmp_path)), "test")
    folders = collections.Counter(relay.trajectory_path_in_repo(f"rollout/rollout_{k}.pt").rsplit("/", 1)[0]
                                  for k in range(25_000))
    assert len(folders) == 25 and max(folders.values()) == 1000
    sync = relay.HubSync(None, relay.CheckpointDir(cfg.run_dir, require_dataset_state=False), cfg,
                         lambda **_: True, lambda: True)
    sync.trainer_stopped = True
    rollout = Path(cfg.rollout_dir)
    rollout.mkdir(parents=True)
    for k in range(3):
        (rollout / f"rollout_{k}.pt").write_text(f"rollout {k}")
    found = sync.finished_trajectories()
    assert [Path(p).name for p in found] == ["rollout_0.pt", "rollout_1.pt", "rollout_2.pt"]
    sync.remember_uploaded({p: relay.file_version(p) for p in found})
    assert sync.finished_trajectories() == []
    (rollout / "rollout_1.pt").write_text("rollout 1, written again after a resume")
    assert [Path(p).name for p in sync.finished_trajectories()] == ["rollout_1.pt"]


@pytest.mark.parametrize("token, public, words", [
    ("", False, "HF_TOKEN is not in the environment"),
    ("hf_wrong", False, "HTTP 401"),
    ("hf_readonly0123456789", False, f"hf_repo {HUB_REPO}: HF_TOKEN cannot write to this repo (HTTP 403"),
    ("hf_testtoken0123456789", True, f"hf_repo {HUB_REPO} is a PUBLIC repo"),
], ids=["no token", "invalid token", "read-only token", "public repo"])
def test_a_token_that_cannot_write_or_a_public_repo_stops_the_worker_before_any_trainer_runs(
        cluster, hub, token, public, words):
    cluster.hub = hub
    hub.create(HUB_REPO, private=not public)
    cluster.start_commander(lease=2)
    config = cluster.write_config("a", hf_repo=HUB_REPO)
    env = cluster.env(HF_ENDPOINT=hub.url, HF_TOKEN=token, HF_HOME=str(cluster.tmp / "hf"))
    result = subprocess.run([sys.executable, RELAY, "worker", str(config)], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 2 and words in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and (not token or token not in result.stderr)
    assert cluster.run("r1") == {}  # never even asked for the lease
    assert not [path for method, path, _ in hub.requests if method in ("POST", "PUT") and "/create" not in path]


# --------------------------------------------------------------------------- slime as the trainer

FAKE_SLIME = f"{sys.executable} {os.path.join(os.path.dirname(RELAY), 'testing', 'fake_slime.py')}"


def fake_slime_checkpoint(num_rollout: int, size: int) -> bytes:
    """The common.pt the slime stand-in writes after `num_rollout` rollouts of an uninterrupted run."""
    from testing.fake_slime import BASE_WEIGHTS, next_weights, weights_file

    weights = BASE_WEIGHTS
    for rollout in range(num_rollout):
        weights = next_weights(weights, rollout)
    return weights_file(weights, size)


def slime_env(**knobs: str) -> dict[str, str]:
    """A worker whose launch_sft.sh runs the fake slime command, as SLIME_SFT_CMD would."""
    return {"SLIME_SFT_CMD": FAKE_SLIME, **knobs}


def test_a_slime_checkpoint_is_sealed_and_uploaded_only_after_its_dataset_state_exists(cluster, hub):
    cluster.hub = hub
    cluster.start_commander(lease=3)
    worker = cluster.start_worker("a", hf_repo=HUB_REPO, hf_sync_interval_seconds=0.5, total_steps=9,
                                  env=slime_env(FAKE_NUM_ROLLOUT="9", FAKE_SAVE_INTERVAL="3", FAKE_STATE_DELAY="1.5"))
    assert worker.wait(60) == 0
    written = {}
    for line in cluster.log("a").splitlines():
        if "wrote dataset state" in line:
            words = line.split()
            written[int(words[-3])] = float(words[-1])
    run = cluster.run("r1")
    sealed = {int(e["msg"].split()[1]): e["at"] for e in run["events"] if e["msg"].startswith("checkpoint ")
              and " sealed by " in e["msg"]}
    assert sealed and set(sealed) <= set(written)
    for iteration, at in sealed.items():
        assert at >= written[iteration], f"checkpoint {iteration} sealed before its dataset state was written"
    for commit in hub.repos[HUB_REPO].commits.values():
        for path in commit.files:
            if path.endswith("/relay_manifest.json"):
                iteration = int(path.split("/")[-2][len("iter_"):])
                assert f"runs/r1/ckpt/rollout/global_dataset_state_dict_{iteration}.pt" in commit.files
    assert run["hub"]["iteration"] == 8 and run["step"] == 8  # slime's rollout ids, 0-based


def test_slimes_real_prefixed_lines_give_the_rollout_id_as_step_and_the_policy_loss():
    progress = relay.Progress()
    actor = "(MegatronTrainRayActor pid=4242) [2026-08-21 10:00:00]"
    for rollout in (6, 7):
        progress.observe(f"{actor} train_metric_utils.py:135 - rollout {rollout}: {{'rollout/raw_reward': 0.5}}")
        for step in range(rollout * 4, rollout * 4 + 4):  # several train steps per rollout
            progress.observe(f"{actor} model.py:918 - step {step}: {{'train/kl_loss': 9.0, 'train/loss': 0.25, "
                             f"'train/step': {step}}}")
            progress.observe(f"{actor} model.py:918 - critic-step {step}: {{'train/critic-value_loss': 7.0}}")
    assert (progress.step, progress.loss) == (7, 0.25)
    mock = relay.Progress()
    mock.observe("step 12/40 loss 0.031250")
    assert (mock.step, mock.loss) == (12, 0.03125)


@pytest.mark.parametrize("async_save", [False, True])
def test_a_slime_checkpoint_is_complete_once_its_tracker_and_dataset_state_both_exist_in_either_order(tmp_path,
                                                                                                    async_save):
    ckpt = relay.CheckpointDir(str(tmp_path), require_dataset_state=True)
    (Path(ckpt.path) / relay.iteration_dirname(5)).mkdir()
    (Path(ckpt.path) / relay.iteration_dirname(5) / "common.pt").write_text("weights")
    tracker = Path(ckpt.path) / relay.TRACKER_FILE
    state = Path(ckpt.path) / relay.dataset_state_relpath(5)
    state.parent.mkdir()
    first, second = ((state, "data position"), (tracker, "5")) if async_save else ((tracker, "5"), (state, "data"))
    first[0].write_text(first[1])  # --async-save: the state file of 5 exists before tracker 5
    assert ckpt.seal_newest(1, "a", writer_alive=False) is None
    second[0].write_text(second[1])
    old = time.time() - 2 * relay.SEAL_SETTLE_SECONDS
    os.utime(state, (old, old))
    manifest = ckpt.seal_newest(1, "a", writer_alive=True)
    assert manifest is not None and relay.dataset_state_relpath(5) in manifest.files


def test_every_restart_of_a_run_logs_to_one_wandb_run_unless_the_user_chose_one(cluster):
    cluster.url = "http://127.0.0.1:9"  # never contacted
    cfg = relay.load_run_config(str(cluster.write_config("a")))
    first = relay.trainer_environment(cfg, 1, None, "/ckpt", "tag1")
    again = relay.trainer_environment(cfg, 7, 5, "/ckpt", "tag2")
    assert first["WANDB_RUN_ID"] == again["WANDB_RUN_ID"] and first["WANDB_RESUME"] == "allow"
    other = relay.load_run_config(str(cluster.write_config("a", run_id="r2")))
    assert relay.trainer_environment(other, 1, None, "/ckpt", "t")["WANDB_RUN_ID"] != first["WANDB_RUN_ID"]
    mine = relay.load_run_config(str(cluster.write_config("a", env={"WANDB_RUN_ID": "mine", "WANDB_RESUME": "must"})))
    chosen = relay.trainer_environment(mine, 1, None, "/ckpt", "t")
    assert (chosen["WANDB_RUN_ID"], chosen["WANDB_RESUME"]) == ("mine", "must")


def test_a_converted_base_checkpoint_is_loaded_first_and_never_pruned_or_counted_as_progress(cluster):
    ckpt = cluster.ckpt_dir()
    (ckpt / "release").mkdir(parents=True)
    (ckpt / "release" / "common.pt").write_text("base weights")
    (ckpt / relay.TRACKER_FILE).write_text("release")
    cluster.start_commander(lease=3)
    worker = cluster.start_worker("a", keep_last_checkpoints=1, total_steps=9,
                                  env=slime_env(FAKE_NUM_ROLLOUT="9", FAKE_SAVE_INTERVAL="3"))
    assert worker.wait(60) == 0
    assert "loading the base checkpoint" in cluster.log("a")
    run = cluster.run("r1")
    assert resumed_from(run, "a")[0].startswith("a resumes from a cold start")
    assert (ckpt / "release" / "common.pt").read_text() == "base weights"
    assert run["latest_checkpoint"]["iteration"] == 8
    assert relay.CheckpointDir(str(ckpt.parent), True).sealed_iterations() == [8]


def test_a_pod_with_fewer_gpus_than_slime_waits_for_is_named_at_start_and_ends_as_a_stall(cluster):
    cluster.start_commander(lease=2, extra=("--max-failed-leases", "1"))
    worker = cluster.start_worker("a", stall_timeout_seconds=2, max_trainer_restarts=0, env={
        "SLIME_SFT_CMD": f"{FAKE_SLIME} --actor-num-nodes 1 --actor-num-gpus-per-node 8", "FAKE_PLACEMENT_WAIT": "1",
        "FAKE_GPU_COUNT": "2", "PATH": f"{FAKE_CLIS}:{os.environ['PATH']}"})
    assert worker.wait(30) == 1  # its output every 0.2 s did not hold the lease
    log = cluster.log("a")
    assert log.count("this pod has 2 GPUs but slime asks for 8") == 1
    run = cluster.run("r1")
    assert run["status"] == "FAILED"
    assert "waiting for a placement group of 8 GPUs, 2 registered with Ray" in run["leases"][-1]["why"]
    assert any("this pod has 2 GPUs" in event["msg"] for event in run["events"])


def test_the_trainer_is_told_the_pods_gpu_count_and_a_command_registering_more_with_ray_is_named_at_start(cluster):
    cluster.start_commander(lease=2)
    worker = cluster.start_worker("a", trainer_command=(
        ': ray start --head --num-gpus 8;'  # what a command fixing 8 GPUs would run, on this 2-GPU pod
        ' printf %s "$RELAY_NUM_GPUS" > "$RELAY_CKPT_DIR/../gpus.txt"'),
        env={"FAKE_GPU_COUNT": "2", "PATH": f"{FAKE_CLIS}:{os.environ['PATH']}"})
    assert worker.wait(30) == 0
    assert (cluster.tmp / "volume" / "runs" / "r1" / "gpus.txt").read_text() == "2"
    assert "this pod has 2 GPUs but `ray start --num-gpus 8` registers 8 with Ray" in cluster.log("a")


def process_alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(") ", 1)[1][0] != "Z"
    except OSError:
        return False


# How each stop finds the renamed child: the cgroup, or (without one, as in most containers)
# the worker's subreaper tree, and after the worker's death the watchdog's record of it.
@pytest.mark.parametrize("how, cgroup", [("sigterm", "on"), ("lease lost", "off"), ("worker killed", "off")])
def test_stopping_a_slime_trainer_leaves_no_process_behind_even_renamed_in_a_new_session(cluster, how, cgroup):
    cluster.start_commander(lease=2)
    worker = cluster.start_worker("a", stop_grace_seconds=2, env=slime_env(
        FAKE_NUM_ROLLOUT="1000", FAKE_SETSID_CHILD="1", FAKE_STEP_SECONDS="0.2", RELAY_TRAINER_CGROUP=cgroup))
    heartbeats = cluster.tmp / "volume" / "runs" / "r1"
    beat = wait_for("the renamed child to beat", lambda: list(heartbeats.glob("heartbeat-*")), 20)[0]
    child = int(beat.name.split("-")[1])
    try:
        assert child not in cluster.trainer_pids(), "setproctitle hides the child's environment"
        in_cgroup = "trainer started in its own cgroup" in cluster.log("a")
        assert in_cgroup == (cgroup == "on" and cgroups_here()), "the stop under test is the one this case names"
        ppid = int(open(f"/proc/{child}/stat").read().rsplit(") ", 1)[1].split()[1])
        assert ppid == worker.pid, "its parent exited: it is the worker's (a child subreaper), not init's"
        wait_for("15 rollouts, 3 s: the watchdog has recorded the tree since the child started",
                 lambda: cluster.run("r1").get("step", 0) >= 15, 20)
        worker.send_signal({"sigterm": signal.SIGTERM, "lease lost": signal.SIGSTOP, "worker killed": signal.SIGKILL}[how])
        try:
            wait_for("every trainer process to be gone, the renamed child too",
                     lambda: not cluster.trainer_pids() and not process_alive(child), 10)
        finally:
            if how == "lease lost":
                worker.send_signal(signal.SIGCONT)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)  # the harness finds test processes by environment: not this one


def cgroups_here() -> bool:
    """Whether this machine lets the worker make a trainer's cgroup (most containers do not)."""
    probe = relay.make_trainer_cgroup(f"probe-{uuid.uuid4().hex}")
    relay.remove_cgroup(probe)
    return bool(probe)


def test_a_trainer_starts_in_its_cgroup_from_a_worker_holding_dozens_of_open_files(cluster):
    if not cgroups_here():
        pytest.skip("needs a writable cgroup v2 hierarchy to make the trainer's cgroup in")
    # After a Xet prefetch the worker holds many files: its pipe to the trainer's launcher is
    # then numbered 10 or more, which dash cannot name in a redirection.
    cluster.start_commander(lease=3)
    worker = cluster.start_worker("a", open_files=40, env={"RELAY_TRAINER_CGROUP": "on"})
    assert worker.wait(60) == 0, cluster.log("a")
    assert "trainer started in its own cgroup" in cluster.log("a")
    assert cluster.run("r1")["status"] == "COMPLETED"


# --------------------------------------------------------------------------- slime on a real Ray cluster

def expected_ray_slime_weights(ref_load: str, num_rollout: int) -> str:
    """The weights of an uninterrupted run: trained on batch 0, 1, ... in order."""
    from testing.fake_slime_ray import base_weights, next_weights

    weights = base_weights(ref_load)
    for batch in range(num_rollout):
        weights = next_weights(weights, batch)
    return weights


def trained_batches(cluster: Cluster, iteration: int) -> list[int]:
    """The global batches the slime stand-in's checkpoint `iteration` was trained on, in order."""
    return json.loads((cluster.ckpt_dir() / relay.iteration_dirname(iteration) / "trained_batches.json").read_text())


@pytest.fixture
def ray_dir(cluster):
    """Ray's temp folders for the test's workers (each worker starts a cluster of its own; short
    paths: Ray's socket paths), removed at the end; `tmp/base_torch_dist` is slime's --ref-load."""
    if shutil.which("ray") is None or subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"]).returncode:
        pytest.skip("needs Ray's CLI (requirements-test.txt) and a private PID namespace (unshare)")
    (cluster.tmp / "base_torch_dist").mkdir()
    made: list[str] = []
    yield lambda: made.append(tempfile.mkdtemp(prefix="ray", dir="/tmp")) or made[-1]
    for folder in made:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow(130)
@pytest.mark.timeout(540)  # three Ray clusters start, 30-60 s each on a loaded 2-core machine
def test_slime_on_real_ray_reports_rollouts_stops_in_seconds_and_a_run_relayed_twice_trains_every_batch_once(cluster,
                                                                                                          ray_dir):
    cluster.start_commander(lease=5)
    settings = {"total_steps": 12, "stop_grace_seconds": 30, "stall_timeout_seconds": 900}
    # a finds Ray's processes without a cgroup, as on most pods (containers); b with one where it can
    a = cluster.start_worker_in_pid_namespace("a", env={**ray_slime_env(cluster.tmp, ray_dir()),
                                                        "RELAY_TRAINER_CGROUP": "off"}, **settings)
    wait_for("worker a to seal a checkpoint", lambda: checkpoint_at_least(cluster, 1), 240)
    running = a.processes()
    assert any(cmd.startswith("sglang::scheduler") for cmd in running.values()), running
    assert any(cmd.startswith("ray::MegatronTrainRayActor") for cmd in running.values()), running
    stopped = time.monotonic()
    os.kill(a.worker, signal.SIGTERM)
    wait_for("worker a to exit and leave nothing in its namespace",
             lambda: a.exit_code() is not None and not a.processes(), 40)
    stop_seconds = time.monotonic() - stopped
    print(f"SIGTERM stop with real Ray: {stop_seconds:.1f} s")
    assert a.exit_code() == 0 and stop_seconds < settings["stop_grace_seconds"]
    log = re.sub(r"\x1b\[[0-9;]*m", "", cluster.log("a"))  # Ray colours its prefixes
    rollouts = [int(n) for n in re.findall(r"\(MegatronTrainRayActor pid=\d+\) \[[^]]+\] "
                                            r"train_metric_utils\.py:135 - rollout (\d+): \{", log)]
    assert rollouts and re.search(r"\] model\.py:918 - step 12: \{", log)  # 4 train steps per rollout
    run = cluster.run("r1")
    assert run["status"] == "PREEMPTED" and run["step"] == max(rollouts)  # the rollout id, not the train step
    assert f"WANDB_RUN_ID={relay.wandb_run_id('r1')}" in log
    assert re.search(r"launch script: Ray job relay-r1-1-\d+ is STOPPED", log)  # slime's stop step, first
    a_sealed = run["latest_checkpoint"]["iteration"]

    b = cluster.start_worker_in_pid_namespace("b", env=ray_slime_env(cluster.tmp, ray_dir()), **settings)
    wait_for("worker b to seal a later checkpoint", lambda: checkpoint_at_least(cluster, a_sealed + 2), 240)
    os.kill(b.worker, signal.SIGTERM)
    wait_for("worker b to exit and leave nothing", lambda: b.exit_code() is not None and not b.processes(), 40)
    c = cluster.start_worker_in_pid_namespace("c", env=ray_slime_env(cluster.tmp, ray_dir()), **settings)
    wait_for("worker c to finish the run and leave nothing", lambda: c.exit_code() is not None and not c.processes(), 240)
    assert b.exit_code() == 0 and c.exit_code() == 0
    run = cluster.run("r1")
    assert run["status"] == "COMPLETED" and run["latest_checkpoint"]["iteration"] == 11
    assert [lease["worker_id"] for lease in run["leases"]] == ["a", "b", "c"]
    assert resumed_from(run, "b")[0].startswith("b resumes from checkpoint ")
    # train.py resumes on the batch after the last saved one: two handoffs, every batch once, in order
    assert trained_batches(cluster, 11) == list(range(12))
    ckpt = cluster.ckpt_dir()
    final = (ckpt / relay.iteration_dirname(11) / "common.pt").read_text()
    assert final == expected_ray_slime_weights(str(cluster.tmp / "base_torch_dist"), 12)
    every = log + "".join(re.sub(r"\x1b\[[0-9;]*m", "", cluster.log(name)) for name in "bc")
    # --async-save's order, by the times the two processes logged (Ray forwards each actor's lines
    # on its own, so two lines written 2 ms apart by two actors can reach the log either way round)
    for iteration in relay.CheckpointDir(str(ckpt.parent), True).sealed_iterations():
        state_at = float(re.search(rf"wrote dataset state {iteration} at ([\d.]+)", every)[1])
        saved = re.search(rf"\[([-\d: ]+),(\d+)\] checkpointing\.py:541 - successfully saved checkpoint from "
                          rf"iteration {iteration} ", every)
        saved_at = time.mktime(time.strptime(saved[1], "%Y-%m-%d %H:%M:%S")) + int(saved[2]) / 1000
        assert state_at <= saved_at + 0.001  # logging truncates to the millisecond, the stand-in rounds


@pytest.mark.slow(75)
@pytest.mark.timeout(420)
def test_slimes_train_async_form_would_skip_a_batch_at_every_handoff_which_is_why_sft_runs_train_py(cluster,
                                                                                                     ray_dir):
    cluster.start_commander(lease=5)
    settings = {"total_steps": 6, "stop_grace_seconds": 30, "stall_timeout_seconds": 900}
    a = cluster.start_worker_in_pid_namespace(
        "a", env=ray_slime_env(cluster.tmp, ray_dir(), num_rollout=6, extra="--fake-train-async"), **settings)
    wait_for("worker a to seal a checkpoint", lambda: checkpoint_at_least(cluster, 1), 240)
    os.kill(a.worker, signal.SIGTERM)
    wait_for("worker a to exit", lambda: a.exit_code() is not None and not a.processes(), 40)
    resumed = cluster.run("r1")["latest_checkpoint"]["iteration"]
    b = cluster.start_worker_in_pid_namespace(
        "b", env=ray_slime_env(cluster.tmp, ray_dir(), num_rollout=6, extra="--fake-train-async"), **settings)
    wait_for("worker b to finish the run", lambda: b.exit_code() is not None, 240)
    assert b.exit_code() == 0 and cluster.run("r1")["status"] == "COMPLETED"
    # generate(N + 1) ran before save(N): the data position saved at N had consumed batch N + 1
    assert trained_batches(cluster, 5) == [batch for batch in range(7) if batch != resumed + 1]


@pytest.mark.slow(40)
@pytest.mark.timeout(300)
def test_a_command_registering_gpus_the_pod_lacks_is_named_at_start_and_its_job_fails_on_cuda(cluster, ray_dir):
    cluster.start_commander(lease=5, extra=("--max-failed-leases", "1"))
    env = ray_slime_env(cluster.tmp, ray_dir(), gpus=2)  # slime's own scripts with a fixed 8, on a 2-GPU pod
    env["SLIME_SFT_CMD"] = env["SLIME_SFT_CMD"].replace("$RELAY_NUM_GPUS", "8")
    a = cluster.start_worker_in_pid_namespace("a", env=env, max_trainer_restarts=0, stop_grace_seconds=30)
    wait_for("worker a to give up", lambda: a.exit_code() is not None, 240)
    log = cluster.log("a")
    assert a.exit_code() == 1 and cluster.run("r1")["status"] == "FAILED"
    assert "this pod has 2 GPUs but `ray start --num-gpus 8` registers 8 with Ray" in log
    assert "CUDA error: invalid device ordinal" in log  # Ray placed the job on GPUs that are not there


def start_ray_nodes(cluster: Cluster, ray_dir, launch: str, num_rollout: int) -> list[tuple[str, dict[str, str]]]:
    """The two nodes of a run (`ray_slime_node_environments`, the RolloutManager on node 1): each
    node's name and environment, not started yet."""
    envs = ray_slime_node_environments(cluster.tmp, [ray_dir(), ray_dir()], f"relay-r1-{launch}", num_rollout,
                                       "--fake-rollout-manager-on-last-node")
    return [(f"{launch}-node{k}", env) for k, env in enumerate(envs)]


def run_node(cluster: Cluster, node: tuple[str, dict[str, str]]) -> PidNamespace:
    return cluster.start_in_pid_namespace(node[0], ["bash", "-c", node[1]["SLIME_SFT_CMD"]], node[1])


def end_nodes(*nodes: PidNamespace) -> None:
    """Stop every process of these nodes (each node's namespace holds exactly its processes)."""
    for node in nodes:
        os.killpg(node.unshare.pid, signal.SIGKILL)  # its first process: the kernel ends the rest
    wait_for("every Ray process of the nodes to end", lambda: not any(node.processes() for node in nodes), 60)


def run_two_nodes(cluster: Cluster, ray_dir, launch: str, num_rollout: int) -> int:
    """Both nodes' commands, member first; node 0's exit status (the job's)."""
    head, member = start_ray_nodes(cluster, ray_dir, launch, num_rollout)
    nodes = [run_node(cluster, member), run_node(cluster, head)]
    try:
        return wait_for(f"{launch}'s job to end", lambda: nodes[1].exit_code() is not None and [nodes[1].exit_code()],
                        300)[0]
    finally:
        end_nodes(*nodes)


def files_of(folder: Path) -> set[str]:
    return {path.name for path in folder.iterdir()} if folder.exists() else set()


@pytest.mark.slow(90)
@pytest.mark.timeout(600)  # three 2-node Ray clusters start, 30-60 s each on a loaded 2-core machine
def test_slime_on_two_ray_nodes_waits_for_the_member_keeps_each_ranks_shard_on_its_node_and_resumes_only_complete(
        cluster, ray_dir):
    head, member = start_ray_nodes(cluster, ray_dir, "first", num_rollout=2)
    node0 = run_node(cluster, head)
    wait_for("node 0 to say it waits for node 1's GPUs",
             lambda: "Waiting for placement group of 4 GPUs (elapsed" in cluster.log(head[0])
             and "2 GPUs registered with Ray" in cluster.log(head[0]),
             120)
    assert "starting at rollout" not in cluster.log(head[0])  # the job waits for the member
    node1 = run_node(cluster, member)
    try:
        wait_for("the 2-node job to end", lambda: node0.exit_code() is not None, 300)
    finally:
        end_nodes(node0, node1)
    assert node0.exit_code() == 0, cluster.log(head[0])
    assert "relay: all 4 GPUs of 2 node(s) are in Ray" in cluster.log(head[0])
    ck0, ck1 = cluster.tmp / "node0", cluster.tmp / "node1"
    iteration = relay.iteration_dirname(1)
    # every rank's shard on its own node's disk; rank 0's files and the tracker on node 0 only
    assert files_of(ck0 / iteration) == {"__0_0.distcp", "__1_0.distcp", ".metadata", "common.pt", "metadata.json",
                                         "trained_batches.json"}
    assert files_of(ck1 / iteration) == {"__2_0.distcp", "__3_0.distcp"}
    assert (ck0 / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert not (ck1 / "latest_checkpointed_iteration.txt").exists()
    # the RolloutManager ran on the member: the data position is on node 1's disk only
    assert files_of(ck1 / "rollout") == {"global_dataset_state_dict_1.pt"} and not (ck0 / "rollout").exists()

    # node 1 gets node 0's files, node 0 misses node 1's shards: the resume fails on node 0, saying which
    for name in files_of(ck0 / iteration):
        shutil.copy(ck0 / iteration / name, ck1 / iteration)
    shutil.copy(ck0 / "latest_checkpointed_iteration.txt", ck1)
    assert run_two_nodes(cluster, ray_dir, "partial", num_rollout=4) == 1
    assert re.search(r"CheckpointException ranks:dict_keys\(\[[01]\]\): FileNotFoundError: \[Errno 2\] No such "
                     rf"file or directory: '{ck0 / iteration}/__2_0.distcp'", cluster.log("partial-node0"))
    assert (ck0 / "latest_checkpointed_iteration.txt").read_text() == "1"

    # the complete checkpoint on both nodes: the run continues and ends as an uninterrupted one
    for name in ("__2_0.distcp", "__3_0.distcp"):
        shutil.copy(ck1 / iteration / name, ck0 / iteration)
    assert run_two_nodes(cluster, ray_dir, "complete", num_rollout=4) == 0, cluster.log("complete-node0")
    assert "starting at rollout 2 of 4" in cluster.log("complete-node0")
    final = ck0 / relay.iteration_dirname(3)
    assert (final / "common.pt").read_text() == expected_ray_slime_weights(str(cluster.tmp / "base_torch_dist"), 4)
    assert json.loads((final / "trained_batches.json").read_text()) == [0, 1, 2, 3]
    assert files_of(ck1 / relay.iteration_dirname(3)) == {"__2_0.distcp", "__3_0.distcp"}


def test_the_worker_and_watchdog_survive_the_pkill_python_that_slime_scripts_run(tmp_path):
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no private PID namespace here (unshare: {probe.stderr.decode().strip()}); "
                    "a broad pkill never runs outside one")
    from testing.harness import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"commander_url": url, "run_id": "r1", "worker_id": "a", "mode": "sft",
                                  "l1_root": str(tmp_path / "volume"), "total_steps": 6}))
    py = sys.executable
    script = tmp_path / "inside.sh"
    script.write_text(f"""
{py} {RELAY} serve --port {port} --lease-seconds 3 --state-path {tmp_path}/state.json > {tmp_path}/commander.log 2>&1 &
until {py} {RELAY} status --commander-url {url} >/dev/null 2>&1; do sleep 0.1; done
SLIME_SFT_CMD="pkill -9 python; sleep 0.5; {FAKE_SLIME}" FAKE_NUM_ROLLOUT=6 FAKE_SAVE_INTERVAL=2 \\
  {py} {RELAY} worker {config} > {tmp_path}/worker.log 2>&1
echo "worker exit $?"
{py} {RELAY} status --commander-url {url} --json
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "MOCK_", "SLIME_"))}
    result = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "bash", str(script)], capture_output=True,
                            text=True, timeout=120, env=env, start_new_session=True)
    log = (tmp_path / "worker.log").read_text()
    assert "worker exit 0" in result.stdout, result.stdout + result.stderr + log
    status = json.loads(result.stdout.split("worker exit 0", 1)[1])
    assert status["runs"][0]["status"] == "COMPLETED"
    assert "watchdog died" not in log and "fake slime: starting" in log


def test_a_trainer_exiting_0_before_the_configured_total_is_a_failure_not_completion(cluster):
    cluster.start_commander(lease=2, extra=("--max-failed-leases", "1"))
    worker = cluster.start_worker("a", total_steps=12, max_trainer_restarts=1,
                                  env=slime_env(FAKE_NUM_ROLLOUT="12", FAKE_EXIT_EARLY_AT="4"))
    assert worker.wait(60) == 1
    assert cluster.run("r1")["status"] == "FAILED"
    assert "before total_steps 12" in cluster.log("a")


def test_relay_slime_args_are_what_the_docs_promise(cluster):
    cluster.start_commander(lease=2)
    worker = cluster.start_worker("a", mode="rl", save_rollout_trajectories=True,
                                  trainer_command='printf %s "$RELAY_SLIME_ARGS" > "$RELAY_CKPT_DIR/../args.txt"')
    assert worker.wait(30) == 0
    run_dir = cluster.tmp / "volume" / "runs" / "r1"
    ckpt = run_dir / "ckpt"
    assert (run_dir / "args.txt").read_text() == (
        f"--load {ckpt} --save {ckpt} --save-debug-rollout-data {run_dir}/rollout/rollout_{{rollout_id}}.pt")
    worker_page = open(os.path.join(os.path.dirname(RELAY), "docs", "worker.md")).read()
    assert "| `RELAY_SLIME_ARGS` | `--load DIR --save DIR [--save-debug-rollout-data PATTERN]` |" in worker_page


def test_the_documented_slime_commands_start_slime_as_its_own_scripts_do():
    import yaml

    slime_page = open(os.path.join(os.path.dirname(RELAY), "docs", "slime.md")).read()
    section = slime_page.split("\n## Starting slime\n", 1)[1].split("\n## ", 1)[0]
    configs = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", section, re.S)]
    commands = {config["mode"]: config["env"][f"SLIME_{config['mode'].upper()}_CMD"] for config in configs}
    assert set(commands) == {"sft", "rl"}
    examples = {}  # the LiveWeb-Arena stacks start slime the same way
    for name in ("stack.liveweb_sft.example.yaml", "stack.liveweb_rl.example.yaml"):
        stack = yaml.safe_load(open(os.path.join(os.path.dirname(RELAY), "examples", name)))
        examples[name] = stack["worker"]["env"][f"SLIME_{stack['run']['mode'].upper()}_CMD"]
    for mode, command in {**commands, **examples}.items():
        assert subprocess.run(["bash", "-n", "-c", command]).returncode == 0, f"{mode}: not valid bash"
        for needed in ("source scripts/models/", '"${MODEL_ARGS[@]}"', "ray start --head",
                       "--dashboard-port $RELAY_RAY_DASHBOARD_PORT", "ray job submit",
                       "--address http://127.0.0.1:$RELAY_RAY_DASHBOARD_PORT", "--submission-id $RELAY_RAY_JOB_ID",
                       "--runtime-env-json", '"CUDA_DEVICE_MAX_CONNECTIONS": "1"', "--ref-load ",
                       "--global-batch-size ", "--save-interval ", "$RELAY_SLIME_ARGS",
                       # GPUs from the pod, never a fixed count a smaller pod would not have
                       "--num-gpus $RELAY_NUM_GPUS", "--actor-num-gpus-per-node $RELAY_NUM_GPUS",
                       # Megatron's default dropout is 0.1; slime's scripts turn it off
                       "--attention-dropout 0.0", "--hidden-dropout 0.0"):
            assert needed in command, f"{mode} command lacks {needed}"
        assert not re.search(r"--(?:num-gpus|actor-num-gpus-per-node|num-gpus-per-node)[= ]+\d", command), mode
        runtime_env = re.search(r"--runtime-env-json '([^']*)'", command).group(1)
        assert json.loads(runtime_env)["env_vars"]["PYTHONPATH"]
        assert "pkill" not in command  # slime's scripts' broad kills have no place under a worker
    for command in (commands["rl"], examples["stack.liveweb_rl.example.yaml"]):
        assert "--colocate" in command or "--rollout-num-gpus " in command
        for flag in ("--num-gpus-per-node $RELAY_NUM_GPUS", "--prompt-data ", "--rm-type "):  # engines, data, reward
            assert flag in command
    for command in (commands["sft"], examples["stack.liveweb_sft.example.yaml"]):
        # train.py: train_async.py saves the data position after prefetching the next batch
        assert "python3 train.py " in command and "train_async.py" not in command
        for flag in ("--loss-type sft_loss", "--calculate-per-token-loss", "--disable-compute-advantages-and-returns",
                     "--debug-train-only", "--prompt-data "):
            assert flag in command
        assert "--custom-generate-function-path" not in command  # SFT's rollout never reads it
    for script in ("launch_sft.sh", "launch_rl.sh"):  # they give the commands the variables they use
        text = open(os.path.join(os.path.dirname(RELAY), script)).read()
        assert "export RELAY_RAY_DASHBOARD_PORT=" in text and "export RELAY_RAY_JOB_ID=" in text
        assert "export PYTHONUNBUFFERED=1" in text
    dockerfile = open(os.path.join(os.path.dirname(RELAY), "Dockerfile")).read()
    tag = re.search(r"^ARG SLIME_IMAGE=slimerl/slime:nightly-dev-(\d{8})", dockerfile, re.M)
    assert tag and tag.group(1) >= "20260804", "slime images before 2026-08-04 restart at rollout 0"


def test_a_misspelled_slime_flag_stops_the_worker_at_start_with_one_line_before_any_lease(cluster):
    cluster.start_commander(lease=2)
    command = (f"{FAKE_SLIME} && python3 train.py --actor-num-gpus-per-node $RELAY_NUM_GPUS --save-intervall 20 "
               "--sglang-mem-frac 0.7 --lr=1e-5 $RELAY_SLIME_ARGS")
    worker = cluster.start_worker("a", env={"SLIME_SFT_CMD": command})
    assert worker.wait(30) == 2
    lines = cluster.log("a").strip().splitlines()
    # --sglang-mem-frac is a prefix slime's SGLang parser takes; --lr=... is --lr
    assert lines == ["relay: error: SLIME_SFT_CMD: slime does not know --save-intervall (did you mean '--save-interval'?) "
                     "and would drop it without a word; fix the command, or set check_slime_flags: false for a "
                     "slime build with flags of its own"]
    assert cluster.run("r1") == {} and "Traceback" not in cluster.log("a")  # never asked for a lease
    cluster.start_worker("b", check_slime_flags=False, env={"SLIME_SFT_CMD": command, "FAKE_NUM_ROLLOUT": "3"})
    wait_for("b, told not to check, to train", lambda: cluster.run("r1").get("holder") == "b", 20)


def test_every_flag_of_the_documented_slime_commands_is_one_slime_accepts():
    import yaml

    known = relay.SlimeFlags.load()
    assert known is not None and len(known.exact) > 1000  # slime's, Megatron's and SGLang's, as pinned
    root = os.path.dirname(RELAY)
    slime_page = open(os.path.join(root, "docs", "slime.md")).read()
    commands = [yaml.safe_load(block).get("env", {}) for block in re.findall(r"```yaml\n(.*?)```", slime_page, re.S)]
    commands = [env[name] for env in commands for name in env if name.startswith("SLIME_")]
    for name in ("stack.liveweb_sft.example.yaml", "stack.liveweb_rl.example.yaml", "stack.2nodes_sft.example.yaml"):
        env = yaml.safe_load(open(os.path.join(root, "examples", name)))["worker"]["env"]
        commands += [env[key] for key in env if key.startswith("SLIME_")]
    assert len(commands) == 5
    for command in commands:
        assert len(relay.slime_command_flags(command)) > 15
        assert relay.unknown_slime_flags(command, known) == []


def test_the_launch_scripts_and_the_image_pass_static_checks():
    root = os.path.dirname(RELAY)
    scripts = [os.path.join(root, name) for name in ("launch_sft.sh", "launch_rl.sh", "docker/entrypoint.sh",
                                                   "docker/install_relay.sh")]
    shellcheck = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True)
    assert shellcheck.returncode == 0, shellcheck.stdout
    dockerfile = os.path.join(root, "Dockerfile")
    hadolint = subprocess.run(["hadolint", dockerfile], capture_output=True, text=True)
    assert hadolint.returncode == 0, hadolint.stdout
    for line in open(dockerfile):
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert os.path.exists(os.path.join(root, source)), f"the Dockerfile copies a missing {source}"


# --------------------------------------------------------------------------- seeing the relay: page, status, logs

ARTIFACTS = os.path.join(os.path.dirname(RELAY), "artifacts")


def basic_auth(secret: str) -> dict[str, str]:
    import base64

    return {"Authorization": "Basic " + base64.b64encode(f"me:{secret}".encode()).decode()}


def test_the_status_page_asks_for_the_password_and_shows_hostile_text_as_text(cluster):
    secret = "s-" + uuid.uuid4().hex
    cluster.start_commander(lease=3, secret=secret)
    worker = cluster.start_worker("a", trainer_command="for i in 1 2 3 4 5 6; do echo '<script>alert(1)</script> step '$i; "
                                                       "sleep 0.4; done")
    assert worker.wait(30) == 0
    status, body, headers = raw_request(cluster, "GET", "/")
    assert status == 401 and b"r1" not in body
    status, body, headers = raw_request(cluster, "GET", "/", headers=basic_auth(secret))
    page = body.decode()
    assert status == 200 and "id='run-r1'" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert(1)" not in page
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert raw_request(cluster, "GET", "/", headers=basic_auth("wrong"))[0] == 401


def test_the_commander_keeps_a_bounded_window_of_trainer_output(cluster):
    cluster.start_commander(lease=30)
    client = cluster.client()
    token = client.post("/api/lease/acquire", {"run_id": "r1", "worker_id": "w1", "mode": "sft"}).body["lease_token"]
    for n in range(100):
        lines = [f"line {n * 50 + i + 1}" for i in range(50)]
        assert client.post("/api/lease/renew", {"run_id": "r1", "worker_id": "w1", "lease_token": token, "step": n,
                                                "loss": 1.0 / (n + 1), "log_lines": lines}).status == 200
    run = cluster.run("r1")
    assert len(run["log_tail"]) == relay.MAX_LOG_LINES and run["log_tail"][-1] == "line 5000"
    logs = client.get("/api/runs/r1/logs?after=4990").body
    assert [item["line"] for item in logs["lines"]] == [f"line {n}" for n in range(4991, 5001)]
    everything = client.get("/api/runs/r1/logs?after=0").body
    assert everything["dropped"] == 5000 - relay.MAX_LOG_LINES and everything["next"] == 5000
    assert len(run["losses"]) == 100


def test_metrics_give_prometheus_each_runs_health_and_the_request_counts(cluster):
    from prometheus_client.parser import text_string_to_metric_families

    secret = "s-" + uuid.uuid4().hex
    cluster.start_commander(lease=30, secret=secret)
    client = cluster.client()
    token = client.post("/api/lease/acquire", {"run_id": "r1", "worker_id": "w1", "mode": "sft"}).body["lease_token"]
    client.post("/api/lease/acquire", {"run_id": "idle", "worker_id": "w3", "mode": "sft"})
    held = {"run_id": "r1", "lease_token": token}
    assert client.post("/api/job/report", dict(held, step=7, status="RESTARTING", sync_error="503 from the Hub",
                                               latest_ckpt={"iteration": 5, "manifest_sha256": "a" * 64},
                                               hf={"repo": "tester/x", "revision": "b" * 40, "iteration": 5,
                                                   "manifest_sha256": "a" * 64})).status == 200
    assert client.post("/api/lease/release", dict(held, worker_id="w1", status="PREEMPTED", step=7)).status == 200
    assert client.post("/api/lease/acquire", {"run_id": "r1", "worker_id": "w2", "mode": "sft"}).body["epoch"] == 2
    status, body, headers = raw_request(cluster, "GET", "/metrics", headers=basic_auth(secret))
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def value(name: str, run_id: str = "r1", **labels: str) -> float:
        return samples[(name, tuple(sorted(dict(labels, run_id=run_id).items())))]

    assert value("relay_run_status", status="RUNNING") == 1 and value("relay_run_status", status="PREEMPTED") == 0
    assert (value("relay_run_step"), value("relay_run_epoch"), value("relay_run_handoffs")) == (7, 2, 1)
    assert (value("relay_run_trainer_restarts"), value("relay_run_sync_error")) == (1, 1)
    assert 0 < value("relay_run_lease_expires_in_seconds") <= 30 and 0 <= value("relay_run_seconds_since_renewal") < 30
    assert 0 <= value("relay_run_seconds_since_checkpoint") < 60 and 0 <= value("relay_run_seconds_since_hub_revision") < 60
    assert value("relay_run_seconds_without_holder") == 0 and value("relay_run_handoffs", "idle") == 0
    acquires = samples[("relay_commander_requests_total", (("endpoint", "/api/lease/acquire"), ("status", "200")))]
    assert acquires == 3
    assert raw_request(cluster, "GET", "/metrics")[0] == 401


@pytest.fixture
def webhook():
    from testing.webhook_server import WebhookServer

    hook = WebhookServer().start()
    try:
        yield hook
    finally:
        hook.stop()


def test_a_notify_url_hears_of_a_handoff_a_completion_a_sync_error_and_a_run_left_without_holder(cluster, webhook):
    webhook.fail_next = 2  # the first message is answered 500 twice: retried, it still arrives
    cluster.start_commander(lease=3, env={"RELAY_NOTIFY_URL": webhook.url}, extra=("--notify-no-holder-seconds", "1"))
    client = cluster.client()
    token = client.post("/api/lease/acquire", {"run_id": "r2", "worker_id": "w9", "mode": "sft"}).body["lease_token"]
    for error in ("503 from the Hub", "503 again", ""):
        assert client.post("/api/job/report", {"run_id": "r2", "lease_token": token, "sync_error": error}).status == 200
    assert client.post("/api/lease/release", {"run_id": "r2", "worker_id": "w9", "lease_token": token,
                                              "status": "PREEMPTED"}).status == 200
    relayed_run(cluster)
    done = wait_for("the completion message", lambda: webhook.events("completed"), 15)
    assert done[0]["run_id"] == "r1" and done[0]["step"] == 40 and "COMPLETED" in done[0]["text"]
    handoff = webhook.events("handoff")
    assert [(m["run_id"], m["from_worker"], m["to_worker"]) for m in handoff] == [("r1", "a", "b")]
    assert handoff[0]["restored_checkpoint"] >= 10
    assert handoff[0]["steps_lost"] == handoff[0]["step"] - handoff[0]["restored_checkpoint"]
    assert [m["error"] for m in webhook.events("sync_error")] == ["503 from the Hub"]  # once per failing stretch
    assert [m["run_id"] for m in webhook.events("sync_recovered")] == ["r2"]
    # r2 has had no holder since its release (r1 may have had a second without one during its handoff).
    wait_for("the no-holder message", lambda: [m for m in webhook.events("no_holder") if m["run_id"] == "r2"], 10)
    assert all(m["text"] == m["content"] and m["text"] for m in webhook.messages)
    assert webhook.secret_path not in cluster.log("commander")


def test_a_hanging_notification_receiver_delays_no_lease_answer(cluster, webhook):
    webhook.hang = True
    cluster.start_commander(lease=30, env={"RELAY_NOTIFY_URL": webhook.url})
    # A request that waited for the receiver would wait its 10 s: the client gives up at 5 s.
    assert relay.NOTIFY_TIMEOUT_SECONDS > 5
    client = relay.CommanderClient(cluster.url, timeout=5)
    held = client.post("/api/lease/acquire", {"run_id": "held", "worker_id": "w0", "mode": "sft"}).body
    for n in range(40):  # each run's completion is a message the receiver never takes
        token = client.post("/api/lease/acquire", {"run_id": f"r{n}", "worker_id": "w1", "mode": "sft"}).body["lease_token"]
        assert client.post("/api/lease/release", {"run_id": f"r{n}", "worker_id": "w1", "lease_token": token,
                                                  "status": "COMPLETED"}).status == 200
        renewal = client.post("/api/lease/renew", {"run_id": "held", "worker_id": "w0", "lease_token": held["lease_token"],
                                                   "step": n})
        assert renewal.status == 200
    wait_for("the commander to be stuck on the hanging receiver", lambda: webhook.hung >= 1, 10)


def complete_runs(cluster: Cluster, first: int, count: int) -> None:
    """Runs r{first}... acquired and completed at once: one "completed" notification each."""
    client = cluster.client()
    for n in range(first, first + count):
        token = client.post("/api/lease/acquire", {"run_id": f"r{n}", "worker_id": "w", "mode": "sft"}).body["lease_token"]
        assert client.post("/api/lease/release", {"run_id": f"r{n}", "worker_id": "w", "lease_token": token,
                                                  "status": "COMPLETED"}).status == 200


def test_a_receiver_too_slow_for_the_queue_loses_the_oldest_notifications_and_gets_the_newest(cluster, webhook):
    webhook.hang = True
    cluster.start_commander(lease=30, env={"RELAY_NOTIFY_URL": webhook.url})
    complete_runs(cluster, 0, 1)
    wait_for("the first notification to hang in the receiver", lambda: webhook.hung == 1, 10)
    complete_runs(cluster, 1, relay.NOTIFY_QUEUE_SIZE + 29)  # 29 more than the queue holds
    webhook.release()  # the hanging request ends unanswered: tried again
    done = wait_for("the queue to drain", lambda: len(webhook.events("completed")) >= relay.NOTIFY_QUEUE_SIZE + 1, 60)
    delivered = [message["run_id"] for message in webhook.events("completed")]
    assert delivered == ["r0"] + [f"r{n}" for n in range(30, relay.NOTIFY_QUEUE_SIZE + 30)], done  # r1..r29 went
    assert "29 notifications dropped: the receiver is too slow" in cluster.log("commander")


def test_a_notification_the_receiver_refuses_with_a_4xx_is_not_sent_again(cluster, webhook):
    cluster.start_commander(lease=30, env={"RELAY_NOTIFY_URL": webhook.url + "-removed"})
    complete_runs(cluster, 0, 3)
    wait_for("three refusals in the log",
             lambda: cluster.log("commander").count("not delivered: the receiver answered 404") == 3, 20)
    assert webhook.posts == 3 and webhook.messages == []
    assert webhook.url not in cluster.log("commander")  # the URL is a secret


def relayed_run(cluster: Cluster, run_id: str = "r1", steps: str = "40") -> dict:
    """A run handed from worker a (stopped with SIGTERM) to worker b, completed."""
    worker_a = cluster.start_worker("a" if run_id == "r1" else f"a-{run_id}", run_id,
                                    env={"MOCK_STEP_SECONDS": "0.1", "MOCK_MAX_STEPS": steps})
    wait_for("a checkpoint", lambda: checkpoint_at_least(cluster, 10, run_id))
    worker_a.send_signal(signal.SIGTERM)
    assert worker_a.wait(30) == 0
    cluster.start_worker("b" if run_id == "r1" else f"b-{run_id}", run_id, env={"MOCK_MAX_STEPS": steps})
    return wait_for("the relayed run to complete", lambda: completed(cluster, run_id), 30)


def test_status_json_and_logs_tell_the_story_of_a_relayed_run(cluster):
    cluster.start_commander(lease=3)
    relayed_run(cluster)

    def relay_cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, RELAY, *args, "--commander-url", cluster.url], capture_output=True,
                              text=True, timeout=30)

    run = json.loads(relay_cli("status", "--json").stdout)["runs"][0]
    assert (run["status"], run["step"], run["latest_checkpoint"]["iteration"]) == ("COMPLETED", 40, 40)
    assert [(lease["worker_id"], lease["why"].split(":")[0]) for lease in run["leases"]] == [("a", "preempted"),
                                                                                           ("b", "completed")]
    assert run["holder"] == "" and run["loss"] is not None and run["losses"][-1][0] == 40
    logs = relay_cli("logs", "r1")
    assert logs.returncode == 0 and "step 40/40 loss" in logs.stdout
    follow = relay_cli("logs", "r1", "--follow")  # returns by itself: the run is over
    assert follow.returncode == 0 and follow.stdout == logs.stdout
    detail = relay_cli("status", "--run", "r1").stdout
    assert "last trainer lines:" in detail and "step 40/40" in detail


def test_the_loss_curve_has_every_step_the_trainer_printed_across_a_handoff(cluster):
    cluster.start_commander(lease=3)  # a renewal every second: some 25 steps each
    run = relayed_run(cluster)
    printed = {}
    for line in (cluster.log("a") + cluster.log("b")).splitlines():
        if line.startswith("[trainer] step ") and " loss " in line:
            _, _, step, _, loss = line.split()
            printed.setdefault(int(step.split("/")[0]), float(loss))
    assert [step for step, _ in run["losses"]] == list(range(1, 41))  # redone steps drawn once
    assert all(abs(loss - printed[step]) < 1e-6 for step, loss in run["losses"])
    client = cluster.client()
    token = client.post("/api/lease/acquire", {"run_id": "r2", "worker_id": "w", "mode": "sft"}).body["lease_token"]
    too_many = [[n, 1.0] for n in range(relay.MAX_LOSS_POINTS_PER_RENEWAL + 1)]
    assert client.post("/api/lease/renew", {"run_id": "r2", "worker_id": "w", "lease_token": token, "step": 1,
                                            "losses": too_many}).status == 400


@pytest.mark.slow(24)
def test_the_status_page_renders_runs_their_handoffs_and_loss_curves_in_a_real_browser(cluster, tmp_path):
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it with apt-get)")
    cluster.start_commander(lease=3)
    relayed_run(cluster, "relayed")
    single = cluster.start_worker("solo", "single", env={"MOCK_MAX_STEPS": "30"})
    assert single.wait(30) == 0
    os.makedirs(ARTIFACTS, exist_ok=True)
    browser = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    dom = subprocess.run([*browser, "--dump-dom", cluster.url + "/"], capture_output=True, text=True, timeout=60).stdout
    assert dom.count("class=\"run\"") == 2, dom[:2000]
    relayed_card = dom.split('id="run-relayed"')[1].split("</section>")[0]
    assert relayed_card.count('class="lease"') == 2 and "<polyline" in relayed_card and "COMPLETED" in relayed_card
    later = subprocess.run([*browser, "--virtual-time-budget=7000", "--dump-dom", cluster.url + "/"],
                           capture_output=True, text=True, timeout=60).stdout
    refreshes = int(later.split('data-refreshes="')[1].split('"')[0]) if "data-refreshes" in later else 0
    assert refreshes >= 1 and later.count('class="run"') == 2  # refreshed in place, every 3 s, no reload
    for width in (1200, 420):  # a laptop and a phone
        shot = os.path.join(ARTIFACTS, f"status-page-{width}.png")
        with contextlib.suppress(FileNotFoundError):
            os.remove(shot)  # an earlier run's picture proves nothing
        taken = subprocess.run([*browser, f"--screenshot={shot}", f"--window-size={width},1400", cluster.url + "/"],
                               capture_output=True, text=True, timeout=60)
        assert taken.returncode == 0, taken.stderr[-2000:]
        assert os.path.getsize(shot) > 10_000


# --------------------------------------------------------------------------- launch-stack on Lium (the real lium CLI)
#
# The real `lium` (lium.io 0.32.0, pip-installed) against testing/lium_api.py, a local Lium API whose
# pods are sandboxes reached over real SSH.


def skip_without_pods() -> None:
    from testing.lium_api import SSHD

    if not os.path.exists(SSHD):
        pytest.skip("openssh-server is not installed (testing/install.sh): the stand-in's pods are reached over SSH")
    if os.geteuid() != 0:
        pytest.skip("the stand-in's pods bind-mount their folders in a mount namespace, which needs root")


@pytest.fixture
def lium(cluster):
    from testing.lium_api import LiumApi

    skip_without_pods()
    api = LiumApi(cluster.tmp / "lium-api", cluster.mark).start()
    try:
        yield api
    finally:
        api.stop()


@pytest.mark.slow(8)
def test_the_stand_ins_pods_see_a_test_python_that_lives_in_a_venv_under_tmp(cluster, tmp_path):
    from testing.lium_api import EXECUTOR_ID, TEMPLATE_ID, LiumApi

    skip_without_pods()
    venv = tmp_path / "venv"  # /tmp/pytest-...: where a pod has a /tmp of its own
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = str(venv / "bin" / "python")
    api = LiumApi(cluster.tmp / "venv-lium-api", cluster.mark, python=python).start()
    try:
        env = lium_env(cluster, api)
        rented = subprocess.run(["lium", "up", EXECUTOR_ID, "--name", "venv-pod", "--template_id", TEMPLATE_ID, "-y", "--json"],
                                capture_output=True, text=True, timeout=120, env=env)
        assert rented.returncode == 0, rented.stderr
        pod = json.loads(rented.stdout)["pod"]["id"]
        ran = subprocess.run(["lium", "exec", pod, "--json", f"{python} -c 'import sys, yaml; print(sys.prefix)'"],
                             capture_output=True, text=True, timeout=120, env=env)
        result = json.loads(ran.stdout)["results"][0]
        assert (result["exit_code"], result["stdout"].strip()) == (0, str(venv)), result
    finally:
        api.stop()


# --------------------------------------------------------------------------- Lium clusters

# A server bound to the member's overlay address that answers who it is and whom it saw, left
# running detached (its pid printed) so the cluster's removal can be seen to end it.
OVERLAY_SERVER = r"""
import socket, sys
me, port = sys.argv[1], int(sys.argv[2])
server = socket.create_server((me, port))
while True:
    connection, (peer, _) = server.accept()
    connection.sendall(f"{me} saw {peer}\n".encode())
    connection.close()
"""
# From the member's own overlay address to the peer's, until the peer's server answers.
OVERLAY_CLIENT = r"""
import socket, sys, time
me, peer, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
give_up = time.monotonic() + 60
while True:
    try:
        with socket.create_connection((peer, port), timeout=5, source_address=(me, 0)) as connection:
            print(connection.makefile().readline().strip())
            break
    except OSError:
        if time.monotonic() > give_up:
            raise
        time.sleep(0.1)
"""


def relay_lium(cluster: Cluster, api, monkeypatch) -> relay.Lium:
    """relay.py's Lium, running the real CLI against the stand-in (this process's environment is the CLI's)."""
    for name, value in lium_env(cluster, api).items():
        monkeypatch.setenv(name, value)
    return relay.Lium(dry_run=False)


CLUSTER_GROUP = relay.LiumGroup(template_id="", gpu="H200", gpu_count=8, ttl="1h", up_timeout_seconds=60)


@pytest.mark.slow(5)
def test_a_two_node_cluster_is_rented_through_the_real_cli_and_each_member_answers_on_its_own_overlay_address(
        cluster, lium, monkeypatch):
    from testing.lium_api import FABRICS

    rented = relay_lium(cluster, lium, monkeypatch).cluster_up(CLUSTER_GROUP, "relay-r1-1", 2, "")
    members = rented["pods"]
    assert (rented["size"], rented["status"], [m["node_rank"] for m in members]) == (2, "RUNNING", [0, 1])
    assert {lium.pods[m["id"]].node_id for m in members} <= set(FABRICS[0].nodes)  # the H200 fabric, by choose_fabric
    assert all(lium.pods[m["id"]].removal_scheduled_at for m in members)  # --ttl on every member
    addresses = [m["overlay_ip"] for m in members]
    assert rented["master_addr"] == addresses[0] and len(set(addresses)) == 2, addresses
    port = free_port()
    env = lium_env(cluster, lium)
    execs = []
    for member, me, peer in ((members[0], *addresses), (members[1], *reversed(addresses))):
        python = shlex.quote(sys.executable)
        command = (f"setsid nohup {python} -c {shlex.quote(OVERLAY_SERVER)} {me} {port} >/dev/null 2>&1 </dev/null & "
                   f"echo $!; {python} -c {shlex.quote(OVERLAY_CLIENT)} {me} {peer} {port}")
        execs.append(subprocess.Popen(["lium", "exec", member["id"], "--json", command], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env))
    servers = []
    try:
        for ran, me, peer in zip(execs, addresses, reversed(addresses), strict=True):
            out, err = ran.communicate(timeout=120)
            result = json.loads(out)["results"][0]
            assert result["exit_code"] == 0, (result, err)
            pid, answer = result["stdout"].split()[0], " ".join(result["stdout"].split()[1:])
            assert answer == f"{peer} saw {me}"  # the peer answered on its address and saw this member's
            servers.append(int(pid))
    finally:
        for ran in execs:  # the CLI processes this test started, whatever failed
            ran.kill()
            ran.wait()
    assert all(process_alive(pid) for pid in servers)
    spent = relay.Lium(dry_run=False).cluster_remove(rented["id"])
    assert not lium.members(rented["id"]) and not [row for row in lium.listed() if row.get("cluster_id")]
    assert not [pid for pid in servers if process_alive(pid)]
    assert spent and spent > 0  # two whole nodes for seconds: `lium ps` says cents


@pytest.mark.slow(14)
def test_a_cluster_rent_whose_answer_is_lost_is_found_in_clusters_ps_and_removed(cluster, lium, monkeypatch):
    lium.cluster_rent_outcome = "lost"  # rented, but the answer is a 502 and the members stay unlisted a while
    relay_cli = relay_lium(cluster, lium, monkeypatch)
    with pytest.raises(relay.LiumError) as refused:
        relay_cli.cluster_up(CLUSTER_GROUP, "relay-r1-1", 2, "")
    assert refused.value.code == "cluster_rent_uncertain" and refused.value.code in relay.CLUSTER_RENT_BILLING
    found = wait_for("the cluster in `clusters ps`", lambda: [c for c in relay_cli.clusters() if c["name"] == "relay-r1-1"
                                                              and c["size"] == 2], 60, interval=1)
    assert len(found) == 1 and {m["id"] for m in found[0]["pods"]} == {p.id for p in lium.members(found[0]["id"])}
    assert relay_cli.cluster_remove(found[0]["id"]) is not None and not lium.members(found[0]["id"])
    assert relay_cli.cluster_remove(found[0]["id"]) is None  # already gone


def test_a_cluster_rent_whose_answer_is_lost_is_resent_with_its_idempotency_key_and_rents_one_cluster(cluster, lium,
                                                                                                      monkeypatch):
    lium.features, lium.cluster_rent_outcome, lium.hide_seconds = ["rent_idempotency"], "lost", 0.0
    rented = relay_lium(cluster, lium, monkeypatch).cluster_up(CLUSTER_GROUP, "relay-r1-1", 2, "")
    assert [path for _, path in lium.requests if path == "/executors/cluster/rent"] == ["/executors/cluster/rent"] * 2
    assert {p.cluster_id for p in lium.pods.values()} == {rented["id"]} and len(lium.pods) == 2


def test_a_member_whose_host_is_lost_shows_its_cluster_broken_in_clusters_ps(cluster, lium, monkeypatch):
    relay_cli = relay_lium(cluster, lium, monkeypatch)
    rented = relay_cli.cluster_up(CLUSTER_GROUP, "relay-r1-1", 2, "")
    lium.preempt(rented["pods"][1]["id"])
    [listed] = relay_cli.clusters()
    assert (listed["id"], listed["status"], [m["status"] for m in listed["pods"]]) == (rented["id"], "BROKEN",
                                                                                      ["RUNNING", "BROKEN"])


def test_a_cluster_whose_member_fails_to_boot_names_the_billing_cluster_in_its_error(cluster, lium, monkeypatch):
    lium.cluster_rent_outcome = "member_fails"
    relay_cli = relay_lium(cluster, lium, monkeypatch)
    with pytest.raises(relay.LiumError) as failed:
        relay_cli.cluster_up(CLUSTER_GROUP, "relay-r1-1", 2, "")
    billing = [p.cluster_id for p in lium.pods.values()]
    assert failed.value.code == "cluster_member_failed" and billing and failed.value.data["cluster_id"] == billing[0]
    relay_cli.cluster_remove(failed.value.data["cluster_id"])
    assert not lium.pods


def test_a_cluster_rent_with_a_template_that_is_not_the_cluster_image_is_refused_and_rents_nothing(cluster, lium,
                                                                                                   monkeypatch):
    from testing.lium_api import TEMPLATE_ID

    with pytest.raises(relay.LiumError, match="a cluster runs only the daturaai/lium-cluster image"):
        relay_lium(cluster, lium, monkeypatch).cluster_up(CLUSTER_GROUP, "relay-r1-1", 2, "", cluster_template_id=TEMPLATE_ID)
    assert not lium.pods


def test_the_fabric_is_the_cheapest_with_enough_free_nodes_of_the_gpu_asked():
    def offer(fabric: str, gpu: str, free: int, price: float, kind: str = "infiniband") -> dict:
        return {"fabric_id": fabric, "fabric_type": kind, "gpu_type": gpu, "gpus_per_node": 8, "free_count": free,
                "node_count": 4, "price_per_node_hour": price}

    offers = [offer("h100", "H100", 4, 10.0), offer("h200-full", "H200", 1, 12.0), offer("h200-roce", "H200", 3, 20.0, "roce"),
              offer("h200-ib", "H200", 2, 20.0), offer("h200-dear", "H200", 4, 30.0)]
    assert relay.choose_fabric(offers, "h200", 8, 2) == "h200-ib"  # roce costs the same: InfiniBand first
    assert relay.choose_fabric(offers, "H200", 8, 3) == "h200-roce"
    assert relay.choose_fabric(offers, "", 8, 2) == "h100"
    with pytest.raises(relay.LiumError, match="no Lium fabric has 2 nodes of 16×H200 free") as none:
        relay.choose_fabric(offers, "H200", 16, 2)
    assert none.value.code == "no_fabric"


WHOLE_NODE = {"node": "", "gpu": "H200", "gpu_count": 8}  # `up --gpu H200 -c 8`: a node with 8 GPUs free, any


def write_stack(cluster: Cluster, api, **groups: dict) -> str:
    from testing.harness import free_port
    from testing.lium_api import EXECUTOR_ID, TEMPLATE_ID

    cluster.port = cluster.port or free_port()
    launch = cluster.tmp / "launch"
    stack = {
        "commander": {"host": "127.0.0.1", "port": cluster.port, "lease_seconds": 3, "wait_seconds": 20,
                      "state_path": str(launch / "commander_state.json"), "log_path": str(launch / "commander.log"),
                      "pid_path": str(launch / "commander.pid")},
        "lium": {"template_id": TEMPLATE_ID, "node": EXECUTOR_ID, "volume": f"id:{api.volume_huid()}",
                 "ready_timeout_seconds": 20, "poll_interval_seconds": 2, "up_timeout_seconds": 60},
        "run": {"run_id": "r1", "mode": "sft", "l1_root": "/mnt/relay", "stop_grace_seconds": 2},  # /mnt: the volume
        "worker": {"remote_python_bin": sys.executable, "env": {"MOCK_MAX_STEPS": "40", "MOCK_STEP_SECONDS": "0.1"}},
        "relay": {"max_pods": 3, "no_lease_grace_seconds": 30, "state_path": str(launch / "stack_state.json")},
    }
    for group, fields in groups.items():
        stack.setdefault(group, {}).update(fields)
    path = cluster.tmp / "stack.yaml"
    path.write_text(json.dumps(stack, indent=1))
    cluster.url = f"http://127.0.0.1:{cluster.port}"
    return str(path)


def lium_env(cluster: Cluster, api, **extra: str) -> dict[str, str]:
    """The real CLI's environment: its own HOME (config, keys, known_hosts), the local API, a key pair."""
    home = cluster.tmp / "lium-home"
    key = home / ".ssh" / "id_ed25519"
    if not key.exists():
        key.parent.mkdir(parents=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    env = cluster.env(HOME=str(home), LIUM_BASE_URL=api.url, LIUM_API_KEY="test-key", LIUM_SSH_KEY_PATH=str(key),
                      LIUM_NONINTERACTIVE="1", LIUM_SELF_UPDATE_DISABLE="1", **extra)
    # The interpreter's own bin first: its `lium` entry point, not a version manager's shim in front
    # of it (pyenv's costs a third of a second per call, and the supervisor calls lium every poll).
    env["PATH"] = f"{os.path.dirname(sys.executable)}:{env['PATH']}"
    found = shutil.which("lium", path=env["PATH"])
    assert found and not found.startswith(FAKE_CLIS), found  # the pip-installed CLI, lium.io 0.32.0
    return env


def stack_pods(api) -> list[str]:
    return sorted(pod.name for pod in api.pods.values())


def volume_model(api, steps: int) -> bytes:
    return (api.volume_folder() / "relay" / "runs" / "r1" / "ckpt" / relay.iteration_dirname(steps) / "model.json").read_bytes()


def launch_stack(cluster: Cluster, api, stack: str, *flags: str, **env: str) -> subprocess.CompletedProcess:
    empty = cluster.tmp / "empty"
    empty.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, RELAY, "launch-stack", stack, *flags], capture_output=True, text=True,
                          timeout=180, cwd=empty, env=lium_env(cluster, api, **env))


@pytest.mark.slow(24)
def test_launch_stack_from_an_empty_folder_starts_everything_and_the_run_completes(cluster, lium):
    secret, wandb_key, trainer_token = ("stack-secret-" + uuid.uuid4().hex, "wandb-" + uuid.uuid4().hex,
                                        "token-" + uuid.uuid4().hex)
    stack = write_stack(cluster, lium, lium={"node": "", "gpu": "H200", "gpu_count": 8},  # a whole 8-GPU node
                        worker={"env": {"MOCK_MAX_STEPS": "40", "MOCK_STEP_SECONDS": "0.1", "WANDB_API_KEY": "${TEST_WANDB}"}},
                        run={"env": {"TRAINER_TOKEN": "${TEST_TRAINER_TOKEN}", "PLAIN": "shown"}})
    cluster.secret = secret
    result = launch_stack(cluster, lium, stack, RELAY_SHARED_SECRET=secret, TEST_WANDB=wandb_key,
                          TEST_TRAINER_TOKEN=trainer_token)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["commander"]["url"] == cluster.url and isinstance(summary["commander"]["pid"], int)
    assert summary["commander"]["state_path"].endswith("commander_state.json")
    pod = lium.ours("relay-r1-1")
    assert summary["pod"]["name"] == "relay-r1-1" and summary["pod"]["id"] == pod.id and pod.gpu_count == 8
    assert summary["pod"]["price_per_hour"] == 8 * lium.price_per_gpu
    assert summary["worker"]["running"] is True and isinstance(summary["worker"]["pid"], int)
    assert summary["worker"]["remote_log_path"] == "relay/worker.log"
    home = lium.home("relay-r1-1")
    assert (home / "relay" / "relay.py").read_bytes() == open(RELAY, "rb").read()
    run_yaml, relay_env = home / "relay" / "run.yaml", home / "relay" / "relay.env"
    assert stat.S_IMODE(run_yaml.stat().st_mode) == 0o600 and stat.S_IMODE(relay_env.stat().st_mode) == 0o600
    config = json.loads(run_yaml.read_text())
    assert (config["worker_id"], config["commander_url"], config["relay_shared_secret"]) == ("relay-r1-1", cluster.url, "")
    # ${NAME} values come from launch-stack's environment and travel in the 0600 relay.env only
    assert {f"RELAY_SHARED_SECRET={secret}", f"WANDB_API_KEY={wandb_key}", f"TRAINER_TOKEN={trainer_token}"} <= set(
        relay_env.read_text().splitlines())
    assert config["env"] == {"PLAIN": "shown"}
    assert int((home / "relay" / "worker.pid").read_text()) == summary["worker"]["pid"]
    for pid in relay.processes_with_env(f"RELAY_TEST_MARK={cluster.mark}"):
        assert secret.encode() not in open(f"/proc/{pid}/cmdline", "rb").read()
    run = wait_for("the run to complete", lambda: completed(cluster), 40)
    assert run["leases"][0]["worker_id"] == "relay-r1-1"
    # The worker logs the completion once the commander acknowledged it: poll, do not race.
    wait_for("the worker log to report the completion", lambda: "COMPLETED" in (home / "relay" / "worker.log").read_text(), 20)
    assert (lium.volume_folder() / "relay" / "runs" / "r1").is_dir()  # checkpoints on the volume, at /mnt


@pytest.mark.slow(17)
def test_launch_stack_serves_tls_and_ships_the_ca_file_so_the_pods_worker_verifies_the_commander(cluster, lium, tmp_path):
    cert, key = self_signed_certificate(tmp_path, "commander")
    stack = write_stack(cluster, lium, commander={"tls_cert": cert, "tls_key": key, "tls_ca_file": cert},
                        worker={"env": {"MOCK_MAX_STEPS": "10"}})
    cluster.url, cluster.ca_file = cluster.url.replace("http://", "https://"), cert
    result = launch_stack(cluster, lium, stack)
    assert result.returncode == 0, result.stderr
    home = lium.home("relay-r1-1")
    config = json.loads((home / "relay" / "run.yaml").read_text())
    assert (config["commander_url"], config["commander_ca_file"]) == (cluster.url, "commander_ca.pem")
    assert (home / "relay" / "commander_ca.pem").read_bytes() == open(cert, "rb").read()
    wait_for("the run to complete over TLS", lambda: completed(cluster), 40)


@pytest.mark.slow(45)
@pytest.mark.parametrize("removed", [False, True], ids=["listed-as-BROKEN", "removed-by-lium"])
def test_supervise_replaces_a_preempted_pod_at_once_resumes_and_leaves_no_pod_but_a_foreign_one(cluster, lium, tmp_path,
                                                                                                removed):
    foreign = lium.add_foreign_pod("relay-r1-1")  # someone else's pod of the very name our first pod gets
    stack = write_stack(cluster, lium, worker={"env": {"MOCK_MAX_STEPS": "60", "MOCK_STEP_SECONDS": "0.1"}},
                        relay={"no_lease_grace_seconds": 300}, lium=WHOLE_NODE)  # replaced at once, not after the grace
    supervisor, events = supervise(cluster, lium, stack)
    wait_for("the first pod's worker to seal checkpoint 10", lambda: cluster.healthy() and checkpoint_at_least(cluster, 10), 90)
    lost = lium.ours("relay-r1-1", (foreign.id,))
    lium.preempt(lost.id, remove=removed)
    wait_for("a replacement pod", lambda: "creating pod relay-r1-2" in events.read_text(), 25)  # a few polls, not 300 s
    replacement = wait_for("the replacement to be rented", lambda: lium.ours("relay-r1-2"), 60)
    assert replacement.node_id != lost.node_id  # the lost host is not offered again at once
    assert supervisor.wait(120) == 0, events.read_text()
    text = events.read_text()
    gone = "is gone (preempted, expired or removed)" if removed else "removed: Lium reports it BROKEN"
    for words in (gone, "lease handed off from relay-r1-1 to relay-r1-2", "run r1 COMPLETED", "relay-r1-2 (",
                  "removed: the run is COMPLETED", "run r1 COMPLETED: GPU spend $"):
        assert words in text, text
    resume = resumed_from(cluster.run("r1"), "relay-r1-2")[0]
    assert int(resume.split("checkpoint ")[1].split()[0]) >= 10, resume
    assert volume_model(lium, 60) == reference_model(tmp_path, 60)
    assert list(lium.pods) == [foreign.id] and foreign.status == "RUNNING"  # untouched, still running
    state = json.loads((cluster.tmp / "launch" / "stack_state.json").read_text())
    assert foreign.id not in [pod["id"] for pod in state["pods"]] and all(p["state"] == "removed" for p in state["pods"])
    spent = round(sum(pod["spent_usd"] for pod in state["pods"]), 2)
    assert spent > 0 and f"run r1 COMPLETED: GPU spend ${spent:.2f} on 2 pod(s)" in text
    detail = subprocess.run([sys.executable, RELAY, "status", "--commander-url", cluster.url, "--run", "r1"],
                            capture_output=True, text=True, timeout=30, env=cluster.env()).stdout
    assert f"GPU spend: ${spent:.2f} on 2 pod(s)" in detail, detail
    assert f"GPU spend</dt><dd>${spent:.2f} on 2 pod(s)" in raw_request(cluster, "GET", "/")[1].decode()


@pytest.mark.slow(25)
def test_a_supervised_stack_notifies_from_the_commander_and_the_supervisor_without_showing_the_url(cluster, lium,
                                                                                                   webhook):
    stack = write_stack(cluster, lium, commander={"notify_url": webhook.url}, worker={"env": {"MOCK_MAX_STEPS": "10"}})
    supervisor, events = supervise(cluster, lium, stack)
    assert supervisor.wait(60) == 0, events.read_text()
    wait_for("the commander's completion message", lambda: webhook.events("completed"), 15)
    finished = webhook.events("run_finished")
    assert finished[0]["source"] == "launch-stack" and finished[0]["pods_removed"] == ["relay-r1-1"], webhook.messages
    for pid in relay.processes_with_env(f"RELAY_TEST_MARK={cluster.mark}"):  # the commander stays up
        assert webhook.secret_path.encode() not in open(f"/proc/{pid}/cmdline", "rb").read()
    logs = events.read_text() + (cluster.tmp / "launch" / "commander.log").read_text()
    assert "listening" in logs and webhook.secret_path not in logs


def supervise(cluster: Cluster, api, stack: str) -> tuple[subprocess.Popen, Path]:
    """`launch-stack --supervise` in the background, from an empty folder; its event log's path."""
    empty = cluster.tmp / "empty"
    empty.mkdir(exist_ok=True)
    events = cluster.tmp / f"supervisor-{len(cluster.procs)}.log"
    with open(events, "w") as log:
        proc = subprocess.Popen([sys.executable, RELAY, "launch-stack", stack, "--supervise"], cwd=empty,
                                env=lium_env(cluster, api), stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    cluster.procs.append(proc)
    return proc, events


@pytest.mark.slow(25)
def test_a_detached_supervisor_outlives_its_terminal_reports_itself_and_down_stops_it_then_the_pods(cluster, lium):
    stack = write_stack(cluster, lium, worker={"env": {"MOCK_MAX_STEPS": "3000", "MOCK_STEP_SECONDS": "0.1"}})
    started = launch_stack(cluster, lium, stack, "--supervise", "--detach")
    assert started.returncode == 0, started.stderr
    pid = int(re.search(r"supervisor started in the background \(pid (\d+), log ", started.stdout).group(1))
    launch = cluster.tmp / "launch"
    assert (launch / "supervisor.pid").read_text() == f"{pid}\n" and os.getsid(pid) == pid  # its own session
    wait_for("the pod's worker to hold the run", lambda: cluster.healthy() and cluster.run("r1").get("holder"), 60)
    detail = wait_for("status to show the supervisor", lambda: (lambda out: out if f"supervisor: pid {pid}, last heard" in out
                      else None)(relay_cli(cluster, "status", "--run", "r1").stdout), 30)
    assert "GPU spend: $" in detail
    second = launch_stack(cluster, lium, stack, "--supervise")
    assert second.returncode == 2 and f"a supervisor of {stack} already runs (pid {pid})" in second.stderr
    down = subprocess.run([sys.executable, RELAY, "down", stack], capture_output=True, text=True, timeout=120,
                          cwd=cluster.tmp / "empty", env=lium_env(cluster, lium))
    assert down.returncode == 0, down.stderr
    summary = json.loads(down.stdout)
    assert (summary["supervisor_stopped"], summary["removed_pods"], summary["commander_stopped"]) == (
        True, ["relay-r1-1"], True)
    assert relay.process_start_ticks(pid) is None and stack_pods(lium) == [] and not cluster.healthy()
    assert "stopped supervising; pods left as they are" in (launch / "supervisor.log").read_text()


@pytest.mark.slow(20)
def test_a_cancelled_supervised_run_ends_with_its_pods_removed_after_its_holder_handed_it_back(cluster, lium):
    stack = write_stack(cluster, lium, worker={"env": {"MOCK_MAX_STEPS": "3000", "MOCK_STEP_SECONDS": "0.1"}})
    supervisor, events = supervise(cluster, lium, stack)
    wait_for("the pod's worker to seal checkpoint 10", lambda: cluster.healthy() and checkpoint_at_least(cluster, 10), 90)
    assert relay_cli(cluster, "cancel", "r1").returncode == 0
    assert supervisor.wait(60) == 0, events.read_text()
    text = events.read_text()
    assert "removed: the run is CANCELLED" in text and "run r1 CANCELLED: GPU spend $" in text, text
    assert stack_pods(lium) == [] and "creating pod relay-r1-2" not in text
    run = cluster.run("r1")
    assert run["status"] == "CANCELLED" and run["leases"][-1]["why"] == "preempted: the run was cancelled"
    sealed = run["latest_checkpoint"]["iteration"]  # on the volume, which outlives the pod
    assert (lium.volume_folder() / "relay" / "runs" / "r1" / "sealed" / f"iter_{sealed:07d}.json").exists()
    # Before the pod went, the end of its worker log was kept, and its last lines are in the run's events.
    assert "stopping: the run was cancelled" in (cluster.tmp / "launch" / "pods" / "relay-r1-1.worker.log").read_text()
    assert any(e["msg"].startswith("launch-stack: pod relay-r1-1 removed (the run is CANCELLED); its worker log ended: ")
               for e in run["events"]), run["events"]


@pytest.mark.slow(10)
def test_a_worker_config_error_costs_one_pod_whose_log_is_kept_and_stops_the_supervisor(cluster, lium, webhook):
    # The worker refuses its configuration (here: no such file), as it would on every pod.
    stack = write_stack(cluster, lium, relay={"max_pods": 5}, commander={"notify_url": webhook.url},
                        worker={"command": f"{sys.executable} relay/relay.py worker relay/missing.yaml"})
    result = launch_stack(cluster, lium, stack, "--supervise")
    assert result.returncode == 2, result.stderr
    assert "the worker on pod relay-r1-1 failed for a reason every pod would meet: relay/missing.yaml: cannot read" \
        in result.stderr
    assert [pod.name for pod in lium.removed] == ["relay-r1-1"] and stack_pods(lium) == []  # one pod, removed
    kept = cluster.tmp / "launch" / "pods" / "relay-r1-1.worker.log"
    assert "relay: error: relay/missing.yaml: cannot read" in kept.read_text()
    message = wait_for("the supervisor's notification", lambda: webhook.events("worker_failed"), 10)[0]
    assert message["pod"] == "relay-r1-1" and any("missing.yaml" in line for line in message["log_tail"])


def test_only_a_failure_every_pod_would_meet_stops_the_supervisor():
    assert relay.failure_every_pod_meets(["[worker a] starting", "relay: error: run.yaml: field 'mode' must be sft or rl"]) \
        == "run.yaml: field 'mode' must be sft or rl"
    unreachable = "[worker a] cannot reach the commander at http://203.0.113.9:8080: timed out; trying again for up to 50 s"
    assert relay.failure_every_pod_meets(["[worker a] starting", unreachable]) == unreachable
    assert relay.failure_every_pod_meets([unreachable, "[worker a] reached the commander at http://... after 9 s"]) == ""
    assert relay.failure_every_pod_meets(["[worker a] lease granted, epoch 2", "[trainer] CUDA error: out of memory"]) == ""


@pytest.mark.slow(35)
@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_supervised_commander_that_died_or_hung_is_started_again_and_the_run_completes_on_its_first_lease(
        cluster, lium, how):
    # The worker's deadline (80% of the lease after a renewal) outlasts the restart with room on a loaded
    # machine: a dead commander is found at the next poll, a hung one after three polls of at most 3 s.
    stack = write_stack(cluster, lium, commander={"lease_seconds": {"killed": 10, "hung": 40}[how]},
                        worker={"env": {"MOCK_MAX_STEPS": "150", "MOCK_STEP_SECONDS": "0.1"}})
    supervisor, events = supervise(cluster, lium, stack)
    wait_for("the pod's worker to seal checkpoint 10", lambda: cluster.healthy() and checkpoint_at_least(cluster, 10), 90)
    pid_path = cluster.tmp / "launch" / "commander.pid"
    old = int(pid_path.read_text())
    os.kill(old, signal.SIGKILL if how == "killed" else signal.SIGSTOP)  # SIGSTOP: alive, answering nothing
    try:
        wait_for("the supervisor to start another commander",
                 lambda: int(pid_path.read_text() or old) != old and cluster.healthy(), 60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(old, signal.SIGCONT)
    wait_for("the old commander to be gone", lambda: relay.process_start_ticks(old) is None, 10)
    assert supervisor.wait(120) == 0, events.read_text()
    why = "is gone" if how == "killed" else "has not answered for 3 polls"
    assert f"the commander (pid {old}) {why}: starting it again" in events.read_text(), events.read_text()
    run = cluster.run("r1")
    assert run["status"] == "COMPLETED" and run["step"] == 150
    assert [(lease["epoch"], lease["worker_id"]) for lease in run["leases"]] == [(1, "relay-r1-1")]  # no lease lost
    assert stack_pods(lium) == []


def test_the_commander_pid_file_holds_the_pid_alone_and_a_reused_pid_is_never_signalled(cluster, lium, monkeypatch):
    monkeypatch.setenv("RELAY_TEST_MARK", cluster.mark)  # the commander it starts is this test's to clean up
    stack = relay.Supervisor(relay.load_stack_config(write_stack(cluster, lium)))
    pid = stack.commander.start()
    pid_path = cluster.tmp / "launch" / "commander.pid"
    assert pid_path.read_text() == f"{pid}\n"  # so `kill $(cat commander.pid)` signals it and nothing else
    state = json.loads((cluster.tmp / "launch" / "stack_state.json").read_text())
    assert state["commander"] == {"pid": pid, "start_ticks": relay.process_start_ticks(pid)}
    assert stack.commander.stop() and not cluster.healthy()
    stranger = subprocess.Popen(["sleep", "60"])  # a process that got the dead commander's pid, as it were
    cluster.procs.append(stranger)
    pid_path.write_text(f"{stranger.pid}\n")
    stack.state.commander = {"pid": stranger.pid, "start_ticks": relay.process_start_ticks(stranger.pid) - 1}
    assert stack.commander.pid() is None and not stack.commander.stop()
    assert stranger.poll() is None


def hot_standby_stack(cluster: Cluster, api, hub, steps: str, **groups: dict) -> str:
    """A stack keeping a hot standby; standbys go without the volume, so the run syncs to the Hub."""
    hub_env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": hub.token, "HF_HUB_DISABLE_TELEMETRY": "1"}
    return write_stack(cluster, api, relay={"hot_standby": True}, run={"hf_repo": HUB_REPO, "hf_sync_interval_seconds": 0.5},
                       worker={"env": {"MOCK_MAX_STEPS": steps, "MOCK_STEP_SECONDS": "0.05", **hub_env}}, lium=WHOLE_NODE,
                       **groups)


def nodes_of(api, *names: str) -> list[str]:
    """The node each named pod was rented on, after checking that it holds the node's 8 GPUs."""
    pods = [api.ours(name) for name in names]
    assert all(pod.gpu_count == 8 for pod in pods), [(pod.name, pod.gpu_count) for pod in pods]
    return [pod.node_id for pod in pods]


@pytest.mark.slow(100)
def test_a_hot_standby_takes_over_a_preempted_pod_before_a_new_pod_could_boot(cluster, lium, hub, tmp_path):
    lium.boot_seconds = 5  # every pod takes 5 s to boot
    lium.host_lost_seconds = 600  # the preempted pod's node stays lost for the rest of the test
    stack = hot_standby_stack(cluster, lium, hub, "1200")  # 60 s: the standby is set up in 20
    supervisor, events = supervise(cluster, lium, stack)

    def standing_by() -> bool:
        log = lium.home("relay-r1-2") / "relay" / "worker.log"
        return log.exists() and "standing by" in log.read_text(errors="replace")

    wait_for("relay-r1-1 to train and relay-r1-2 to stand by",
             lambda: cluster.healthy() and checkpoint_at_least(cluster, 5) and standing_by(), 90)
    assert cluster.run("r1")["holder"] == "relay-r1-1"
    first, standby = nodes_of(lium, "relay-r1-1", "relay-r1-2")
    assert first != standby  # two whole-node pods: two nodes
    lium.preempt("relay-r1-1", remove=True)
    replacement_when_taken: list[str] = []

    def taken_over() -> bool:
        if cluster.run("r1").get("holder") != "relay-r1-2":
            return False
        replacement = lium.ours("relay-r1-3")
        replacement_when_taken.append(replacement.status if replacement else "not rented yet")
        return True

    wait_for("the standby to take the run", taken_over, 20)
    # the takeover came before any new pod could have booted (5 s here; minutes for a real image)
    assert replacement_when_taken[0] in ("not rented yet", "PENDING", "STARTING"), replacement_when_taken
    assert supervisor.wait(150) == 0, events.read_text()
    for words in ("one hot standby", f"creating pod relay-r1-1 (template {relay_template()}, volume id:",
                  f"creating pod relay-r1-2 (template {relay_template()}, no volume)", "pod relay-r1-1 (",
                  "is gone", f"creating pod relay-r1-3 (template {relay_template()}, volume id:",
                  "lease handed off from relay-r1-1 to relay-r1-2", "run r1 COMPLETED", "removed: the run is COMPLETED"):
        assert words in events.read_text(), events.read_text()
    assert nodes_of(lium, "relay-r1-3")[0] not in (first, standby)  # not the lost host, not the standby's node
    finisher = lium.mnt(lium.ours("relay-r1-2"))  # the standby had no volume: its own disk at /mnt
    final = finisher / "relay" / "runs" / "r1" / "ckpt" / relay.iteration_dirname(1200) / "model.json"
    assert final.read_bytes() == reference_model(tmp_path, 1200)
    assert stack_pods(lium) == []


def relay_template() -> str:
    from testing.lium_api import TEMPLATE_ID

    return TEMPLATE_ID


@pytest.mark.slow(55)
def test_a_standby_pod_whose_worker_died_is_removed_and_replaced_while_training_goes_on(cluster, lium, hub):
    stack = hot_standby_stack(cluster, lium, hub, "3000")
    supervisor, events = supervise(cluster, lium, stack)
    wait_for("relay-r1-2 to stand by", lambda: cluster.healthy() and cluster.run("r1").get("standbys"), 90)
    assert cluster.run("r1")["standbys"][0]["worker_id"] == "relay-r1-2"
    working, standby = nodes_of(lium, "relay-r1-1", "relay-r1-2")
    assert working != standby  # two whole-node pods: two nodes
    os.kill(int((lium.home("relay-r1-2") / "relay" / "worker.pid").read_text()), signal.SIGKILL)
    wait_for("the silent standby pod to be replaced", lambda: "creating pod relay-r1-3" in events.read_text(), 60)
    assert "removed: its worker has not asked for the lease" in events.read_text()
    wait_for("the new standby to stand by", lambda: any(s["worker_id"] == "relay-r1-3" and s["seen_sec_ago"] < 5
                                                        for s in cluster.run("r1")["standbys"]), 60)
    assert stack_pods(lium) == ["relay-r1-1", "relay-r1-3"] and supervisor.poll() is None
    assert nodes_of(lium, "relay-r1-3")[0] != working
    run = cluster.run("r1")
    assert run["holder"] == "relay-r1-1" and len(run["leases"]) == 1  # training never stopped


@pytest.mark.slow(28)
def test_the_pod_holding_the_only_copy_of_the_last_checkpoint_is_kept_at_the_end(cluster, lium):
    stack = write_stack(cluster, lium, lium={"volume": ""})  # no volume, no Hub: the checkpoint is on the pod's disk
    supervisor, events = supervise(cluster, lium, stack)
    assert supervisor.wait(90) == 0, events.read_text()
    assert "WARNING: neither lium.volume nor run.hf_repo is set" in events.read_text()
    assert "pod relay-r1-1 kept: checkpoint 40 is only on its own disk" in events.read_text()
    assert stack_pods(lium) == ["relay-r1-1"]


@pytest.mark.slow(38)
@pytest.mark.parametrize("ending", ["ctrl-c", "crash"])
def test_a_supervisor_ended_by_ctrl_c_or_a_crash_leaves_the_pods_running_and_a_new_one_adopts_them_not_renting(
        cluster, lium, ending):
    stack = write_stack(cluster, lium, worker={"env": {"MOCK_MAX_STEPS": "150", "MOCK_STEP_SECONDS": "0.1"}})
    first, events = supervise(cluster, lium, stack)
    wait_for("the pod's worker to hold the run", lambda: cluster.healthy() and cluster.run("r1").get("holder")
             and "supervising run r1" in events.read_text(), 90)
    if ending == "ctrl-c":
        first.send_signal(signal.SIGINT)
        assert first.wait(30) == 130
        assert "stopped supervising; pods left as they are: relay-r1-1" in events.read_text()
    else:  # SIGKILL (OOM killer, a closed tmux): nothing said, its lock and state as they were
        first.send_signal(signal.SIGKILL)
        assert first.wait(30) == -signal.SIGKILL
    assert stack_pods(lium) == ["relay-r1-1"] and cluster.trainer_pids()
    assert cluster.run("r1")["holder"] == "relay-r1-1"
    second, events = supervise(cluster, lium, stack)
    assert second.wait(120) == 0, events.read_text()
    assert "already running: not renting another" in events.read_text()
    assert [path for method, path in lium.requests if path.endswith("/rent")] == [f"/executors/{lium.executor()['id']}/rent"]
    assert completed(cluster) and stack_pods(lium) == []


def test_a_pod_in_a_dying_status_is_removed_at_once_and_one_in_an_unknown_status_after_the_grace(cluster, lium,
                                                                                                  monkeypatch, capsys):
    for name, value in lium_env(cluster, lium).items():  # the Supervisor below runs the real CLI in this process's env
        monkeypatch.setenv(name, value)
    stack = relay.Supervisor(relay.load_stack_config(write_stack(cluster, lium, relay={"no_lease_grace_seconds": 3})))
    dying, odd = (lium.rent({"pod_name": name}) for name in ("relay-r1-1", "relay-r1-2"))
    wait_for("both pods to run", lambda: all(pod.status == "RUNNING" for pod in lium.pods.values()), 20)
    stack.state.pods = [relay.PodRecord(f"relay-r1-{n}", relay.utc_now(), state="active", id=pod["pod_id"])
                        for n, pod in ((1, dying), (2, odd))]
    lium.pods[dying["pod_id"]].status, lium.pods[odd["pod_id"]].status = "REBOOT_FAILED", "MIGRATING"  # REBOOT_FAILED bills
    assert [record.name for record in stack.fleet.live()] == ["relay-r1-2"]
    assert dying["pod_id"] not in lium.pods and odd["pod_id"] in lium.pods
    wait_for("the pod of unknown status to be given up", lambda: not stack.fleet.live(), 30)
    assert not lium.pods
    err = capsys.readouterr().err
    for words in ("relay-r1-1 (", "removed: Lium reports it REBOOT_FAILED", "has status MIGRATING, unknown to relay.py",
                  "removed: its status MIGRATING lasted 3 s"):
        assert words in err, err


@pytest.mark.slow(20)
def test_an_up_that_times_out_is_refused_or_rents_a_pod_without_ssh_leaves_no_pod_billing(cluster, lium):
    from testing.lium_api import NODE_IDS

    lium.boot_seconds = 60  # the image pulls for a minute; `up --timeout 2` gives up first
    stack = write_stack(cluster, lium, lium={"up_timeout_seconds": 2})
    result = launch_stack(cluster, lium, stack)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "still starting after" in result.stderr and "removed: `lium up` failed after renting it (pod_not_ready)" in result.stderr
    assert stack_pods(lium) == []
    lium.boot_seconds = 0
    holder = lium.rent({"pod_name": "someone-else", "volume_id": lium.volumes[0]["id"]}, NODE_IDS[-1])  # the volume is taken
    result = launch_stack(cluster, lium, write_stack(cluster, lium))
    assert result.returncode == 1 and "lium up failed" in result.stderr and "is attached to pod someone-else" in result.stderr
    assert list(lium.pods) == [holder["pod_id"]]
    lium.remove(holder["pod_id"])
    lium.sshd_never_starts = True
    result = launch_stack(cluster, lium, write_stack(cluster, lium, lium={"ready_timeout_seconds": 1}))
    assert result.returncode == 1 and "did not answer `lium exec` within 1 s" in result.stderr, result.stderr
    assert "removed: it never answered over SSH" in result.stderr and not lium.pods


@pytest.mark.slow(28)
def test_a_rent_whose_answer_was_lost_is_found_in_lium_ps_and_used_instead_of_renting_again(cluster, lium):
    lium.rent_outcome_unknown = True  # the rent answers without a pod id; its pod is listed 8 s later
    stack = write_stack(cluster, lium, lium={"rent_lookup_seconds": 30})
    result = launch_stack(cluster, lium, stack)
    assert result.returncode == 0, result.stderr
    assert "looking for pod relay-r1-1 in `lium ps`" in result.stderr
    assert "the rent went through after all" in result.stderr, result.stderr
    summary = json.loads(result.stdout)
    assert summary["worker"]["running"] is True and summary["pod"]["id"] == lium.ours("relay-r1-1").id
    assert stack_pods(lium) == ["relay-r1-1"]
    assert len([path for method, path in lium.requests if path.endswith("/rent")]) == 1
    wait_for("the run to complete", lambda: completed(cluster), 60)


@pytest.mark.slow(24)
def test_the_budget_stops_renting_once_the_runs_gpu_spend_reaches_it(cluster, lium):
    lium.price_per_gpu = 450.0  # 8 GPUs: $3600/h, a dollar a second
    stack = write_stack(cluster, lium, relay={"budget_usd": 303, "no_lease_grace_seconds": 300}, lium=WHOLE_NODE,
                        worker={"env": {"MOCK_MAX_STEPS": "3000", "MOCK_STEP_SECONDS": "0.1"}})
    supervisor, events = supervise(cluster, lium, stack)
    wait_for("the pod's worker to hold the run", lambda: cluster.healthy() and cluster.run("r1").get("holder"), 90)
    assert "budget $303.00" in events.read_text()  # `lium up --budget 303.00`: Lium ends the pod at that spend too
    lium.preempt("relay-r1-1")  # BROKEN; what is left ($303 less its spend) buys less than Lium's 5 min minimum
    assert supervisor.wait(60) == 1, events.read_text()
    text = events.read_text()
    assert "stopped by the budget" in text and "of a $303.00 budget" in text, text
    assert stack_pods(lium) == []
    spent = json.loads((cluster.tmp / "launch" / "stack_state.json").read_text())["pods"][0]["spent_usd"]
    assert spent > 3


@pytest.mark.slow(20)
def test_supervise_stops_renting_once_max_pods_is_reached_and_leaves_the_run_where_it_stands(cluster, lium):
    stack = write_stack(cluster, lium, relay={"max_pods": 1, "no_lease_grace_seconds": 300}, lium=WHOLE_NODE,
                        worker={"env": {"MOCK_MAX_STEPS": "3000", "MOCK_STEP_SECONDS": "0.1"}})
    supervisor, events = supervise(cluster, lium, stack)
    wait_for("the pod's worker to seal checkpoint 5", lambda: cluster.healthy() and checkpoint_at_least(cluster, 5), 90)
    lium.preempt("relay-r1-1")  # BROKEN: the one pod max_pods allows is spent
    assert supervisor.wait(60) == 1, events.read_text()
    text = events.read_text()
    assert "max_pods (1) reached and no pod is left" in text and "creating pod relay-r1-2" not in text, text
    assert len([path for method, path in lium.requests if path.endswith("/rent")]) == 1
    run = cluster.run("r1")  # the commander keeps the run, unfinished, for a supervisor with a higher max_pods
    assert run["status"] not in ("COMPLETED", "FAILED", "CANCELLED") and checkpoint_at_least(cluster, 5), run
    assert stack_pods(lium) == []


@pytest.mark.slow(20)
def test_supervise_stops_renting_once_spend_leaves_the_lium_balance_short_of_a_rent(cluster, lium):
    lium.price_per_gpu = 450.0  # 8 GPUs: $3600/h, a dollar a second; a rent needs 15 min of it in the balance: $900
    lium.balance_usd = 905.0  # the first pod is rented; five seconds of its spend leave too little for another
    stack = write_stack(cluster, lium, relay={"no_lease_grace_seconds": 300}, lium=WHOLE_NODE,
                        worker={"env": {"MOCK_MAX_STEPS": "3000", "MOCK_STEP_SECONDS": "0.1"}})
    supervisor, events = supervise(cluster, lium, stack)
    wait_for("the pod's worker to hold the run", lambda: cluster.healthy() and cluster.run("r1").get("holder"), 90)
    wait_for("the pod's spend to bring the balance under $900", lambda: lium.balance() < 899, 30)
    lium.preempt("relay-r1-1")
    assert supervisor.wait(60) == 1, events.read_text()
    text = events.read_text()
    assert "stopped by the budget: Lium's account cannot pay for another pod" in text, text
    assert "Insufficient balance" in text and "creating pod relay-r1-3" not in text, text  # one refusal, not a loop
    assert len([path for method, path in lium.requests if path.endswith("/rent")]) == 2  # one rented, one refused
    assert stack_pods(lium) == []


@pytest.mark.parametrize("groups, words", [
    ({"lium": {"template_id": ""}}, "'template_id'"),
    ({"lium": {"node": ""}}, "lium: set field 'node'"),
    ({"lium": {"gpu": "H200"}}, "lium: fields 'node' and 'gpu' exclude each other"),
    ({"lium": {"executor": "another-node"}}, "lium: fields 'node' and 'executor' (its old name) name different nodes"),
    ({"lium": {"node": "", "gpu": "H200", "gpu_count": 0}}, "lium: field 'gpu_count' must be at least 1"),
    ({"lium": {"ttl": "6 hours"}}, "lium: field 'ttl' must be a number and m, h or d"),
    ({"lium": {"volume": "new:name=ckpt"}}, "create one with `lium volumes new NAME`, then set volume: id:HUID"),
    ({"lium": {"up_timeout_seconds": 0}}, "lium: field 'up_timeout_seconds'"),
    ({"lium": {"yes": False}}, "lium: field 'yes' must be true or left out"),
    ({"relay": {"budget_usd": -1}}, "relay: field 'budget_usd'"),
    ({"commander": {"port": "eighty"}}, "commander: field 'port'"),
    ({"run": {"mode": "ppo"}}, "run: field 'mode'"),
    ({"relay": {"max_pods": 0}}, "relay: field 'max_pods'"),
    ({"relay": {"hot_standby": True}}, "relay: field 'hot_standby' needs run.hf_repo"),
    ({"pods": {}}, "unknown group 'pods'"),
    ({"lium": {"volum": "id:x"}}, "lium: unknown field 'volum' (did you mean 'volume'?)"),
    ({"run": {"worker_id": "me"}}, "run: field 'worker_id' is set by launch-stack"),
])
def test_an_invalid_stack_yaml_exits_2_naming_the_field_and_creates_nothing(cluster, lium, groups, words):
    stack = write_stack(cluster, lium, **groups)
    result = launch_stack(cluster, lium, stack)
    assert result.returncode == 2 and words in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert lium.requests == [] and not cluster.healthy()


def test_a_stack_yaml_in_the_flat_layout_gets_one_error_naming_the_group_of_every_field(tmp_path):
    flat = tmp_path / "stack.yaml"  # the earlier project's layout: every field at the top level
    flat.write_text("public_url: http://198.51.100.1:8080\ntemplate_id: T\nvolume: id:V\nrun_id: r1\nmode: sft\n"
                    "env: {A: b}\nlium: {node: N, public_url: x}\nrelais: {}\n")
    result = subprocess.run([sys.executable, RELAY, "launch-stack", str(flat), "--dry-run"], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2 and result.stdout == "", result.stderr
    assert result.stderr == (
        f"relay: error: {flat}: fields out of their group: public_url -> commander.public_url; template_id -> "
        "lium.template_id; volume -> lium.volume; run_id -> run.run_id; mode -> run.mode; env -> run.env or worker.env; "
        "lium.public_url -> commander.public_url; unknown group 'relais' (did you mean 'relay'?) (the groups: "
        "commander, lium, run, worker, relay)\n")


def test_a_dry_run_prints_every_command_masks_the_secret_and_runs_nothing(cluster, lium):
    from testing.lium_api import NODE_IDS

    secret = "dry-secret-" + uuid.uuid4().hex
    stack = write_stack(cluster, lium, lium={"node": "", "gpu": "H200", "gpu_count": 8, "ttl": "6h"},
                        relay={"budget_usd": 500}, worker={"env": {"WANDB_API_KEY": "${TEST_WANDB}"}})
    wandb_key = "wandb-" + uuid.uuid4().hex
    result = launch_stack(cluster, lium, stack, "--dry-run", RELAY_SHARED_SECRET=secret, TEST_WANDB=wandb_key)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for words in ("would run: RELAY_SHARED_SECRET=*** ", " serve --host 127.0.0.1",
                  f"would run: lium up --gpu H200 -c 8 --name relay-r1-1 --template_id {relay_template()} --timeout 60 "
                  f"--volume id:{lium.volume_huid()} --ttl 6h --budget 500.00 -y --json",
                  "would run: lium scp <id of relay-r1-1> <generated tar of relay/relay.py, relay/launch_sft.sh, "
                  "relay/launch_rl.sh, relay/slime_flags.txt, relay/run.yaml, relay/relay.env, mode 0600>", "lium exec '<id of relay-r1-1>' --json",
                  "nohup setsid"):
        assert words in out, out
    assert secret not in out + result.stderr and wandb_key not in out + result.stderr
    for words in ("preflight ok: LIUM_API_KEY: Lium accepts it",
                  f"preflight ok: worker.env.WANDB_API_KEY: ${{TEST_WANDB}} is set here (*** {len(wandb_key)} characters", "preflight ok: lium.template_id: template relay-trainer",
                  f"preflight ok: lium.volume: volume {lium.volume_huid()} exists",
                  f"preflight ok: lium.gpu: {len(NODE_IDS)} node(s) offer 8 H200",
                  "preflight ok: commander.public_url: nothing answers there yet"):
        assert words in out, out
    assert rented_or_changed(lium) == [] and not cluster.healthy()


def rented_or_changed(api) -> list[tuple[str, str]]:
    """What the stand-in was asked that rents, removes or changes anything (all but reads)."""
    return [request for request in api.requests if request[0] != "GET"]


def test_a_stack_that_cannot_work_fails_before_anything_is_started_or_rented_one_line_per_field(cluster, lium):
    stack = write_stack(cluster, lium, commander={"host": "0.0.0.0", "public_url": "http://YOUR_PUBLIC_IP:8080"},
                        lium={"template_id": "YOUR_TEMPLATE_ID", "node": "no-such-node"},
                        run={"hf_repo": HUB_REPO, "env": {"WANDB_API_KEY": "${TEST_UNSET_KEY}"}},  # no HF_TOKEN anywhere
                        worker={"env": {"TRAINSTACK_HTTP_ENV_URL": "http://203.0.113.5:8000",
                                        "SLIME_SFT_CMD": "python3 train.py --save-intervall 20 $RELAY_SLIME_ARGS"}})
    result = launch_stack(cluster, lium, stack, "--supervise", RELAY_SHARED_SECRET="short", HF_TOKEN="")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    for field_name in ("commander.public_url: 'http://YOUR_PUBLIC_IP:8080' is a placeholder",
                       "lium.template_id: 'YOUR_TEMPLATE_ID' is a placeholder",
                       "worker.env.TRAINSTACK_HTTP_ENV_URL: 'http://203.0.113.5:8000' is a documentation address",
                       "RELAY_SHARED_SECRET: 5 bytes; a commander reachable from other machines needs at least 32",
                       "lium.node: no node 'no-such-node'", "HF_TOKEN: run.hf_repo is tester/relay-ckpt but HF_TOKEN is not set",
                       "run.env.WANDB_API_KEY: ${TEST_UNSET_KEY} is not set where launch-stack runs",
                       "worker.env.SLIME_SFT_CMD: slime does not know --save-intervall (did you mean '--save-interval'?)"):
        assert sum(field_name in line for line in lines) == 1, result.stderr
    assert lines[-1] == "relay: error: 8 preflight check(s) failed (above): nothing was started or rented"
    assert rented_or_changed(lium) == [] and not cluster.healthy()


def test_a_dry_run_with_a_refused_lium_key_says_so_prints_the_plan_and_exits_2(cluster, lium):
    lium.api_key = "the-real-key"  # lium_env gives the CLI another one
    result = launch_stack(cluster, lium, write_stack(cluster, lium), "--dry-run")
    assert result.returncode == 2, result.stderr
    assert "preflight: LIUM_API_KEY: Lium refuses it (" in result.stdout and "Invalid API key" in result.stdout
    assert "would run: lium up " in result.stdout  # the plan all the same
    assert rented_or_changed(lium) == []


def test_a_commander_that_does_not_answer_at_public_url_stops_launch_stack_before_any_rent(cluster, lium):
    from testing.harness import free_port

    elsewhere = f"http://127.0.0.1:{free_port()}"  # not where the commander listens
    result = launch_stack(cluster, lium, write_stack(cluster, lium, commander={"public_url": elsewhere}))
    assert result.returncode == 2, result.stderr
    assert f"preflight: commander.public_url: cannot reach the commander at {elsewhere}" in result.stderr
    assert rented_or_changed(lium) == [] and not cluster.healthy()  # the commander it started is stopped again


@pytest.mark.parametrize("problem", ["read-only token", "public repo"])
def test_the_preflight_refuses_an_hf_token_that_cannot_write_and_a_public_repo(cluster, lium, hub, problem):
    if problem == "public repo":
        hub.create(HUB_REPO, private=False)
    token = hub.read_token if problem == "read-only token" else hub.token
    stack = write_stack(cluster, lium, run={"hf_repo": HUB_REPO}, worker={"env": {"HF_ENDPOINT": hub.url}})
    result = launch_stack(cluster, lium, stack, "--dry-run", HF_TOKEN=token)
    assert result.returncode == 2, result.stdout
    expected = ("preflight: HF_TOKEN: a read-only token cannot create tester/relay-ckpt" if problem == "read-only token"
                else "preflight: run.hf_repo: tester/relay-ckpt is a PUBLIC repo")
    assert expected in result.stdout, result.stdout
    assert token not in result.stdout + result.stderr


@pytest.mark.slow(23)
def test_relay_py_is_not_uploaded_when_the_image_has_it_and_down_removes_the_pods_and_the_commander(cluster, lium):
    image = cluster.tmp / "image"  # the pod's image has relay at /opt/relay, as the Dockerfile puts it
    image.mkdir()
    for name in ("relay.py", "launch_sft.sh", "launch_rl.sh", "slime_flags.txt"):
        shutil.copy2(os.path.join(os.path.dirname(RELAY), name), image / name)
    lium.image_dirs["/opt/relay"] = image
    stack = write_stack(cluster, lium, worker={"image_relay_dir": "/opt/relay",
                                               "env": {"MOCK_MAX_STEPS": "3000", "MOCK_STEP_SECONDS": "0.1"}})
    result = launch_stack(cluster, lium, stack)
    assert result.returncode == 0, result.stderr
    assert "nothing to upload" in result.stderr
    assert not (lium.home("relay-r1-1") / "relay" / "relay.py").exists()
    wait_for("a trainer on the pod", lambda: cluster.trainer_pids(), 30)
    result = subprocess.run([sys.executable, RELAY, "down", stack], capture_output=True, text=True, timeout=120,
                            cwd=cluster.tmp / "empty", env=lium_env(cluster, lium))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["removed_pods"], summary["commander_stopped"]) == (["relay-r1-1"], True) and summary["spent_usd"] > 0
    assert stack_pods(lium) == [] and not cluster.healthy()
    wait_for("the pod's processes to be gone", lambda: not cluster.trainer_pids(), 10)


def test_the_shipped_example_configs_are_valid_and_the_preflight_refuses_their_placeholders():
    root = os.path.dirname(RELAY)
    assert relay.load_run_config(os.path.join(root, "run.yaml.example")).run_id == "lium-demo-sft"
    for name in ("stack.yaml.example", "examples/stack.liveweb_sft.example.yaml", "examples/stack.liveweb_rl.example.yaml"):
        stack = relay.load_stack_config(os.path.join(root, name))
        refused = {check.what for check in relay.placeholder_checks(stack)}
        assert {"commander.public_url", "lium.template_id", "lium.volume", "run.hf_repo"} <= refused, (name, refused)
        command = stack.worker.env.get("SLIME_SFT_CMD", "") + stack.worker.env.get("SLIME_RL_CMD", "")
        if "liveweb" in name:
            assert "$RELAY_SLIME_ARGS" in command and "--save-interval" in command
            assert {"LIVEWEB_ARENA_ROOT", "PYTHONPATH"} <= set(stack.worker.env)
        if "liveweb_rl" in name:  # RL generates in LiveWeb-Arena's environment (SFT trains on its trajectories)
            assert "--custom-generate-function-path trainstack_plugins.http_env.adapter.generate" in command
            assert {"TRAINSTACK_HTTP_ENV_URL", "TRAINSTACK_LLM_URL"} <= set(stack.worker.env)
    # a run on a 2-node cluster: no template or volume of its own, slime's environment by worker.setup
    stack = relay.load_stack_config(os.path.join(root, "examples", "stack.2nodes_sft.example.yaml"))
    assert stack.lium.nodes == 2 and not stack.lium.volume
    refused = {check.what for check in relay.placeholder_checks(stack)}
    assert refused == {"commander.public_url", "run.hf_repo", "worker.setup"}, refused
    command = stack.worker.env["SLIME_SFT_CMD"]
    assert "$RELAY_WAIT_FOR_NODES" in command and "--actor-num-nodes $RELAY_NUM_NODES" in command


# --------------------------------------------------------------------------- fuzzing and models

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule  # noqa: E402


class VirtualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def call(method, body: dict) -> tuple[int, dict]:
    try:
        return 200, method(relay.Body(json.dumps(body).encode()))
    except relay.ApiError as exc:
        return exc.status, {"error": exc.message}


class LeaseRules(RuleBasedStateMachine):
    """The commander against a reference model: one holder per run, epochs only grow and are
    never reused (also across restarts), a stale token changes nothing, FAILED and COMPLETED
    runs are never granted again."""

    TTL, MAX_FAILED = 10.0, 2

    def __init__(self) -> None:
        super().__init__()
        self.folder = tempfile.mkdtemp(prefix="lease-model-")
        self.clock = VirtualClock()
        self.restarts = 0
        self.commander = self.start(os.path.join(self.folder, "state-0.json"))
        self.model = {run: {"holder": None, "token": None, "epoch": 0, "expires": 0.0, "status": "PENDING", "failed": 0}
                      for run in ("r1", "r2")}
        self.stale: list[tuple[str, str, str]] = []

    def start(self, path: str) -> relay.Commander:
        return relay.Commander(relay.StateStore(path), self.TTL, self.MAX_FAILED, clock=self.clock)

    def live_holder(self, run: str) -> str | None:
        m = self.model[run]
        return m["holder"] if m["holder"] and self.clock.now < m["expires"] else None

    def reap(self) -> None:
        """What the commander's reaper thread does every 0.25 s, before each request here."""
        self.commander.expire_due_leases()
        for run, m in self.model.items():
            if m["holder"] and not self.live_holder(run):
                self.stale.append((run, m["holder"], m["token"]))
                m.update(holder=None, token=None, status="PREEMPTED")

    @rule(run=st.sampled_from(["r1", "r2"]), worker=st.sampled_from(["w1", "w2", "w3"]))
    def acquire(self, run: str, worker: str) -> None:
        self.reap()
        m = self.model[run]
        code, answer = call(self.commander.acquire, {"run_id": run, "worker_id": worker, "mode": "sft"})
        assert code == 200
        if m["status"] in ("COMPLETED", "FAILED"):
            assert answer["status"] == m["status"].lower()
        elif m["holder"]:
            assert (answer["status"], answer["holder"]) == ("denied", m["holder"])
        else:
            assert answer["status"] == "granted" and answer["epoch"] == m["epoch"] + 1
            m.update(holder=worker, token=answer["lease_token"], epoch=answer["epoch"], expires=self.clock.now + self.TTL,
                     status="RUNNING")

    @rule(seconds=st.floats(min_value=0, max_value=12))
    def time_passes(self, seconds: float) -> None:
        self.clock.now += seconds

    @rule(run=st.sampled_from(["r1", "r2"]))
    def holder_renews(self, run: str) -> None:
        self.reap()
        m = self.model[run]
        if m["holder"]:
            code, _ = call(self.commander.renew, {"run_id": run, "worker_id": m["holder"], "lease_token": m["token"],
                                                  "step": 0})
            assert code == 200
            m["expires"] = self.clock.now + self.TTL

    @rule(run=st.sampled_from(["r1", "r2"]), status=st.sampled_from(relay.RELEASE_STATUSES))
    def holder_releases(self, run: str, status: str) -> None:
        self.reap()
        m = self.model[run]
        if not m["holder"]:
            return
        code, _ = call(self.commander.release, {"run_id": run, "worker_id": m["holder"], "lease_token": m["token"],
                                                "status": status})
        assert code == 200
        self.stale.append((run, m["holder"], m["token"]))
        m.update(holder=None, token=None)
        if status == "FAILED":
            m["failed"] += 1  # no step ever advances here: every FAILED lease counts
            m["status"] = "FAILED" if m["failed"] >= self.MAX_FAILED else "PENDING"
        else:
            m["status"] = status

    @rule(data=st.data())
    def a_stale_token_changes_nothing(self, data) -> None:
        if not self.stale:
            return
        run, worker, token = data.draw(st.sampled_from(self.stale))
        self.reap()
        before = json.dumps(dataclasses.asdict(self.commander.runs[run]), sort_keys=True)
        for method, body in ((self.commander.renew, {"step": 1}), (self.commander.release, {"status": "COMPLETED"}),
                             (self.commander.report, {"step": 9, "latest_ckpt": {"iteration": 9, "manifest_sha256": "0" * 64}})):
            code, _ = call(method, {"run_id": run, "worker_id": worker, "lease_token": token, **body})
            assert code == 409
        assert json.dumps(dataclasses.asdict(self.commander.runs[run]), sort_keys=True) == before

    @rule()
    def commander_restarts(self) -> None:
        """A new process on (a copy of) the state file: every lease gets a full TTL."""
        self.reap()
        self.restarts += 1
        path = os.path.join(self.folder, f"state-{self.restarts}.json")
        if os.path.exists(self.commander.store.path):
            shutil.copy(self.commander.store.path, path)
        self.commander = self.start(path)
        for m in self.model.values():
            if m["holder"]:  # still in the record, even if past its expiry: SPEC gives it a full TTL
                m["expires"] = self.clock.now + self.TTL

    @invariant()
    def commander_agrees_with_the_model(self) -> None:
        for run, m in self.model.items():
            record = self.commander.runs.get(run)
            if record is None:
                assert m["epoch"] == 0
                continue
            live = record.holder if record.holder and self.commander.expires.get(run, 0) > self.clock.now else None
            assert live == self.live_holder(run)
            assert record.epoch == m["epoch"]
            epochs = [lease["epoch"] for lease in record.leases]
            assert epochs == list(range(1, len(epochs) + 1))  # one per grant, never reused
            if m["status"] in ("COMPLETED", "FAILED"):
                assert record.status == m["status"]
        if os.path.exists(self.commander.store.path):
            with open(self.commander.store.path) as handle:
                json.load(handle)  # the state file always parses

    def teardown(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


TestLeaseRules = LeaseRules.TestCase
TestLeaseRules.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("fuzz"))
    c.start_commander(lease=30, secret="fuzz-secret-0123456789")
    try:
        yield c
    finally:
        c.close()


SAFE_TEXT = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=60)
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                       max_size=5), max_leaves=15)
FIELDS = ["run_id", "worker_id", "mode", "lease_token", "step", "status", "reason", "latest_ckpt", "hf", "loss",
          "log_lines", "msg", "sync_error", "previous_lease_token", "phase"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
       path=st.sampled_from(["/api/lease/acquire", "/api/lease/renew", "/api/lease/release", "/api/job/report",
                             "/api/runs", "/api/runs/r1", "/api/runs/r1/logs", "/", "/metrics", "/api/health"]) | SAFE_TEXT.map(lambda t: "/" + t),
       body=st.binary(max_size=300) | st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=8).map(
           lambda d: json.dumps(d).encode()),
       sign=st.booleans(),
       headers=st.dictionaries(st.sampled_from(["X-Relay-Timestamp", "X-Relay-Nonce", "X-Relay-Signature",
                                                "Authorization", "Content-Type"]), SAFE_TEXT, max_size=4))
def test_no_request_however_malformed_gets_a_500_and_a_rejected_one_changes_nothing(fuzz_target, method, path, body,
                                                                                    sign, headers):
    before = open(fuzz_target.state_path, "rb").read() if os.path.exists(fuzz_target.state_path) else b""
    if sign:
        headers = relay.signed_headers(fuzz_target.secret, method, path, body)
    status, answer, _ = raw_request(fuzz_target, method, path, body, headers)
    assert status < 500, (status, answer[:300])
    if status >= 400:
        assert "error" in json.loads(answer)
        after = open(fuzz_target.state_path, "rb").read() if os.path.exists(fuzz_target.state_path) else b""
        assert after == before


YAML_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner,
                                                                                       max_size=4), max_leaves=12)
RUN_FIELDS = [f.name for f in dataclasses.fields(relay.RunConfig)]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=st.dictionaries(st.sampled_from(RUN_FIELDS + ["lium", "commander", "run", "worker", "relay"]),
                                YAML_VALUES, max_size=10) | YAML_VALUES,
       raw=st.none() | st.text(max_size=80))
def test_any_yaml_document_gives_a_config_or_a_one_line_error(tmp_path, document, raw):
    import yaml

    path = tmp_path / "random.yaml"
    path.write_text(raw if raw is not None else yaml.safe_dump(document))
    for loader in (relay.load_run_config, relay.load_stack_config):
        try:
            loader(str(path))
        except relay.UserError as exc:
            assert "\n" not in str(exc) and str(exc)


@pytest.mark.slow(90)
@pytest.mark.timeout(400)
def test_under_every_kind_of_fault_no_two_trainers_run_no_acknowledged_checkpoint_is_lost_and_the_run_finishes(tmp_path):
    from testing.chaos import FAULTS, run_chaos

    seed = int(os.environ.get("RELAY_CHAOS_SEED", "1"))  # fixed in CI; `python -m testing.chaos` for long runs
    # One round: each kind of fault once, in the seed's order, while a run of 1500 steps trains.
    report = run_chaos(tmp_path, seed, float(os.environ.get("RELAY_CHAOS_SECONDS", "0")), steps=1500)
    print(report.summary())
    assert report.violations == [], f"{report.summary()}: {report.violations} (replay with RELAY_CHAOS_SEED={seed})"
    assert report.completed
    assert set(report.faults) | report.cannot_run_here == set(FAULTS), report.summary()


# -- several nodes: a run on a Lium cluster ------------------------------------------------------


def cluster_stack(cluster: Cluster, api, hub, worker_env: dict, **groups: dict) -> str:
    """A stack renting 2-node H200 clusters (`lium clusters up`), syncing every checkpoint to the Hub."""
    hub_env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": hub.token, "HF_HUB_DISABLE_TELEMETRY": "1"}
    fields = {"lium": {"template_id": "", "node": "", "volume": "", "gpu": "H200", "gpu_count": 8, "nodes": 2},
              "run": {"hf_repo": HUB_REPO, "hf_sync_interval_seconds": 0.5, "l1_root": "/root/relay-l1"},
              "worker": {"env": {**hub_env, **worker_env}}}
    for group, more in groups.items():
        fields.setdefault(group, {}).update(more)
    return write_stack(cluster, api, **fields)


def cluster_members(api) -> list:
    return [pod for pod in api.pods.values() if getattr(pod, "cluster_id", "")]


@pytest.mark.slow(30)
def test_a_two_node_cluster_is_rented_whole_each_node_gets_its_place_and_none_bills_after_the_run(cluster, lium, hub):
    # the mock trainer on node 0; node 1 only lends its GPUs (here: waits, as `ray start --block` does)
    stack = cluster_stack(cluster, lium, hub, {"MOCK_MAX_STEPS": "30", "MOCK_STEP_SECONDS": "0.1",
                                               "SLIME_MEMBER_CMD": "exec sleep 100000"},
                          worker={"setup": "test -n \"$HF_ENDPOINT\" && sleep 1"})  # e.g. slime's environment
    supervisor, events = supervise(cluster, lium, stack)
    assert supervisor.wait(120) == 0, events.read_text()
    text = events.read_text()
    for words in ("creating cluster relay-r1-1: 2 nodes of 8xH200", "cluster relay-r1-1 (", "run r1 COMPLETED",
                  "removed: the run is COMPLETED"):
        assert words in text, text
    run = cluster.run("r1")
    assert run["leases"][0]["worker_id"] == "relay-r1-1-node0" and run["nodes"] == 2
    messages = [e["msg"] for e in run["events"]]
    assert "relay-r1-1-node1 joined epoch 1 as node 1" in messages
    for node in ("node0", "node1"):  # each node's setup, timed, on the page
        assert any(re.fullmatch(rf"relay-r1-1-{node}: setup done in \d+ s", m) for m in messages), messages
    assert run["hub"]["iteration"] == run["latest_checkpoint"]["iteration"] == 30  # the whole run, on the Hub
    assert cluster_members(lium) == []  # nothing left billing


@pytest.mark.slow(30)
def test_a_cluster_rent_that_left_a_member_failed_is_removed_whole_and_the_next_rent_runs(cluster, lium, hub):
    lium.cluster_rent_outcome = "member_fails"  # node 1 ends CREATION_FAILED: node 0 bills all the same
    stack = cluster_stack(cluster, lium, hub, {"MOCK_MAX_STEPS": "20", "MOCK_STEP_SECONDS": "0.1",
                                               "SLIME_MEMBER_CMD": "exec sleep 100000"})
    supervisor, events = supervise(cluster, lium, stack)
    assert supervisor.wait(150) == 0, events.read_text()
    text = events.read_text()
    for words in ("`lium clusters up` failed after renting (cluster_member_failed): removing cluster relay-r1-1",
                  "cluster relay-r1-1 (", "removed: its rent did not complete", "creating cluster relay-r1-2",
                  "run r1 COMPLETED"):
        assert words in text, text
    assert cluster.run("r1")["leases"][0]["worker_id"] == "relay-r1-2-node0"  # the half-made cluster never trained
    assert cluster_members(lium) == []


@pytest.mark.slow(35)
def test_a_cluster_rent_whose_answer_was_lost_is_adopted_once_it_shows_up_whole(cluster, lium, hub):
    lium.cluster_rent_outcome = "lost"  # rented, but the CLI hears an error; its members are listed only later
    stack = cluster_stack(cluster, lium, hub, {"MOCK_MAX_STEPS": "20", "MOCK_STEP_SECONDS": "0.1",
                                               "SLIME_MEMBER_CMD": "exec sleep 100000"})
    supervisor, events = supervise(cluster, lium, stack)
    assert supervisor.wait(150) == 0, events.read_text()
    text = events.read_text()
    for words in ("looking for cluster relay-r1-1 in `lium clusters ps`", "the rent went through after all: cluster relay-r1-1 (",
                  "run r1 COMPLETED"):
        assert words in text, text
    assert "creating cluster relay-r1-2" not in text  # one cluster rented, one billed
    assert cluster.run("r1")["leases"][0]["worker_id"] == "relay-r1-1-node0"
    assert cluster_members(lium) == []


@pytest.mark.slow(30)
def test_a_cluster_is_removed_once_the_runs_spend_reaches_the_budget_which_lium_cannot_enforce_on_clusters(
        cluster, lium, hub):
    # 2 nodes x 8 GPUs x $2.50/h = $40/h: $0.08 is about 7 s
    stack = cluster_stack(cluster, lium, hub, {"MOCK_MAX_STEPS": "100000", "MOCK_STEP_SECONDS": "0.1",
                                               "SLIME_MEMBER_CMD": "exec sleep 100000"}, relay={"budget_usd": 0.08})
    supervisor, events = supervise(cluster, lium, stack)
    assert supervisor.wait(120) == 1, events.read_text()
    text = events.read_text()
    for words in ("removed: the run's GPU spend $", "reached relay.budget_usd", "stopped by the budget"):
        assert words in text, text
    assert "creating cluster relay-r1-2" not in text
    assert cluster_members(lium) == []  # nothing bills past the budget


def print_member_logs(api, events: Path) -> None:
    """What a failed cluster test needs to be understood: the supervisor's events and each
    member's worker log (they go with the test's folder)."""
    print("----- supervisor -----", events.read_text(), sep="\n")
    for pod in [*api.pods.values(), *api.removed]:
        log = pod.folder / "root" / "relay" / "worker.log"
        if pod.cluster_id and log.exists():
            print(f"----- {pod.name} node {pod.cluster_node_index} -----", *log.read_text().splitlines()[-40:], sep="\n")


def member_home(api, cluster_id: str, rank: int) -> Path:
    """A cluster member's /root as this machine sees it (after its removal too)."""
    pod = next(p for p in [*api.pods.values(), *api.removed] if p.cluster_id == cluster_id and p.cluster_node_index == rank)
    return pod.folder / "root"


@pytest.mark.slow(150)
@pytest.mark.timeout(600)  # two 2-node Ray clusters start, 30-60 s each on a loaded 2-core machine
def test_a_run_on_two_ray_nodes_survives_losing_a_member_by_renting_a_new_cluster_and_ends_exactly(cluster, lium, hub,
                                                                                                ray_dir):
    env = ray_slime_multinode_env(cluster.tmp, [ray_dir(), ray_dir()], num_rollout=10,
                                  extra="--fake-rollout-manager-on-last-node")
    stack = cluster_stack(cluster, lium, hub, env, run={"total_steps": 10}, relay={"max_pods": 3})
    supervisor, events = supervise(cluster, lium, stack)
    try:
        wait_for("checkpoint 3 on the Hub", lambda: cluster.healthy() and (cluster.run("r1").get("hub") or {}).get(
            "iteration", -1) >= 3, 240)
    except AssertionError:
        print_member_logs(lium, events)
        raise
    first = json.loads((cluster.tmp / "launch" / "stack_state.json").read_text())["clusters"][0]
    node0, node1 = (member["id"] for member in first["members"])
    lium.preempt(node1)  # node 1 BROKEN: its processes die, its host is lost
    assert supervisor.wait(300) == 0, events.read_text()
    text = events.read_text()
    for words in (f"cluster relay-r1-1 ({first['id'][:8]}) lost node 1", "creating cluster relay-r1-2",
                  "run r1 COMPLETED", "removed: the run is COMPLETED"):
        assert words in text, text
    run = cluster.run("r1")
    # the lost member ended the epoch on every node before any other grant
    ended = next(e["msg"] for e in run["events"] if "stopped renewing" in e["msg"] or "left:" in e["msg"])
    assert "relay-r1-1-node1 (node 1)" in ended, run["events"]
    # (the new cluster's attempt number: a rent finds no fabric free while node 0 is kept for its checkpoint)
    last = json.loads((cluster.tmp / "launch" / "stack_state.json").read_text())["clusters"][-1]
    holders = [lease["worker_id"] for lease in run["leases"]]
    assert holders[0] == "relay-r1-1-node0" and holders[-1] == f"{last['name']}-node0" != holders[0], holders
    assert any(f"{holders[-1]} resumes from checkpoint" in e["msg"] and "in the Hub" in e["msg"] for e in run["events"])
    # the relayed run trained every batch once, in order: the uninterrupted result, on both new nodes
    second = last
    final = member_home(lium, second["id"], 0) / "relay-l1" / "runs" / "r1" / "ckpt" / relay.iteration_dirname(9)
    assert (final / "common.pt").read_text() == expected_ray_slime_weights(str(cluster.tmp / "base_torch_dist"), 10)
    assert json.loads((final / "trained_batches.json").read_text()) == list(range(10))
    assert cluster_members(lium) == []  # no member of either cluster bills


def test_a_new_epoch_waits_until_every_node_of_the_last_one_has_stopped_or_expired(cluster):
    cluster.start_commander(lease=2, secret="s" * 40)
    client = cluster.client()

    def ask(path: str, **fields) -> relay.Reply:
        return client.post(path, {"run_id": "r1", **fields})

    grant = ask("/api/lease/acquire", worker_id="c1-node0", mode="sft", nodes=2, group="c1").body
    assert ask("/api/lease/join", worker_id="c2-node1", group="c2", node_rank=1,  # another cluster's node: not yet
               address="127.0.30.2:1").body["status"] == "waiting"
    joined = ask("/api/lease/join", worker_id="c1-node1", group="c1", node_rank=1, address="127.0.30.1:1").body
    assert joined["status"] == "joined" and joined["epoch"] == grant["epoch"]
    assert "nodes: 2 of cluster c1; joined: c1-node1 (node 1)" in relay.format_run_detail(cluster.run("r1"))
    # node 1 goes silent (its node died); node 0 keeps renewing, and is told at the first renewal after
    renewals = []
    wait_for("node 0's renewal to be refused", lambda: renewals.append(ask(
        "/api/lease/renew", worker_id="c1-node0", lease_token=grant["lease_token"]).status) or renewals[-1] == 409, 10)
    assert renewals[0] == 200 and "c1-node1 (node 1) stopped renewing" in json.dumps(cluster.run("r1")["events"])
    # node 0 of the ended epoch may still run until its own expiry: a new cluster waits for it
    denied = ask("/api/lease/acquire", worker_id="c2-node0", mode="sft", nodes=2, group="c2").body
    assert denied["status"] == "denied" and denied["waiting_for"] == ["c1-node0"]
    assert "the last epoch's c1-node0 may still run" in relay.format_run_detail(cluster.run("r1"))  # `status` says why
    wait_for("the new cluster's grant once node 0's lease expired", lambda: ask(
        "/api/lease/acquire", worker_id="c2-node0", mode="sft", nodes=2, group="c2").body["status"] == "granted", 10)
    assert ask("/api/lease/member", worker_id="c1-node1", member_token=joined["member_token"]).status == 409
    assert ask("/api/lease/join", worker_id="c2-node1", group="c2", node_rank=1,
               address="127.0.30.2:1").body["status"] == "joined"


@pytest.mark.slow(45)
def test_losing_node_0_of_a_cluster_stops_its_members_and_a_new_cluster_resumes_from_the_hub_exactly(cluster, lium, hub,
                                                                                                   tmp_path):
    stack = cluster_stack(cluster, lium, hub, {"MOCK_MAX_STEPS": "80", "MOCK_STEP_SECONDS": "0.1",
                                               "SLIME_MEMBER_CMD": "exec sleep 100000"}, relay={"max_pods": 3})
    supervisor, events = supervise(cluster, lium, stack)
    wait_for("checkpoint 20 on the Hub", lambda: cluster.healthy() and (cluster.run("r1").get("hub") or {}).get(
        "iteration", -1) >= 20, 90)
    first = json.loads((cluster.tmp / "launch" / "stack_state.json").read_text())["clusters"][0]
    lium.preempt(first["members"][0]["id"], remove=True)  # node 0, the holder, gone with its disk
    assert supervisor.wait(150) == 0, events.read_text()
    text = events.read_text()
    for words in ("lost node 0", "creating cluster relay-r1-2", "run r1 COMPLETED"):
        assert words in text, text
    run = cluster.run("r1")
    # node 0's epoch (node 1 with it) ended by expiry before the new cluster's began
    messages = [e["msg"] for e in run["events"]]
    granted = messages.index(next(m for m in messages if "granted to relay-r1-2-node0" in m))
    assert any("relay-r1-1-node0 ended: expired" in m for m in messages[:granted]), messages
    resumed = next(m for m in messages if m.startswith("relay-r1-2-node0 resumes from checkpoint"))
    assert int(resumed.split("checkpoint ")[1].split()[0]) >= 20 and "in the Hub" in resumed
    second = json.loads((cluster.tmp / "launch" / "stack_state.json").read_text())["clusters"][1]
    final = member_home(lium, second["id"], 0) / "relay-l1" / "runs" / "r1" / "ckpt" / relay.iteration_dirname(80)
    assert (final / "model.json").read_bytes() == reference_model(tmp_path, 80)
    assert cluster_members(lium) == []


@pytest.mark.slow(45)
def test_after_losing_a_member_node_0_is_kept_alone_until_the_hub_has_the_checkpoint_only_it_holds(cluster, lium, hub,
                                                                                                  tmp_path):
    stack = cluster_stack(cluster, lium, hub, {"MOCK_MAX_STEPS": "80", "MOCK_STEP_SECONDS": "0.1",
                                               "SLIME_MEMBER_CMD": "exec sleep 100000"},
                          run={"hf_sync_interval_seconds": 3600}, relay={"max_pods": 3})  # no Hub copy before the loss
    supervisor, events = supervise(cluster, lium, stack)
    wait_for("checkpoint 20 sealed", lambda: cluster.healthy() and checkpoint_at_least(cluster, 20), 90)
    assert not cluster.run("r1").get("hub")  # node 0's disk holds the only copy
    first = json.loads((cluster.tmp / "launch" / "stack_state.json").read_text())["clusters"][0]
    lium.preempt(first["members"][1]["id"])  # node 1 BROKEN
    assert supervisor.wait(150) == 0, events.read_text()
    text = events.read_text()
    kept, removed = text.index("node 0 of cluster relay-r1-1"), text.index("removed: the Hub has the last checkpoint now")
    assert kept < removed, text
    run = cluster.run("r1")
    # node 0 took the run again only to send its checkpoint; the new cluster resumed from that
    holders = [lease["worker_id"] for lease in run["leases"]]
    assert holders[:2] == ["relay-r1-1-node0"] * 2 and holders[-1] != holders[0], holders
    resumed = next(e["msg"] for e in run["events"] if e["msg"].startswith(f"{holders[-1]} resumes from checkpoint"))
    assert int(resumed.split("checkpoint ")[1].split()[0]) >= 20 and "in the Hub" in resumed  # nothing lost
    last = json.loads((cluster.tmp / "launch" / "stack_state.json").read_text())["clusters"][-1]
    final = member_home(lium, last["id"], 0) / "relay-l1" / "runs" / "r1" / "ckpt" / relay.iteration_dirname(80)
    assert (final / "model.json").read_bytes() == reference_model(tmp_path, 80)
    assert cluster_members(lium) == []


@pytest.mark.slow(40)
@pytest.mark.parametrize("after", [0, 4], ids=["at-once", "after-the-workers-start"])
def test_a_member_whose_setup_fails_stops_the_supervisor_with_its_reason_instead_of_stalling_node_0(cluster, lium, hub,
                                                                                                    after):
    stack = cluster_stack(cluster, lium, hub, {"MOCK_MAX_STEPS": "20", "MOCK_STEP_SECONDS": "0.1",
                                               "SLIME_MEMBER_CMD": "exec sleep 100000"},  # fails on node 1 only:
                          worker={"setup": f"sleep {after}; grep -q '\"node_rank\": 0' relay/run.yaml"})
    supervisor, events = supervise(cluster, lium, stack)
    assert supervisor.wait(120) == 2, events.read_text()
    text = events.read_text()
    assert "failed for a reason every cluster would meet: setup failed with status 1" in text, text
    assert "creating cluster relay-r1-2" not in text and cluster_members(lium) == []
    assert cluster.run("r1")["holder"] in ("", "relay-r1-1-node0")  # node 0 got no further than waiting for node 1
