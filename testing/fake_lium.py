#!/usr/bin/env python3
"""A fake `lium` (lium.io 0.32 CLI) for tests: pods are local sandboxes.

Each pod is a folder $FAKE_LIUM_HOME/pods/<name>/home, the pod's home: `lium exec` runs
`bash -c` there and `lium scp` copies relative paths there (as SSH and SFTP start in /root on a
real pod).  Every process a pod runs carries FAKE_LIUM_POD_ID=<id> in its environment, so
`rm` and `preempt` (a test-only verb: the host vanished) kill all of them at once.

Exit codes and the JSON error envelope (`{"ok": false, "error": {...}}` on the last stderr
line with --json or LIUM_OUTPUT=json) follow notes/lium.md: 2 usage, 3 API, 4 SSH, 5 pod not
found.  Knobs (environment of `lium up`):
  FAKE_LIUM_UP_FAIL=N           `up` fails with exit N
  FAKE_LIUM_UP_LEAVES_POD=1     ...after renting the pod (it keeps "billing")
  FAKE_LIUM_NEVER_READY=1       the pod never answers exec/scp (exit 4)
  FAKE_LIUM_BOOT_SECONDS=S      ...until S seconds after `up` (a pod takes a while to boot)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

HOME = os.environ["FAKE_LIUM_HOME"]
STATE = os.path.join(HOME, "state.json")
JSON_OUTPUT = os.environ.get("LIUM_OUTPUT") == "json" or "--json" in sys.argv


def fail(code: str, message: str, exit_code: int, hint: str = "") -> None:
    if JSON_OUTPUT:
        print(json.dumps({"ok": False, "error": {"code": code, "message": message, "hint": hint,
                                                 "exit_code": exit_code}}), file=sys.stderr)
    else:
        print(f"Error: {message}", file=sys.stderr)
    sys.exit(exit_code)


@contextlib.contextmanager
def state():
    os.makedirs(HOME, exist_ok=True)
    with open(os.path.join(HOME, "lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.load(open(STATE)) if os.path.exists(STATE) else {"pods": {}, "log": []}
        yield data
        with open(STATE + ".tmp", "w") as handle:
            json.dump(data, handle, indent=1)
        os.replace(STATE + ".tmp", STATE)


def find(data: dict, ref: str) -> dict:
    for pod in data["pods"].values():
        if ref in (pod["name"], pod["huid"], pod["id"]):
            return pod
    fail("POD_NOT_FOUND", f"Pod '{ref}' not found", 5, "run `lium ps` to list your pods")
    raise AssertionError


def pod_home(pod: dict) -> str:
    return os.path.join(HOME, "pods", pod["name"], "home")


def kill_pod_processes(pod_id: str) -> None:
    needle = f"FAKE_LIUM_POD_ID={pod_id}".encode()
    for _ in range(20):
        found = []
        for name in os.listdir("/proc"):
            if name.isdigit() and int(name) != os.getpid():
                with contextlib.suppress(OSError):
                    if needle in open(f"/proc/{name}/environ", "rb").read().split(b"\0"):
                        found.append(int(name))
        if not found:
            return
        for pid in found:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def reachable(pod: dict) -> None:
    if not pod["ready"] or time.time() < pod["ready_at"]:
        fail("SSH_ERROR", f"SSH connection to {pod['huid']} failed: connection refused", 4, "the pod may still be starting")


def main() -> int:
    parser = argparse.ArgumentParser(prog="lium")
    sub = parser.add_subparsers(dest="verb", required=True)
    up = sub.add_parser("up")
    up.add_argument("node", nargs="?")
    up.add_argument("--name", "-n")
    up.add_argument("--template_id", "-t", required=True)
    up.add_argument("--volume", "-v")
    up.add_argument("--ttl")
    up.add_argument("--gpu")
    up.add_argument("-y", "--yes", action="store_true")
    up.add_argument("--json", action="store_true")
    ps = sub.add_parser("ps")
    ps.add_argument("pod", nargs="?")
    ps.add_argument("--format", default="table")
    scp = sub.add_parser("scp")
    scp.add_argument("pod")
    scp.add_argument("local")
    scp.add_argument("remote", nargs="?")
    scp.add_argument("-d", "--download", action="store_true")
    ex = sub.add_parser("exec")
    ex.add_argument("pod")
    ex.add_argument("command")
    ex.add_argument("--json", action="store_true")
    rm = sub.add_parser("rm")
    rm.add_argument("pod")
    rm.add_argument("-y", "--yes", action="store_true")
    preempt = sub.add_parser("preempt")
    preempt.add_argument("pod")
    try:
        args = parser.parse_args()
    except SystemExit as exc:
        return int(exc.code or 0)

    if args.verb == "up":
        if not args.yes:
            fail("CONFIRMATION_REQUIRED", "refusing to rent without a terminal; pass -y", 2)
        with state() as data:
            name = args.name or f"pod-{len(data['pods']) + 1}"
            pod = {"id": str(uuid.uuid4()), "huid": f"eager-wolf-{uuid.uuid4().hex[:2]}", "name": name,
                   "status": "running", "template_id": args.template_id, "volume": args.volume, "ttl": args.ttl,
                   "gpu_type": args.gpu or "H200", "price_per_hour": 3.5, "spent_usd": 0.0, "ip": "127.0.0.1",
                   "ssh_cmd": f"ssh root@127.0.0.1 -p 22 # {name}", "removal_scheduled_at": None,
                   "ready": os.environ.get("FAKE_LIUM_NEVER_READY") != "1", "created_at": time.time(),
                   "ready_at": time.time() + float(os.environ.get("FAKE_LIUM_BOOT_SECONDS", "0"))}
            failing = int(os.environ.get("FAKE_LIUM_UP_FAIL", "0"))
            data["log"].append(["up", name])
            holder = next((p["name"] for p in data["pods"].values() if args.volume and p["volume"] == args.volume), None)
            if holder:  # a volume attaches to one pod at a time
                fail("API_ERROR", f"volume {args.volume} is attached to pod {holder}", 3, "remove that pod first")
            if failing and os.environ.get("FAKE_LIUM_UP_LEAVES_POD") != "1":
                fail("API_ERROR", "executor unavailable: no H200 free on this node", failing)
            data["pods"][pod["id"]] = pod
            os.makedirs(pod_home(pod), exist_ok=True)
        if failing:
            fail("POD_START_FAILED", f"pod {name} was rented but failed to start; it is billing: remove it "
                                     f"with `lium rm {name} -y`", failing)
        if args.json:
            print(json.dumps({"pod": pod}))
        return 0

    if args.verb == "ps":
        with state() as data:
            pods = list(data["pods"].values())
            if args.pod:
                pods = [find(data, args.pod)]
        print(json.dumps(pods) if args.format == "json" else "\n".join(p["name"] for p in pods))
        return 0

    if args.verb in ("scp", "exec"):
        with state() as data:
            pod = find(data, args.pod)
            data["log"].append([args.verb, pod["name"]])
        reachable(pod)
        home = pod_home(pod)
        if args.verb == "scp":
            remote = args.remote or os.path.basename(args.local)
            target = os.path.join(home, remote.lstrip("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy2(args.local, target)
            return 0
        env = dict(os.environ, FAKE_LIUM_POD_ID=pod["id"], HOME=home)
        result = subprocess.run(["bash", "-c", args.command], cwd=home, env=env, capture_output=True, text=True)
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        return result.returncode

    if args.verb in ("rm", "preempt"):
        if args.verb == "rm" and not args.yes and not sys.stdin.isatty():
            fail("CONFIRMATION_REQUIRED", "refusing to remove without a terminal; pass -y", 2)
        with state() as data:
            pod = find(data, args.pod)
            kill_pod_processes(pod["id"])
            del data["pods"][pod["id"]]
            data["log"].append([args.verb, pod["name"]])
        print(f"removed {pod['name']}")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
