#!/usr/bin/env python3
"""relay-trainer: keep one training run alive across many preemptible GPU pods.

A commander grants each run to exactly one worker at a time (a lease carrying a fencing
epoch); a worker on each pod restores the newest checkpoint, runs the trainer, renews the
lease, seals and prunes checkpoints; a watchdog kills the trainer the moment the lease can no
longer be trusted.  One file, standard library only at module level, so that it can be copied
onto any pod with scp.  Sections, in the order data flows:

    1. constants, errors, small utilities       7. trainer process and watchdog
    2. config                                   8. worker
    3. protocol and auth                        9. lium and launch-stack
    4. commander                               10. status and demo
    5. checkpoints                             11. mock trainer
    6. stores (L2: the Hugging Face Hub)       12. command line
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import concurrent.futures
import copy
import ctypes
import dataclasses
import datetime
import difflib
import errno
import fcntl
import functools
import hashlib
import hmac
import html
import http.client
import http.server
import io
import ipaddress
import json
import math
import os
import random
import re
import resource
import secrets
import select
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable, Collection

VERSION = "0.3.0"
HERE = os.path.dirname(os.path.abspath(__file__))
# The relay-trainer image installs relay's own packages (huggingface_hub, PyYAML) in site/ beside
# relay.py (docker/install_relay.sh), not in the trainer's Python, whose pins they could break.
# Only this process looks there: the trainer's environment is not changed.
RELAY_SITE = os.path.join(HERE, "site")
if os.path.isdir(RELAY_SITE) and RELAY_SITE not in sys.path:
    sys.path.insert(0, RELAY_SITE)

###############################################################################
# 1. Constants, errors, small utilities #######################################
###############################################################################

RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
WORKER_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}\Z")
MAX_NODES = 64  # nodes of one run (a Lium cluster is a few whole nodes)
NODE_ADDRESS_RE = re.compile(r"[A-Za-z0-9.:\[\]-]{1,250}:\d{1,5}\Z")  # host:port of a node's checkpoint server
HF_REPO_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}\Z")
SHA1_RE = re.compile(r"[0-9a-f]{40}\Z")
MODES = ("sft", "rl")
HUB_TRANSFERS = ("xet", "lfs")


class UserError(Exception):
    """A mistake the user can fix (bad config, missing package, unreachable commander).

    The command line turns it into one line on stderr and exit status 2, never a traceback;
    line breaks in text quoted from the user's files are escaped to keep it one line.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))


def boottime() -> float:
    """Seconds on CLOCK_BOOTTIME: the clock every lease deadline on a pod is measured with.

    It is system-wide (the worker and its watchdog read the same clock), never jumps with
    NTP or a user setting the date, and unlike CLOCK_MONOTONIC it keeps counting while the
    machine is suspended, so a frozen-then-thawed pod sees its deadline as passed.
    """
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def utc_now() -> float:
    return time.time()


def iso(ts: float | None) -> str:
    if not ts:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def log(component: str, message: str) -> None:
    """One line on stderr with a UTC timestamp; never called with a secret."""
    stamp = time.strftime("%H:%M:%S", time.gmtime())
    print(f"{stamp} [{component}] {message}", file=sys.stderr, flush=True)


def atomic_write(path: str, data: bytes, mode: int = 0o600, durable: bool = True) -> None:
    """Replace `path` with `data` so that a reader sees the old or the new file, never a mix.

    Temp file in the same folder, fsync, rename, fsync of the folder (`durable`): after a
    crash at any point the file is either the previous version or the complete new one.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@functools.cache
def _libc() -> Any:
    # Loaded once, in the worker before the watchdog is forked: the child never calls dlopen.
    return ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, arg: int | bytes) -> None:
    try:
        _libc().prctl(option, arg, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: process names are best effort
        pass


def set_process_name(name: str) -> None:
    """Rename this process (Linux comm, 15 bytes) so `pkill -9 python` does not match it.

    slime's stock scripts run `pkill -9 python`, which matches every process whose name
    starts with "python": the worker and watchdog must not be among them.
    """
    _prctl(15, name.encode()[:15] + b"\0")  # PR_SET_NAME


def sha256_file(path: str, should_abort: Callable[[], bool] = lambda: False) -> str | None:
    """Hex SHA-256 of a file, or None when `should_abort` turned true part-way."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            if should_abort():
                return None
    return digest.hexdigest()


###############################################################################
# 2. Config ###################################################################
###############################################################################


def load_yaml_file(path: str) -> Any:
    """Parse a YAML file (JSON is accepted too, and needs no PyYAML)."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        import yaml  # noqa: PLC0415  (only the commands that read YAML need PyYAML)
    except ImportError:
        try:
            return json.loads(text)
        except ValueError:
            raise UserError(f"{path}: reading YAML needs PyYAML: pip install pyyaml") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1})" if where is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise UserError(f"{path}: not valid YAML{at}: {problem}") from None


def _check_type(where: str, name: str, value: Any, kind: type) -> Any:
    """Check one config value against its declared type; ints are accepted for floats."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise UserError(f"{where}: field '{name}' must be a mapping of names to values")
        bad = [k for k, v in value.items() if not isinstance(v, (str, int, float)) or isinstance(v, bool)]
        if bad:
            raise UserError(f"{where}: field '{name}.{bad[0]}' must be a string or number")
        return {k: str(v) for k, v in value.items()}
    if kind is int and isinstance(value, bool):
        raise UserError(f"{where}: field '{name}' must be an integer, not {value!r}")
    if not isinstance(value, kind):
        expected = {str: "a string", bool: "true or false", int: "an integer", float: "a number"}[kind]
        raise UserError(f"{where}: field '{name}' must be {expected}, not {type(value).__name__}")
    if kind is float and not math.isfinite(value):
        raise UserError(f"{where}: field '{name}' must be a finite number")
    return value


def did_you_mean(name: str, known: Collection[str], cutoff: float = 0.6) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=cutoff)
    return f" (did you mean '{close[0]}'?)" if close else ""


def build_dataclass(cls: type, data: Any, where: str) -> Any:
    """Build `cls` from a mapping, naming the field of the first mistake.

    Unknown fields are refused: a typo such as `hf_rep:` silently ignored would cost a user
    a run without its Hub copy.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping of fields, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in data if k not in fields)
    if unknown:
        raise UserError(f"{where}: unknown field {', '.join(f'{k!r}{did_you_mean(k, list(fields))}' for k in unknown)} "
                        f"(known: {', '.join(sorted(fields))})")
    values = {}
    for name, spec in fields.items():
        if name in data and data[name] is not None:
            kind = {"str": str, "bool": bool, "int": int, "float": float}.get(str(spec.type), dict)
            values[name] = _check_type(where, name, data[name], kind)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise UserError(f"{where}: missing required field '{name}'")
    return cls(**values)


@dataclass
class RunConfig:
    """run.yaml: what one worker needs to relay one run.  docs/worker.md documents every field."""

    commander_url: str
    run_id: str
    mode: str
    worker_id: str = ""
    hf_repo: str = ""
    hf_dry_run: bool = False
    hf_prefetch: bool = True
    hf_allow_public: bool = False
    hf_keep_last_checkpoints: int = 2
    hf_final_sync_timeout_seconds: float = 1800.0
    hf_transfer: str = "xet"  # how checkpoint files travel: "xet" (hf_xet, what the Hub prefers) or "lfs"
    hf_xet_threads: int = 4  # hf_xet's worker threads: what a pod's CPUs can spare beside the trainer
    relay_shared_secret: str = ""
    save_rollout_trajectories: bool = False
    rollout_trajectory_subdir: str = "rollout"
    rollout_trajectory_pattern: str = "rollout_{rollout_id}.pt"
    l1_root: str = "/mnt/relay"
    keep_last_checkpoints: int = 3
    hf_sync_interval_seconds: float = 7200.0
    max_trainer_restarts: int = 3
    stall_timeout_seconds: float = 3600.0
    stop_grace_seconds: float = 30.0
    require_dataset_state: bool = True
    total_steps: int = 0
    trainer_command: str = ""
    commander_wait_seconds: float = 60.0
    commander_ca_file: str = ""  # CA that signed an https:// commander's certificate (default: the system's)
    check_slime_flags: bool = True  # a slime command's flags against slime_flags.txt, before any lease
    max_lease_seconds: float = 600.0  # the longest lease TTL this worker believes, whatever an answer says
    # A run across several nodes (a Lium cluster; docs/worker.md, "Several nodes"): every node
    # runs a worker with the same run config but its own node_rank and node_ip.
    nodes: int = 1
    node_rank: int = 0
    node_ip: str = ""  # this node's address on the cluster's network (Lium's overlay IP)
    master_addr: str = ""  # node 0's address on it (default: node_ip on node 0)
    group: str = ""  # the cluster: nodes of one group train together, and only they
    node_port: int = 8790  # each node's checkpoint server, on node_ip
    # A shell command run once at start, before any lease (e.g. bringing slime's environment
    # to a cluster member); its time goes to the run's events, a failure stops the worker.
    setup: str = ""
    env: dict = field(default_factory=dict)

    @property
    def run_dir(self) -> str:
        return os.path.join(self.l1_root, "runs", self.run_id)

    @property
    def rollout_dir(self) -> str:
        return os.path.join(self.run_dir, self.rollout_trajectory_subdir)


def validate_run_config(cfg: RunConfig, where: str) -> RunConfig:
    """Range and format checks that types alone cannot express; fills derived defaults."""
    def bad(name: str, why: str) -> UserError:
        return UserError(f"{where}: field '{name}' {why}")

    if not re.match(r"https?://[^/\s]+", cfg.commander_url):
        raise bad("commander_url", f"must be an http:// or https:// URL, not {cfg.commander_url!r}")
    cfg.commander_url = cfg.commander_url.rstrip("/")
    if not RUN_ID_RE.match(cfg.run_id):
        raise bad("run_id", "must match [A-Za-z0-9][A-Za-z0-9._-]{0,63}")
    if cfg.mode not in MODES:
        raise bad("mode", f"must be 'sft' or 'rl', not {cfg.mode!r}")
    cfg.worker_id = cfg.worker_id or socket.gethostname()
    if not WORKER_ID_RE.match(cfg.worker_id):
        raise bad("worker_id", "must match [A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
    if cfg.hf_repo and not HF_REPO_RE.match(cfg.hf_repo):
        raise bad("hf_repo", f"must look like 'user/repo', not {cfg.hf_repo!r}")
    if cfg.hf_transfer not in HUB_TRANSFERS:
        raise bad("hf_transfer", f"must be 'xet' or 'lfs', not {cfg.hf_transfer!r}")
    if not 1 <= cfg.hf_xet_threads <= 64:
        raise bad("hf_xet_threads", "must be between 1 and 64")
    sub = cfg.rollout_trajectory_subdir
    if not sub or sub.startswith("/") or ".." in sub.split("/") or sub == "ckpt" or sub.startswith("ckpt/"):
        raise bad("rollout_trajectory_subdir", "must be a relative folder inside the run's folder (not ckpt)")
    cfg.rollout_trajectory_pattern = normalize_rollout_pattern(cfg.rollout_trajectory_pattern, where)
    for name in ("keep_last_checkpoints",):
        if getattr(cfg, name) < 1:
            raise bad(name, "must be at least 1")
    for name in ("max_trainer_restarts", "total_steps", "hf_keep_last_checkpoints"):
        if getattr(cfg, name) < 0:
            raise bad(name, "must be 0 or more")
    if cfg.max_lease_seconds < 2:
        raise bad("max_lease_seconds", "must be at least 2 (the commander's shortest lease)")
    validate_nodes(cfg, bad)
    for name in ("hf_sync_interval_seconds", "hf_final_sync_timeout_seconds", "stall_timeout_seconds",
                 "stop_grace_seconds", "commander_wait_seconds"):
        if getattr(cfg, name) <= 0:
            raise bad(name, "must be a positive number of seconds")
    for name in ("l1_root", "rollout_trajectory_subdir", "rollout_trajectory_pattern"):
        if not re.fullmatch(r"[^\s'\"\\$`*?\[\];&|<>()!#~]+", getattr(cfg, name)):
            raise bad(name, "must be a non-empty path without spaces or shell special characters "
                            "(it is passed to the trainer in RELAY_SLIME_ARGS)")
    return cfg


def validate_nodes(cfg: RunConfig, bad: Callable[[str, str], UserError]) -> None:
    """A multi-node run's fields.  Its checkpoints leave the cluster only through the Hub: a
    cluster has no Lium volume, and a lost node means a whole new cluster."""
    if not 1 <= cfg.nodes <= MAX_NODES:
        raise bad("nodes", f"must be between 1 and {MAX_NODES}")
    if not 0 <= cfg.node_rank < cfg.nodes:
        raise bad("node_rank", f"must be between 0 and nodes - 1 ({cfg.nodes - 1})")
    if not 1 <= cfg.node_port <= 65535:
        raise bad("node_port", "must be a TCP port")
    if cfg.nodes == 1:
        return
    if not cfg.hf_repo:
        raise bad("hf_repo", f"is required for a run on {cfg.nodes} nodes: a cluster has no volume, so the Hub is "
                             "where a new cluster resumes from")
    for name in ("node_ip", "group"):
        if not getattr(cfg, name):
            raise bad(name, f"is required for a run on {cfg.nodes} nodes")
    if not re.fullmatch(r"[A-Za-z0-9.:-]{1,250}", cfg.node_ip):
        raise bad("node_ip", f"must be an address, not {cfg.node_ip!r}")
    if not WORKER_ID_RE.match(cfg.group):
        raise bad("group", "must match [A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
    cfg.master_addr = cfg.master_addr or (cfg.node_ip if cfg.node_rank == 0 else "")
    if not re.fullmatch(r"[A-Za-z0-9.:-]{1,250}", cfg.master_addr):
        raise bad("master_addr", "is required on nodes other than node 0 (node 0's address)")


def normalize_rollout_pattern(pattern: str, where: str) -> str:
    """Return a pattern slime can format.

    slime calls PATTERN.format(rollout_id=<a string>), so a format spec such as the seed's
    `{rollout_id:08d}` raises inside slime.  It is rewritten to plain `{rollout_id}` with a
    warning (file names lose the zero padding; the relay sorts them numerically anyway).
    """
    if "/" in pattern:
        raise UserError(f"{where}: field 'rollout_trajectory_pattern' must be a file name, not a path")
    fixed = re.sub(r"\{rollout_id:[^}]*\}", "{rollout_id}", pattern)
    if fixed != pattern:
        log("config", f"rollout_trajectory_pattern {pattern!r} uses a format spec that slime cannot apply "
                      f"(it passes rollout_id as a string); using {fixed!r}")
    try:
        fixed.format(rollout_id="0")
    except (KeyError, IndexError, ValueError, AttributeError, TypeError):
        raise UserError(f"{where}: field 'rollout_trajectory_pattern' may use only the placeholder {{rollout_id}}") from None
    if "{rollout_id}" not in fixed:
        raise UserError(f"{where}: field 'rollout_trajectory_pattern' must contain {{rollout_id}}")
    return fixed


def load_run_config(path: str) -> RunConfig:
    cfg = build_dataclass(RunConfig, load_yaml_file(path), path)
    cfg = validate_run_config(cfg, path)
    if cfg.commander_ca_file:  # relative to the run config: launch-stack ships the CA file beside it
        cfg.commander_ca_file = os.path.join(os.path.dirname(os.path.abspath(path)), cfg.commander_ca_file)
        if not os.path.isfile(cfg.commander_ca_file):
            raise UserError(f"{path}: field 'commander_ca_file': no such file {cfg.commander_ca_file}")
    cfg.relay_shared_secret = os.environ.get("RELAY_SHARED_SECRET") or cfg.relay_shared_secret
    return cfg


@dataclass
class CommanderGroup:
    """stack.yaml `commander`: the commander launch-stack starts (or reuses) on this machine."""

    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str = ""  # what pods use to reach it; default http://host:port
    state_path: str = ".relay-launch/commander_state.json"
    log_path: str = ".relay-launch/commander.log"
    pid_path: str = ".relay-launch/commander.pid"
    lease_seconds: float = 60.0
    shared_secret: str = ""  # RELAY_SHARED_SECRET wins
    python_bin: str = ""  # default: the Python running launch-stack
    wait_seconds: float = 20.0
    restart_if_running: bool = False
    tls_cert: str = ""  # with tls_key: the commander serves HTTPS (serve --tls-cert/--tls-key)
    tls_key: str = ""
    tls_ca_file: str = ""  # the CA pods and launch-stack verify it with (default: the system's); shipped to pods
    notify_url: str = ""  # RELAY_NOTIFY_URL wins; reaches the commander through its environment


@dataclass
class LiumGroup:
    """stack.yaml `lium`: how pods are rented (`lium up`)."""

    template_id: str = ""  # required for single pods (see load_stack_config)
    # What to rent: a node (`lium ls` NODE_ID, UUID or HUID) OR a GPU type with a count, the
    # cheapest node that has them.  `lium up --gpu H200` alone rents ONE GPU: gpu_count 8 is a whole node.
    node: str = ""
    executor: str = ""  # the old name of `node`
    gpu: str = ""
    gpu_count: int = 1
    pod_name: str = ""  # default relay-{run_id}; "-N" is added per attempt so each pod is unique
    volume: str = ""  # 'id:HUID' of a Lium volume (`lium volumes list`)
    ttl: str = ""  # e.g. 45m, 6h, 2d: it ends every pod, the one holding the lease too
    yes: bool = True  # kept for old stack files: only true works (see validate)
    up_timeout_seconds: float = 1800.0  # `lium up --timeout`: rent + boot + image pull
    rent_lookup_seconds: float = 120.0  # after a rent with no answer: how long to look for its pod
    ready_timeout_seconds: float = 900.0
    poll_interval_seconds: float = 10.0
    # Several whole nodes on one fabric (`lium clusters up`; docs/launch-stack.md, "Several
    # nodes"): gpu/gpu_count then describe each node, and template_id, if set, must be a
    # `daturaai/lium-cluster` template (the only image a cluster runs).
    nodes: int = 1
    fabric: str = ""  # `lium clusters list` FABRIC id; default: the cheapest with `nodes` nodes free


@dataclass
class WorkerGroup:
    """stack.yaml `worker`: where the worker lives on the pod.  Relative paths are under the
    pod's home folder (/root on Lium), which `lium exec` and `lium scp` start in."""

    remote_config_path: str = "relay/run.yaml"
    remote_workdir: str = "relay"
    remote_python_bin: str = "python3"
    remote_log_path: str = "relay/worker.log"
    remote_pid_path: str = "relay/worker.pid"
    command: str = ""  # default: REMOTE_PYTHON relay.py worker REMOTE_CONFIG
    # A shell command each pod's worker (each node's of a cluster) runs first, in its environment
    # and log: what the trainer needs and the image lacks (docs/slime.md); run.yaml `setup`.
    setup: str = ""
    env: dict = field(default_factory=dict)
    image_relay_dir: str = "/opt/relay"  # where the relay-trainer image has relay.py: used when identical


@dataclass
class RelayGroup:
    """stack.yaml `relay`: what --supervise does."""

    max_pods: int = 5  # pods over the run's whole life
    no_lease_grace_seconds: float = 300.0  # a run without a live lease this long gets a new pod
    remove_pods_at_end: bool = True
    # A second pod whose worker stands by: a preemption then costs one lease TTL instead of a
    # pod boot and a restore, at the price of a second GPU bill.  Off by default.
    hot_standby: bool = False
    state_path: str = ".relay-launch/stack_state.json"
    budget_usd: float = 0.0  # GPU spend of the whole run, in USD; 0: no limit


@dataclass
class StackConfig:
    path: str
    commander: CommanderGroup
    lium: LiumGroup
    run: RunConfig
    worker: WorkerGroup
    relay: RelayGroup

    @property
    def local_url(self) -> str:
        if self.commander.tls_cert:  # the certificate names the public address, not 127.0.0.1
            return self.run.commander_url
        host = "127.0.0.1" if self.commander.host in ("0.0.0.0", "::", "") else self.commander.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.commander.port}"

    @property
    def secret(self) -> str:
        return os.environ.get("RELAY_SHARED_SECRET") or self.commander.shared_secret

    @property
    def notify_url(self) -> str:
        return os.environ.get("RELAY_NOTIFY_URL") or self.commander.notify_url


STACK_GROUPS = ("commander", "lium", "run", "worker", "relay")


# run.yaml fields a stack does not take, and where the stack says the same
STACK_SETS = {"commander_url": "commander.public_url", "worker_id": "(launch-stack: the pod's name)"}


def stack_group_classes() -> dict[str, type]:
    return {"commander": CommanderGroup, "lium": LiumGroup, "run": RunConfig, "worker": WorkerGroup, "relay": RelayGroup}


def homes_of(name: str) -> list[str]:
    """Where a stack.yaml field of this name belongs (several groups may have it: env, state_path)."""
    if name in STACK_SETS:
        return [STACK_SETS[name]]
    return [f"{group}.{name}" for group, cls in stack_group_classes().items()
            if name in {f.name for f in dataclasses.fields(cls)}]


def check_stack_layout(path: str, data: dict) -> None:
    """One error for every field out of its group: the earlier project's flat layout puts all of
    them at the top level, and naming one per try would take a user a dozen tries."""
    misplaced, unknown = [], []
    for key in data:
        if key in STACK_GROUPS:
            continue
        homes = homes_of(str(key))
        if homes:
            misplaced.append(f"{key} -> {' or '.join(homes)}")
        else:
            unknown.append(f"'{key}'{did_you_mean(str(key), STACK_GROUPS)}")
    for group, cls in stack_group_classes().items():
        fields = data.get(group)
        own = {f.name for f in dataclasses.fields(cls)}
        for key in fields if isinstance(fields, dict) else ():
            homes = [home for home in homes_of(str(key)) if not home.startswith(f"{group}.")]
            if key not in own and homes:
                misplaced.append(f"{group}.{key} -> {' or '.join(homes)}")
    if misplaced or unknown:
        parts = [f"fields out of their group: {'; '.join(misplaced)}"] if misplaced else []
        parts += [f"unknown group {', '.join(unknown)} (the groups: {', '.join(STACK_GROUPS)})"] if unknown else []
        raise UserError(f"{path}: {'; '.join(parts)}")


def load_stack_config(path: str) -> StackConfig:
    data = load_yaml_file(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected the groups {', '.join(STACK_GROUPS)}")
    check_stack_layout(path, data)
    if not isinstance(data.get("lium"), dict):
        raise UserError(f"{path}: missing group 'lium' (it needs at least template_id)")
    commander = build_dataclass(CommanderGroup, data.get("commander"), f"{path}: commander")
    lium = build_dataclass(LiumGroup, data.get("lium"), f"{path}: lium")
    worker = build_dataclass(WorkerGroup, data.get("worker"), f"{path}: worker")
    relay = build_dataclass(RelayGroup, data.get("relay"), f"{path}: relay")
    run_group = data.get("run")
    if not isinstance(run_group, dict):
        raise UserError(f"{path}: missing group 'run' (run_id and mode at least)")
    for generated in ("commander_url", "worker_id", "nodes", "node_rank", "node_ip", "master_addr", "group"):
        if generated in run_group:
            raise UserError(f"{path}: run: field '{generated}' is set by launch-stack (commander.public_url, the pod's "
                            "name, lium.nodes and each node's place in its cluster)")
    if not lium.template_id and lium.nodes == 1:
        raise UserError(f"{path}: lium: field 'template_id' must not be empty")
    if not 1 <= commander.port <= 65535:
        raise UserError(f"{path}: commander: field 'port' must be from 1 to 65535")
    if commander.lease_seconds < 2:
        raise UserError(f"{path}: commander: field 'lease_seconds' must be at least 2")
    if commander.host in ("0.0.0.0", "::") and not commander.public_url:
        raise UserError(f"{path}: commander: field 'public_url' is required when host is {commander.host} "
                        "(the address pods use to reach this machine)")
    if bool(commander.tls_cert) != bool(commander.tls_key):
        raise UserError(f"{path}: commander: fields 'tls_cert' and 'tls_key' go together")
    for name in ("tls_cert", "tls_key", "tls_ca_file"):
        if getattr(commander, name) and not os.path.isfile(getattr(commander, name)):
            raise UserError(f"{path}: commander: field '{name}': no such file {getattr(commander, name)}")
    if "commander_ca_file" in run_group:
        raise UserError(f"{path}: run: field 'commander_ca_file' is set by launch-stack (commander.tls_ca_file)")
    check_notify_url(commander.notify_url, f"{path}: commander: field 'notify_url'")
    scheme = "https" if commander.tls_cert else "http"
    public_url = commander.public_url or f"{scheme}://{commander.host}:{commander.port}"
    run = validate_run_config(build_dataclass(RunConfig, dict(run_group, commander_url=public_url, worker_id="pod"),
                                              f"{path}: run"), f"{path}: run")
    if relay.max_pods < 1:
        raise UserError(f"{path}: relay: field 'max_pods' must be at least 1")
    if relay.hot_standby and not run.hf_repo:
        raise UserError(f"{path}: relay: field 'hot_standby' needs run.hf_repo: a Lium volume attaches to one pod "
                        "at a time, so a standby resumes from the Hub")
    for name in ("ready_timeout_seconds", "poll_interval_seconds", "rent_lookup_seconds"):
        if getattr(lium, name) <= 0:
            raise UserError(f"{path}: lium: field '{name}' must be a positive number of seconds")
    validate_lium_group(lium, f"{path}: lium")
    if relay.budget_usd < 0:
        raise UserError(f"{path}: relay: field 'budget_usd' must be 0 (no limit) or more")
    if lium.nodes > 1:
        validate_cluster_stack(path, lium, run, relay)
    return StackConfig(path, commander, lium, run, worker, relay)


def validate_cluster_stack(path: str, lium: LiumGroup, run: RunConfig, relay: RelayGroup) -> None:
    """What a run on a Lium cluster cannot have: a cluster has no volume and no `--budget`, and
    a lost node means a whole new cluster, which resumes from the Hub."""
    if lium.nodes > MAX_NODES:
        raise UserError(f"{path}: lium: field 'nodes' must be from 1 to {MAX_NODES}")
    if not run.hf_repo:
        raise UserError(f"{path}: run: field 'hf_repo' is required with lium.nodes {lium.nodes}: a cluster has no "
                        "volume, so a new cluster resumes from the Hub")
    if lium.volume:
        raise UserError(f"{path}: lium: field 'volume' cannot go with lium.nodes {lium.nodes}: a cluster takes no "
                        "Lium volume (its checkpoints travel through the Hub)")
    if lium.node:
        raise UserError(f"{path}: lium: field 'node' names one node; with lium.nodes {lium.nodes} set 'gpu' and "
                        "'gpu_count' (each node's), and 'fabric' if you want one")
    if relay.hot_standby:
        raise UserError(f"{path}: relay: field 'hot_standby' is for single pods: a standby cluster would double a "
                        "multi-node bill")


LIUM_TTL = re.compile(r"^\d+(\.\d+)?(m|h|d)$")  # what `lium up --ttl` accepts


def validate_lium_group(lium: LiumGroup, where: str) -> None:
    """Refuse what `lium up` would refuse (or do wrongly) before any pod is rented."""
    if lium.node and lium.executor and lium.node != lium.executor:
        raise UserError(f"{where}: fields 'node' and 'executor' (its old name) name different nodes; keep 'node'")
    lium.node = lium.node or lium.executor
    if not lium.node and not lium.gpu:
        raise UserError(f"{where}: set field 'node' (a NODE_ID from `lium ls`) or field 'gpu' (a GPU type such as "
                        "H200, with 'gpu_count')")
    if not lium.yes:
        raise UserError(f"{where}: field 'yes' must be true or left out: launch-stack runs lium without a terminal, "
                        "where `lium up` fails unless -y confirms the rent")
    if lium.node and lium.gpu:
        raise UserError(f"{where}: fields 'node' and 'gpu' exclude each other: a node is rented as it is, "
                        "'gpu' with 'gpu_count' picks the cheapest node that has them")
    if lium.gpu_count < 1:
        raise UserError(f"{where}: field 'gpu_count' must be at least 1")
    if lium.ttl and not LIUM_TTL.match(lium.ttl):
        raise UserError(f"{where}: field 'ttl' must be a number and m, h or d (45m, 6h, 2d), not {lium.ttl!r}")
    if lium.up_timeout_seconds < 1:
        raise UserError(f"{where}: field 'up_timeout_seconds' must be at least 1")
    if lium.nodes < 1:
        raise UserError(f"{where}: field 'nodes' must be at least 1")
    if lium.volume.startswith("new:"):
        raise UserError(f"{where}: field 'volume': 'new:' would create a new, empty volume for every pod, so a "
                        "replacement would not see the checkpoints; create one with `lium volumes new NAME`, then "
                        "set volume: id:HUID with the HUID `lium volumes list` shows")
    if lium.volume and not re.fullmatch(r"id:\S+", lium.volume):
        raise UserError(f"{where}: field 'volume' must be id:HUID (the HUID `lium volumes list` shows), "
                        f"not {lium.volume!r}")


###############################################################################
# 3. Protocol and auth ########################################################
###############################################################################
#
# Every request but GET /api/health carries X-Relay-Timestamp, X-Relay-Nonce and
# X-Relay-Signature = HMAC-SHA256(secret, "ts\nnonce\nMETHOD\npath?query\nsha256(body)"), and
# X-Relay-Protocol.  The secret itself never crosses the wire; a captured request cannot be
# replayed (nonce cache, 600 s) nor kept for later (300 s skew).
#
# Every answer to a request whose signature verified carries X-Relay-Response-Signature =
# HMAC-SHA256(secret, "relay-answer\nprotocol\nnonce\nstatus\nsha256(body)") with the secret
# that signed the request and the request's own nonce.  Safety argument: the relay's one
# promise (never two trainers of a run at once) rests on the worker's deadline preceding the
# commander's expiry, and on the worker stopping when told its lease is gone.  Both come from
# answers, and over plain HTTP anyone on the path can write an answer.  A client holding a
# secret therefore treats an answer whose signature is missing or does not match as no answer
# at all (CommanderUnsigned, a CommanderUnreachable): a forged 409 does not stop a trainer, a
# forged grant starts none, a forged TTL stretches no deadline.  The nonce in the MAC binds an
# answer to the one request it answers: an old answer (an earlier grant, a 409 to another
# request) replayed later does not verify.  Dropping or delaying answers stays possible, as
# it always was, and it only makes a worker give its lease up early: safe.  An authentic
# request that was replayed gets an unsigned 401, since its nonce was answered already.
# Without a shared secret (loopback, or --insecure on a private network) nothing is signed
# and answers are believed: there is no secret to tell the commander from anyone else.

PROTOCOL = 2  # requests carry it in X-Relay-Protocol, /api/health says it: old peers fail with a clear error
AUTH_MAX_SKEW_SECONDS = 300
AUTH_NONCE_TTL_SECONDS = 600
MAX_BODY_BYTES = 256 << 10  # a renewal with 50 log lines and 100 loss points is ~30 KB
MAX_ANSWER_BYTES = 64 << 20  # what a client reads of one answer (the page of many runs is a few MB)


def request_signature(secret: str, timestamp: str, nonce: str, method: str, path: str, body: bytes) -> str:
    message = f"{timestamp}\n{nonce}\n{method}\n{path}\n{hashlib.sha256(body).hexdigest()}"
    return hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()


def response_signature(secret: str, nonce: str, status: int, body: bytes) -> str:
    message = f"relay-answer\n{PROTOCOL}\n{nonce}\n{status}\n{hashlib.sha256(body).hexdigest()}"
    return hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()


def signed_headers(secret: str, method: str, path: str, body: bytes) -> dict[str, str]:
    timestamp, nonce = str(int(utc_now())), secrets.token_hex(16)
    return {
        "X-Relay-Protocol": str(PROTOCOL),
        "X-Relay-Timestamp": timestamp,
        "X-Relay-Nonce": nonce,
        "X-Relay-Signature": request_signature(secret, timestamp, nonce, method, path, body),
    }


class NonceCache:
    """Nonces of accepted requests from the last AUTH_NONCE_TTL_SECONDS; a repeat is a replay.

    Only requests with a valid signature are recorded, so an attacker without the secret
    cannot grow it.  Nonces expire in the order they arrived, so each is dropped once, from
    the front of a queue: no periodic sweep over everything seen in the last 600 s.
    """

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._arrivals: collections.deque[tuple[float, str]] = collections.deque()
        self._lock = threading.Lock()

    def first_use(self, nonce: str, now: float) -> bool:
        with self._lock:
            while self._arrivals and now - self._arrivals[0][0] >= AUTH_NONCE_TTL_SECONDS:
                self._seen.discard(self._arrivals.popleft()[1])
            if nonce in self._seen:
                return False
            self._seen.add(nonce)
            self._arrivals.append((now, nonce))
            return True


@dataclass
class Verdict:
    """What verify_request found: the role whose secret signed the request ('' if none did),
    what is wrong with it ('' if nothing), and the secret its answer is signed with ('' for
    none: an answer to a forged or replayed request is not signed)."""

    role: str
    problem: str = ""
    answer_secret: str = ""


def verify_request(keys: dict[str, str], headers: Any, method: str, path: str, body: bytes,
                   nonces: NonceCache) -> Verdict:
    """Whether the request is authentic (signed with a secret of `keys`, by role) and fresh."""
    timestamp = headers.get("X-Relay-Timestamp", "")
    nonce = headers.get("X-Relay-Nonce", "")
    signature = headers.get("X-Relay-Signature", "")
    if not (timestamp and nonce and signature):
        return Verdict("", "missing X-Relay-Timestamp, X-Relay-Nonce or X-Relay-Signature")
    if not re.fullmatch(r"[0-9a-fA-F]{16,128}", nonce):
        return Verdict("", "X-Relay-Nonce must be 16 to 128 hex characters")
    role = next((role for role, secret in keys.items() if secret and hmac.compare_digest(
        request_signature(secret, timestamp, nonce, method, path, body), signature.lower())), "")
    if not role:
        return Verdict("", "bad signature")
    try:
        skew = abs(utc_now() - int(timestamp))
    except ValueError:
        return Verdict("", "X-Relay-Timestamp must be unix seconds", keys[role])
    if skew > AUTH_MAX_SKEW_SECONDS:
        return Verdict("", f"X-Relay-Timestamp is {int(skew)} s away from the commander's clock "
                           f"(limit {AUTH_MAX_SKEW_SECONDS})", keys[role])
    if not nonces.first_use(nonce, utc_now()):
        return Verdict("", "nonce already used (replayed request)")
    return Verdict(role, "", keys[role])


class CommanderUnreachable(Exception):
    """No HTTP answer: connection refused, timeout, DNS.  The message names the URL."""


class CommanderNotTrusted(CommanderUnreachable):
    """An https:// commander whose certificate does not verify.  Callers that start talking
    to a commander turn it into a UserError (exit 2): retrying cannot fix a certificate, and
    falling back to plain HTTP would hand the run to whoever answered."""


@dataclass
class Reply:
    status: int
    body: dict


class CommanderUnsigned(CommanderUnreachable):
    """An answer without the commander's signature for our request: as good as no answer (the
    safety argument above).  `reply` is what it said, to explain a refusal at start-up only."""

    def __init__(self, message: str, reply: Reply) -> None:
        super().__init__(message)
        self.reply = reply


def tls_client_context(ca_file: str = "") -> ssl.SSLContext:
    """Verify the commander's certificate and host name against `ca_file` or the system's CAs."""
    try:
        context = ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise UserError(f"CA file {ca_file}: cannot load it: {getattr(exc, 'strerror', None) or exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


# A kept-alive connection that fails this way never reached the commander's request parser:
# the commander had closed it as idle just as the request left.  Sending once more, on a new
# connection, cannot make the commander act twice on one request.
STALE_CONNECTION_ERRORS = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                           ConnectionAbortedError)


class CommanderClient:
    """A tiny JSON client for the commander API that signs every request when a secret is set
    and then believes only answers signed for that request (CommanderUnsigned otherwise).

    Each thread keeps one connection open (HTTP keep-alive) and reuses it: a renewal costs
    one round trip instead of a TCP and TLS handshake, and the lease keeper's thread never
    waits behind another thread's slow request.  An https:// URL is verified against
    `ca_file` (else the system's CAs), never downgraded; there are no redirects.
    """

    def __init__(self, base_url: str, secret: str = "", timeout: float = 10.0, ca_file: str = "") -> None:
        self.base_url = base_url.rstrip("/")
        self.secret = secret
        self.timeout = timeout
        parts = urllib.parse.urlsplit(self.base_url)
        try:
            self._port = parts.port
        except ValueError:
            raise UserError(f"{self.base_url}: the port is not a number") from None
        self._host, self._prefix = parts.hostname or "", parts.path
        self._context = tls_client_context(ca_file) if parts.scheme == "https" else None
        self._local = threading.local()  # .connection, .idle_since, .keep_seconds

    def _connection(self, timeout: float) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection (a new one when there is none, or when the commander said
        it closes idle ones sooner than this one was idle) and whether it was used before."""
        local = self._local
        connection = getattr(local, "connection", None)
        if connection is not None and time.monotonic() - local.idle_since > local.keep_seconds - 0.5:
            connection.close()
            connection = None
        if connection is None:
            if self._context is not None:
                connection = http.client.HTTPSConnection(self._host, self._port, timeout=timeout, context=self._context)
            else:
                connection = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
            local.connection, local.keep_seconds = connection, 5.0
            return connection, False
        connection.timeout = timeout
        if connection.sock is not None:
            connection.sock.settimeout(timeout)
        return connection, True

    def _drop_connection(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None

    def request(self, method: str, path: str, payload: dict | None = None, timeout: float | None = None) -> Reply:
        body = b"" if payload is None else json.dumps(payload).encode()
        for attempt in (1, 2):
            headers = {"Content-Type": "application/json", "Accept": "application/json",
                       "X-Relay-Protocol": str(PROTOCOL)}
            if self.secret:  # signed anew for a second attempt: a nonce is used once
                headers.update(signed_headers(self.secret, method, path, body))
            connection, reused = self._connection(timeout or self.timeout)
            try:
                connection.request(method, self._prefix + path, body=body if method != "GET" else None,
                                   headers=headers)
                answer = connection.getresponse()
                data = answer.read(MAX_ANSWER_BYTES)
            except (OSError, http.client.HTTPException) as exc:
                self._drop_connection()
                if reused and attempt == 1 and isinstance(exc, STALE_CONNECTION_ERRORS):
                    continue
                raise self._unreachable(exc) from None
            if answer.will_close or not answer.isclosed():  # isclosed: a body over MAX_ANSWER_BYTES was cut
                self._drop_connection()
            else:
                keep = re.search(r"timeout=(\d+)", answer.getheader("Keep-Alive", "") or "")
                self._local.keep_seconds = float(keep.group(1)) if keep else 5.0
                self._local.idle_since = time.monotonic()
            reply = Reply(answer.status, _json_or_error(data))
            if self.secret:
                expected = response_signature(self.secret, headers["X-Relay-Nonce"], answer.status, data)
                if not hmac.compare_digest(expected, answer.getheader("X-Relay-Response-Signature", "") or ""):
                    raise CommanderUnsigned(
                        f"an answer from {self.base_url}{path} without the commander's signature was ignored (it said "
                        f"{answer.status} {str(reply.body.get('error', ''))[:200]}): the secret differs from the "
                        f"commander's, the commander is older than relay protocol {PROTOCOL}, or something on the "
                        "path wrote it", reply)
            return reply
        raise AssertionError("unreachable: the second attempt returns or raises")

    def _unreachable(self, exc: BaseException) -> CommanderUnreachable:
        if isinstance(exc, ssl.SSLError) and exc.reason == "WRONG_VERSION_NUMBER":
            return CommanderNotTrusted(f"the commander at {self.base_url} answers plain HTTP, not TLS: use an "
                                       "http:// URL, or serve it with --tls-cert/--tls-key")
        if isinstance(exc, ssl.SSLError) and not isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
            return CommanderNotTrusted(f"the commander at {self.base_url} failed the TLS check: "
                                       f"{getattr(exc, 'verify_message', '') or exc.reason or exc} "
                                       "(commander_ca_file / --ca-file names the CA that signed its certificate)")
        return CommanderUnreachable(f"cannot reach the commander at {self.base_url}: {exc or type(exc).__name__}")

    def post(self, path: str, payload: dict, timeout: float | None = None) -> Reply:
        return self.request("POST", path, payload, timeout)

    def get(self, path: str, timeout: float | None = None) -> Reply:
        return self.request("GET", path, None, timeout)


def is_relay_commander(reply: Reply) -> bool:
    """What a relay commander's GET /api/health answers (it needs no secret)."""
    return reply.status == 200 and reply.body.get("ok") is True and "version" in reply.body


class Complaint:
    """A problem said at once, then again every `every` seconds while it lasts: a worker that
    says nothing for a minute looks like one that works."""

    def __init__(self, say: Callable[[str], None], every: float = 30.0) -> None:
        self.say, self.every = say, every
        self.since: float | None = None
        self.last = -math.inf

    def still(self, text: str) -> None:
        now = boottime()
        self.since = now if self.since is None else self.since
        if now - self.last >= self.every:
            self.say(text if self.last == -math.inf else f"{text} (for {now - self.since:.0f} s now)")
            self.last = now

    def over(self, text: str) -> None:
        if self.since is not None:
            self.say(f"{text} after {boottime() - self.since:.0f} s")
        self.since, self.last = None, -math.inf


def _json_or_error(raw: bytes) -> dict:
    try:
        value = json.loads(raw or b"{}")
    except ValueError:
        return {"error": raw[:200].decode("utf-8", "replace")}
    return value if isinstance(value, dict) else {"value": value}


###############################################################################
# 4. Commander ################################################################
###############################################################################
#
# Safety argument.  A run is granted to one worker at a time; each grant increments the
# run's epoch and is written to disk before the answer leaves, so an epoch is never issued
# twice, also across restarts.  Every write (renew, report, release) must present the
# current lease token, so a holder that paused past its lease can no longer change the
# record (fencing).  Expiry is measured on the commander's monotonic clock from when it
# RECEIVED the renewal; the worker measures its own deadline from when it SENT it, minus a
# margin, on its own clock.  Only durations cross the wire, so clock offsets never matter,
# and the worker (and its watchdog) always give up before the commander re-grants.
#
# A run on N nodes (a Lium cluster) holds ONE lease: node 0's worker acquires it, naming the
# cluster (`group`); every other node's worker JOINS that epoch and renews its own membership
# with a member token, on the same TTL, with the same deadline rule and a watchdog of its own
# that kills its node's trainer processes at its deadline.  The epoch is one unit:
#   - a member that stops renewing (its node died) or leaves ends the epoch: the holder's lease
#     ends with it, and the holder learns at its next renewal (a 409) and stops its trainer;
#   - when the epoch ends for any reason (release, expiry, a member lost), every party of it
#     that did not say it stopped is FENCED: the commander grants the run again only after
#     each fenced party has left (it says so once its trainer is dead) or its commander-side
#     expiry has passed (receipt of its last renewal + TTL, after its own watchdog deadline).
# So no process of an old epoch, on any node, still runs when a new epoch starts; fenced
# parties are persisted with the record, and a restarted commander gives each a full TTL.

RUN_STATUSES = ("PENDING", "RUNNING", "PREEMPTED", "FAILED", "COMPLETED", "CANCELLED")
RELEASE_STATUSES = ("COMPLETED", "FAILED", "PREEMPTED")
ENDED_STATUSES = ("COMPLETED", "FAILED", "CANCELLED")  # no worker is granted such a run (retry reopens the last two)
STATE_FORMAT = "relay-commander-state"
MAX_EVENTS = 200
MAX_EVENT_CHARS = 1000
MAX_LEASES_KEPT = 500
MAX_LOSS_POINTS = 2000
MAX_LOSS_POINTS_PER_RENEWAL = 100
MAX_LOG_LINES = 200
STANDBY_WINDOW_SECONDS = 60.0  # a standby asks at least every 5 s (retry_after_sec)
MAX_STANDBYS_TRACKED = 16


def thin_points(points: list, limit: int) -> list:
    """Drop every other point (the newest always stays) until at most `limit` remain: a loss
    curve keeps its whole span in bounded memory, older stretches at a coarser grain."""
    while len(points) > limit:
        points = points[::-1][::2][::-1]
    return points


def standby_poll_seconds(lease_seconds: float) -> float:
    """How often a standby asks for a held run (at most; sooner when the lease is about to end)."""
    return min(5.0, max(0.2, lease_seconds / 10))


METRICS: dict[str, tuple[str, str]] = {  # name -> (type, help); per run unless it says otherwise
    "relay_run_status": ("gauge", "1 for the run's status (PENDING, RUNNING, PREEMPTED, FAILED, COMPLETED, CANCELLED), 0 for the others."),
    "relay_run_step": ("gauge", "Last training step reported."),
    "relay_run_epoch": ("gauge", "Lease epoch (grants so far)."),
    "relay_run_handoffs": ("gauge", "Leases that went to a different worker than the one before."),
    "relay_run_trainer_restarts": ("gauge", "Trainer restarts after a crash or stall, over all leases."),
    "relay_run_sync_error": ("gauge", "1 while the holder reports a failing Hub sync."),
    "relay_run_seconds_without_holder": ("gauge", "Seconds since the run last had a holder; 0 while held or finished."),
    "relay_run_lease_expires_in_seconds": ("gauge", "Seconds until the holder's lease expires (held runs only)."),
    "relay_run_seconds_since_renewal": ("gauge", "Seconds since the holder last renewed (held runs only)."),
    "relay_run_seconds_since_checkpoint": ("gauge", "Seconds since the last sealed checkpoint (or the run's creation)."),
    "relay_run_seconds_since_hub_revision": ("gauge", "Seconds since the last Hub revision was recorded."),
    "relay_commander_requests_total": ("counter", "Requests answered since the commander started, by endpoint and status."),
}
API_ENDPOINTS = ("/", "/metrics", "/api/health", "/api/runs", "/api/lease/acquire", "/api/lease/renew",
                 "/api/lease/release", "/api/lease/join", "/api/lease/member", "/api/lease/leave", "/api/job/report", "/api/runs/spend", "/api/runs/cancel", "/api/runs/retry",
                 "/api/runs/event")


def endpoint_label(path: str) -> str:
    """A request path as a metric label from a fixed set (run ids folded), so that no client
    can grow the counters without bound."""
    if path in API_ENDPOINTS:
        return path
    if path.startswith("/api/runs/"):
        return "/api/runs/{run_id}/logs" if path.endswith("/logs") else "/api/runs/{run_id}"
    return "other"


@dataclass
class Document:
    """A non-JSON answer: the page, /metrics."""

    text: str
    content_type: str


class ApiError(Exception):
    def __init__(self, status: int, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.fields = fields  # more of the answer beside "error"


@dataclass
class LeaseRecord:
    """One grant of a run to a worker, from grant to its end."""

    epoch: int
    worker_id: str
    started_at: float
    start_step: int
    ended_at: float = 0.0
    end_step: int = 0
    why: str = ""  # completed | failed | preempted | expired | reacquired


@dataclass
class PartyRecord:
    """A worker of a multi-node run's epoch besides the holder: a member that joined it, or,
    once the epoch ended, any party (the old holder too) that may still be running (fenced)."""

    worker_id: str
    node_rank: int
    token_sha256: str
    address: str = ""  # host:port of its node's checkpoint server, on the cluster's network
    joined_at: float = 0.0


@dataclass
class RunRecord:
    """Everything the commander knows about one run; persisted as JSON."""

    run_id: str
    mode: str
    status: str = "PENDING"
    holder: str = ""
    epoch: int = 0
    lease_token_sha256: str = ""
    step: int = 0
    loss: float | None = None
    worker_phase: str = ""
    latest_checkpoint: dict | None = None
    hub: dict | None = None
    sync_error: str = ""
    failed_leases: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0
    leases: list = field(default_factory=list)
    events: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    log_tail: list = field(default_factory=list)
    log_total: int = 0  # lines ever received: log_tail holds numbers log_total-len+1 .. log_total
    gpu_spend: dict | None = None  # what launch-stack last reported: spent_usd, budget_usd, pods, at
    trainer_restarts: int = 0  # over all leases: reports with status RESTARTING
    total_steps: int = 0  # what the workers' run config says (0: unknown), for "step N/total"
    nodes: int = 1  # nodes of the current epoch (the holder's `nodes`)
    group: str = ""  # the holder's cluster: only its nodes may join this epoch
    members: list = field(default_factory=list)  # PartyRecord dicts: nodes 1..N-1 of this epoch
    fenced: list = field(default_factory=list)  # PartyRecord dicts of ended epochs, maybe still running

    def snapshot(self) -> dict:
        """The record as a dict that later changes do not reach.  Lists are copied; what they
        hold is never changed once appended (events, loss points, lines), except a lease,
        which ends: those small dicts are copied too."""
        view = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("events", "losses", "log_tail"):
            view[name] = list(view[name])
        view["leases"] = [dict(lease) for lease in self.leases]
        for name in ("members", "fenced"):  # token digests stay in the record
            view[name] = [{k: v for k, v in party.items() if k != "token_sha256"} for party in view[name]]
        for name in ("latest_checkpoint", "hub", "gpu_spend"):
            view[name] = dict(view[name]) if view[name] else view[name]
        return view

    def current_lease(self) -> LeaseRecord | None:
        if self.holder and self.leases:
            return LeaseRecord(**self.leases[-1])
        return None

    def add_event(self, message: str) -> None:
        self.events.append({"at": utc_now(), "msg": message})
        del self.events[:-MAX_EVENTS]

    def end_lease(self, why: str, now: float) -> None:
        """End the epoch; its members are fenced (section 4's safety argument)."""
        lease = self.leases[-1]
        lease.update(ended_at=now, end_step=self.step, why=why)
        self.add_event(f"lease epoch {self.epoch} of {self.holder} ended: {why} at step {self.step}")
        self.fenced.extend(self.members)
        self.members = []
        self.holder = ""
        self.lease_token_sha256 = ""

    def party(self, parties: list, worker_id: str, token: str) -> dict | None:
        """The entry of `parties` that `token` proves to be `worker_id`'s."""
        return next((p for p in parties if p["worker_id"] == worker_id
                     and hmac.compare_digest(token_digest(token), p["token_sha256"])), None)


def final_model_of(run: RunRecord) -> dict | None:
    """The Hub record to name as a completed run's final model: only a revision that holds the
    final checkpoint (the run's latest) qualifies, never an older milestone."""
    hub, last = run.hub or {}, run.latest_checkpoint or {}
    if run.status != "COMPLETED" or not hub or hub.get("iteration") != last.get("iteration"):
        return None
    return hub


def final_model_words(run: RunRecord, reason: str) -> str:
    """What a completion message adds: the final model, or the worker's reason why there is none."""
    final = final_model_of(run)
    return f"; final model {final['repo']}@{final['revision']}" if final else f" ({reason or 'no reason given'})"


def token_digest(token: str) -> str:
    # Only a digest is stored: the state file alone does not let anyone act as the holder.
    return hashlib.sha256(token.encode()).hexdigest()


class Body:
    """Typed access to a JSON request body; every mistake becomes a 400 naming the field."""

    def __init__(self, raw: bytes) -> None:
        try:
            data = json.loads(raw.decode("utf-8")) if raw else None
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise ApiError(400, "body is not valid JSON") from None
        if not isinstance(data, dict):
            raise ApiError(400, "body must be a JSON object")
        self.data = data

    def str(self, name: str, required: bool = True, max_len: int = 256, pattern: re.Pattern | None = None,
            choices: tuple = ()) -> str:
        value = self.data.get(name)
        if value is None:
            if required:
                raise ApiError(400, f"missing field '{name}'")
            return ""
        if not isinstance(value, str) or len(value) > max_len:
            raise ApiError(400, f"field '{name}' must be a string of at most {max_len} characters")
        if pattern is not None and not pattern.match(value):
            raise ApiError(400, f"field '{name}' has an invalid format")
        if choices and value not in choices:
            raise ApiError(400, f"field '{name}' must be one of {', '.join(choices)}")
        return value

    def int(self, name: str, required: bool = False, maximum: int = 10**12) -> int | None:
        value = self.data.get(name)
        if value is None:
            if required:
                raise ApiError(400, f"missing field '{name}'")
            return None
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= maximum:
            raise ApiError(400, f"field '{name}' must be an integer from 0 to {maximum}")
        return value

    def number(self, name: str) -> float | None:
        value = self.data.get(name)
        if value is None:
            return None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ApiError(400, f"field '{name}' must be a number")
        return float(value) if math.isfinite(value) else None

    def obj(self, name: str) -> "Body | None":
        value = self.data.get(name)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ApiError(400, f"field '{name}' must be an object")
        nested = Body.__new__(Body)
        nested.data = value
        return nested

    def points(self, name: str, max_points: int = MAX_LOSS_POINTS_PER_RENEWAL) -> list[list] | None:
        """[[step, loss], ...] in the order printed: the loss of every step the trainer printed."""
        value = self.data.get(name)
        if value is None:
            return None
        if not isinstance(value, list) or len(value) > max_points or not all(
                isinstance(p, list) and len(p) == 2 and isinstance(p[0], int) and not isinstance(p[0], bool)
                and 0 <= p[0] <= 10**12 and isinstance(p[1], (int, float)) and not isinstance(p[1], bool)
                and math.isfinite(p[1]) for p in value):
            raise ApiError(400, f"field '{name}' must be a list of at most {max_points} [step, loss] pairs")
        return [[p[0], float(p[1])] for p in value]

    def lines(self, name: str, max_lines: int = 50, max_len: int = 500) -> list[str]:
        value = self.data.get(name)
        if value is None:
            return []
        if not isinstance(value, list) or len(value) > max_lines or not all(isinstance(x, str) for x in value):
            raise ApiError(400, f"field '{name}' must be a list of at most {max_lines} strings")
        return [x[:max_len] for x in value]


STATE_FIELD_TYPES: dict[str, tuple[type, ...]] = {  # a field's annotation -> what JSON may hold there
    "str": (str,), "int": (int,), "float": (int, float), "float | None": (int, float, type(None)),
    "dict | None": (dict, type(None)), "list": (list,)}


def checked_record(cls: type, data: Any, where: str) -> Any:
    """A state-file record whose every field has the type its annotation says (ValueError naming
    the field otherwise): a wrong type stops the commander at start, not in a request later."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} is not an object")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in data.items():
        if name not in fields:
            raise ValueError(f"{where} has an unknown field '{name}'")
        kinds = STATE_FIELD_TYPES[str(fields[name].type)]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise ValueError(f"{where}.{name} is a {type(value).__name__}, not {fields[name].type}")
    return cls(**data)


def checked_run_record(run_id: str, data: Any) -> RunRecord:
    where = f"runs.{run_id}"
    run = checked_record(RunRecord, data, where)
    if run.run_id != run_id or not RUN_ID_RE.match(run_id):
        raise ValueError(f"{where}.run_id is {run.run_id!r}")
    if run.status not in RUN_STATUSES or run.mode not in MODES:
        raise ValueError(f"{where}: status {run.status!r} or mode {run.mode!r} is not one the commander knows")
    for i, lease in enumerate(run.leases):
        checked_record(LeaseRecord, lease, f"{where}.leases[{i}]")
    for name in ("members", "fenced"):
        for i, party in enumerate(getattr(run, name)):
            checked_record(PartyRecord, party, f"{where}.{name}[{i}]")
    if not all(isinstance(e, dict) and isinstance(e.get("at"), (int, float)) and isinstance(e.get("msg"), str)
               for e in run.events):
        raise ValueError(f"{where}.events must be a list of {{at, msg}}")
    if not all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, (int, float)) for x in p) for p in run.losses):
        raise ValueError(f"{where}.losses must be a list of [step, loss]")
    if not all(isinstance(line, str) for line in run.log_tail):
        raise ValueError(f"{where}.log_tail must be a list of strings")
    if run.holder and not run.leases:
        raise ValueError(f"{where} has a holder but no lease")
    return run


class StateStore:
    """The commander's JSON state file: atomic, durable, 0600, exclusive to one commander."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        folder = os.path.dirname(self.path)
        try:
            os.makedirs(folder, exist_ok=True)
            self._lock_handle = open(self.path + ".lock", "a")  # noqa: SIM115 (held for the process's life)
            os.chmod(self.path + ".lock", 0o600)
        except OSError as exc:
            raise UserError(f"state path {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(self._lock_handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"state file {self.path} is in use by another commander; stop it first") from None

    def load(self) -> dict[str, RunRecord]:
        if not os.path.exists(self.path):
            return {}
        try:
            with open(self.path, encoding="utf-8") as handle:
                data = json.load(handle)
            if data.get("format") != STATE_FORMAT or not isinstance(data.get("runs"), dict):
                raise ValueError("not a relay commander state file")
            return {run_id: checked_run_record(run_id, record) for run_id, record in data["runs"].items()}
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise UserError(f"state file {self.path} is corrupt ({exc}); refusing to start. "
                            "Restore it from a backup or move it away to start empty.") from None

    def save(self, runs: dict[str, RunRecord]) -> None:
        state = {"format": STATE_FORMAT, "version": 1, "saved_at": utc_now(),
                 "runs": {run_id: dataclasses.asdict(run) for run_id, run in runs.items()}}
        atomic_write(self.path, json.dumps(state, indent=1, sort_keys=True).encode())


NOTIFY_QUEUE_SIZE = 200
NOTIFY_ATTEMPTS = 5
NOTIFY_TIMEOUT_SECONDS = 10.0
NOTIFY_NO_HOLDER_SECONDS = 600.0


def check_notify_url(url: str, where: str) -> str:
    # The URL is a secret (whoever has a Slack or Discord webhook URL can post): never echoed.
    if not url:
        return url
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"{where} must be an http:// or https:// URL")
    return url


class Notifier:
    """Sends one JSON message per event to a webhook (Slack, Discord, ntfy-style: anything
    that takes a POST), from a bounded queue on its own thread.

    Callers only append to the queue (microseconds, also under the commander's lock), so a
    slow, hanging or failing receiver never delays a lease answer; when the receiver falls
    so far behind that the queue is full, the oldest message goes and the log says how many.
    Each message is tried NOTIFY_ATTEMPTS times with a doubling pause.  The URL is a secret
    and never appears in a log line.  Disabled (every call a no-op) without a URL.
    """

    def __init__(self, url: str, source: str) -> None:
        self.url = url
        self.source = source  # "commander" or "launch-stack": in each message and log line
        self._queue: collections.deque[dict] = collections.deque(maxlen=NOTIFY_QUEUE_SIZE)
        self._changed = threading.Condition()
        self._sending = False
        self._dropped = 0
        if url:
            threading.Thread(target=self._run, name="notifier", daemon=True).start()

    def notify(self, event: str, text: str, run_id: str = "", **fields: Any) -> None:
        """Queue one message: `text` and `content` (what Slack and Discord show) and the fields."""
        if not self.url:
            return
        message = {"event": event, "run_id": run_id, "text": text, "content": text, "source": self.source,
                   "at": iso(utc_now()), **fields}
        with self._changed:
            if len(self._queue) == NOTIFY_QUEUE_SIZE:
                self._dropped += 1
            self._queue.append(message)
            self._changed.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait until every queued message was delivered or given up on; False at the timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._queue and not self._sending, timeout)

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._queue)
                message = self._queue.popleft()
                self._sending, dropped, self._dropped = True, self._dropped, 0
            if dropped:
                log(self.source, f"{dropped} notifications dropped: the receiver is too slow")
            self._deliver(message)
            with self._changed:
                self._sending = False
                self._changed.notify_all()

    def _deliver(self, message: dict) -> None:
        body = json.dumps(message).encode()
        request = urllib.request.Request(self.url, data=body, method="POST", headers={
            "Content-Type": "application/json", "User-Agent": f"relay-trainer/{VERSION}"})
        problem = ""
        for attempt in range(1, NOTIFY_ATTEMPTS + 1):
            try:
                with urllib.request.urlopen(request, timeout=NOTIFY_TIMEOUT_SECONDS) as answer:
                    answer.read()
                return
            except urllib.error.HTTPError as exc:
                problem = f"the receiver answered {exc.code}"
                if exc.code < 500 and exc.code != 429:
                    break  # the receiver refuses this message: asking again changes nothing
            except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
                reason = getattr(exc, "reason", exc)  # never str(exc) of a URLError: no URL in logs
                problem = f"no answer within {NOTIFY_TIMEOUT_SECONDS:g} s" if isinstance(reason, TimeoutError) else (
                    f"cannot reach the receiver: {type(reason).__name__} {getattr(reason, 'strerror', '') or ''}".rstrip())
            if attempt < NOTIFY_ATTEMPTS:
                time.sleep(min(30.0, 2.0 ** (attempt - 1)))
        log(self.source, f"notification '{message['event']}' for run '{message['run_id']}' not delivered: {problem}")


class Commander:
    """Leases, epochs and run records.  All methods are called under one lock."""

    def __init__(self, store: StateStore, lease_seconds: float, max_failed_leases: int = 3,
                 clock: Callable[[], float] = time.monotonic, notifier: Notifier | None = None,
                 no_holder_seconds: float = NOTIFY_NO_HOLDER_SECONDS) -> None:
        self.clock = clock  # seconds; tests drive leases through expiry with a virtual clock
        self.store = store
        self.notifier = notifier or Notifier("", "commander")
        self.no_holder_seconds = no_holder_seconds
        self.lease_seconds = lease_seconds
        self.max_failed_leases = max_failed_leases
        self.lock = threading.Lock()
        self.runs = store.load()
        # Runs whose holderless stretch was notified already.  After a restart (launch-stack
        # revives its commander) a stretch already past the threshold was told before.
        wall = utc_now()
        self.told_no_holder: set[str] = {run_id for run_id, run in self.runs.items()
                                         if self.seconds_without_holder(run, wall) > no_holder_seconds}
        # A restarted commander cannot know how long its holders went without renewing, so
        # every lease gets a full TTL from now: a live holder renews, a dead one expires.
        self.expires: dict[str, float] = {}
        # The same for the other parties of multi-node epochs: members, and fenced parties of
        # ended epochs (run -> worker -> clock() of their expiry); after a restart, a full TTL.
        self.party_expires: dict[str, dict[str, float]] = {}
        # Who asked for each run lately while another held it (run -> worker -> clock()), in
        # memory only: launch-stack tells a standing-by worker from a dead one by it.
        self.standbys: dict[str, dict[str, float]] = {}
        # Answers by endpoint and status, for /metrics; counted on the handlers' threads.
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()
        self.requests_lock = threading.Lock()
        now = self.clock()
        self.started = now
        for run in self.runs.values():
            if run.holder:
                self.expires[run.run_id] = now + lease_seconds
                run.add_event(f"commander restarted; lease of {run.holder} (epoch {run.epoch}) kept for a full TTL")
            if run.members or run.fenced:
                self.party_expires[run.run_id] = {p["worker_id"]: now + lease_seconds for p in run.members + run.fenced}

    # -- persistence --------------------------------------------------------------------

    @contextlib.contextmanager
    def durable_change(self, run_id: str):
        """Apply a change to the records and write it to disk before the caller answers.

        When the write fails (disk full, read-only), the in-memory records are put back as
        they were and the client gets a 503: nothing is acknowledged that is not on disk.
        """
        before = copy.deepcopy(self.runs.get(run_id))
        expires_before = self.expires.get(run_id)
        parties_before = dict(self.party_expires.get(run_id, {}))
        yield
        try:
            self.store.save(self.runs)
        except OSError as exc:
            if before is None:
                self.runs.pop(run_id, None)
            else:
                self.runs[run_id] = before
            if expires_before is None:
                self.expires.pop(run_id, None)
            else:
                self.expires[run_id] = expires_before
            self.party_expires[run_id] = parties_before
            raise ApiError(503, f"commander cannot write its state file: {exc.strerror}") from None

    # -- lease lifecycle -------------------------------------------------------------------

    def _expire_if_due(self, run: RunRecord, now: float) -> None:
        parties = self.party_expires.get(run.run_id, {})
        if run.holder and self.expires.get(run.run_id, 0.0) <= now:
            with self.durable_change(run.run_id):
                run.end_lease("expired", utc_now())
                run.status = "CANCELLED" if run.status == "CANCELLED" else "PREEMPTED"
                self.expires.pop(run.run_id, None)
        elif run.holder:
            lost = next((m for m in run.members if parties.get(m["worker_id"], 0.0) <= now), None)
            if lost is not None:
                self._end_epoch_without(run, lost, "stopped renewing")
        stale = [p for p in run.fenced if parties.get(p["worker_id"], 0.0) <= now]
        if stale:
            with self.durable_change(run.run_id):
                for party in stale:
                    self._unfence(run, party)

    def _end_epoch_without(self, run: RunRecord, member: dict, why: str) -> None:
        """A member is gone: the epoch ends for every node.  The holder, still running until
        it hears of it (its next renewal) or its deadline passes, is fenced with its expiry."""
        parties = self.party_expires.setdefault(run.run_id, {})
        with self.durable_change(run.run_id):
            run.members.remove(member)
            parties.pop(member["worker_id"], None)
            run.fenced.append(dataclasses.asdict(PartyRecord(run.holder, 0, run.lease_token_sha256)))
            parties[run.holder] = self.expires.pop(run.run_id, self.clock() + self.lease_seconds)
            run.end_lease(f"member {member['worker_id']} (node {member['node_rank']}) {why}", utc_now())
            run.status = "CANCELLED" if run.status == "CANCELLED" else "PREEMPTED"

    def _unfence(self, run: RunRecord, party: dict) -> None:
        """A fenced party stopped (it said so) or expired: it no longer holds back a grant."""
        run.fenced.remove(party)
        self.party_expires.get(run.run_id, {}).pop(party["worker_id"], None)

    def expire_due_leases(self) -> None:
        with self.lock:
            now = self.clock()
            for run in list(self.runs.values()):
                with contextlib.suppress(ApiError):
                    self._expire_if_due(run, now)

    def _run(self, run_id: str) -> RunRecord:
        run = self.runs.get(run_id)
        if run is None:
            raise ApiError(404, f"unknown run '{run_id}'")
        return run

    def _holder_run(self, run_id: str, token: str, worker_id: str | None = None) -> RunRecord:
        """The run, if `token` is its live lease (else 409: stale epoch or expired lease)."""
        run = self._run(run_id)
        self._expire_if_due(run, self.clock())
        if not run.holder or not hmac.compare_digest(token_digest(token), run.lease_token_sha256):
            raise ApiError(409, "lease is not held by this token (expired, released or taken over)")
        if worker_id is not None and worker_id != run.holder:
            raise ApiError(409, f"lease is held by '{run.holder}', not '{worker_id}'")
        return run

    def retry_after(self, run: RunRecord, now: float) -> float:
        # Standbys poll fast enough to take over "at once" after a release, and never later
        # than a hair after the current lease expires.
        base = standby_poll_seconds(self.lease_seconds)
        remaining = self.expires.get(run.run_id, now) - now
        return round(max(0.05, min(base, remaining + 0.05)), 3)

    def note_standby(self, run_id: str, worker_id: str, now: float) -> None:
        seen = self.standbys.setdefault(run_id, {})
        seen[worker_id] = now
        for stale in [w for w, at in seen.items() if now - at > STANDBY_WINDOW_SECONDS]:
            del seen[stale]
        if len(seen) > MAX_STANDBYS_TRACKED:  # bounded, whatever worker ids a client invents
            del seen[min(seen, key=seen.__getitem__)]

    def acquire(self, body: Body) -> dict:
        run_id = body.str("run_id", pattern=RUN_ID_RE)
        worker_id = body.str("worker_id", pattern=WORKER_ID_RE)
        mode = body.str("mode", choices=MODES)
        previous = body.str("previous_lease_token", required=False, max_len=128)
        total_steps = body.int("total_steps")
        nodes = body.int("nodes", maximum=MAX_NODES) or 1
        group = body.str("group", required=nodes > 1, pattern=WORKER_ID_RE)
        now = self.clock()
        run = self.runs.get(run_id)
        if run is not None and run.mode != mode:
            raise ApiError(409, f"run '{run_id}' is a {run.mode} run, this worker is configured for {mode}")
        if run is not None and run.status in ENDED_STATUSES:
            return {"status": run.status.lower(), "run_id": run_id}
        if run is not None:
            self._expire_if_due(run, now)
            own = run.party(run.fenced, worker_id, previous) if previous else None
            if own is not None:  # the holder of an epoch a member ended: its trainer is stopped
                with self.durable_change(run_id):
                    self._unfence(run, own)
        if run is not None and run.holder:
            # The holder itself may come back with its old token after its own deadline
            # passed (its trainer already stopped): it may start a new epoch at once.
            if previous and run.holder == worker_id and hmac.compare_digest(token_digest(previous), run.lease_token_sha256):
                with self.durable_change(run_id):
                    run.end_lease("reacquired", utc_now())
            else:
                self.note_standby(run_id, worker_id, now)
                # The recorded Hub revision: what a standby prefetches to take over from its own disk.
                return {"status": "denied", "holder": run.holder, "epoch": run.epoch,
                        "retry_after_sec": self.retry_after(run, now), **({"hub": dict(run.hub)} if run.hub else {})}
        if run is not None and run.fenced:  # nodes of the last epoch may still run: not yet
            self.note_standby(run_id, worker_id, now)
            waits = [self.party_expires.get(run_id, {}).get(p["worker_id"], now) - now for p in run.fenced]
            return {"status": "denied", "holder": "", "epoch": run.epoch,
                    "waiting_for": sorted(p["worker_id"] for p in run.fenced),
                    "retry_after_sec": round(max(0.05, min(standby_poll_seconds(self.lease_seconds), min(waits) + 0.05)), 3)}
        token = secrets.token_urlsafe(24)
        previous_holder = run.leases[-1]["worker_id"] if run is not None and run.leases else ""
        with self.durable_change(run_id):
            if run is None:
                run = self.runs[run_id] = RunRecord(run_id=run_id, mode=mode, created_at=utc_now())
                run.add_event(f"run created by {worker_id} ({mode})")
            run.epoch += 1
            run.total_steps = total_steps or run.total_steps
            run.nodes, run.group = nodes, group
            run.holder = worker_id
            run.lease_token_sha256 = token_digest(token)
            run.status = "RUNNING"
            run.updated_at = utc_now()
            run.worker_phase = "RESTORING"
            run.leases.append(dataclasses.asdict(LeaseRecord(run.epoch, worker_id, utc_now(), run.step)))
            del run.leases[:-MAX_LEASES_KEPT]
            run.add_event(f"lease epoch {run.epoch} granted to {worker_id}")
            self.expires[run_id] = now + self.lease_seconds
        self.standbys.get(run_id, {}).pop(worker_id, None)
        self.told_no_holder.discard(run_id)
        if previous_holder and previous_holder != worker_id:
            self.notify_handoff(run, previous_holder)
        return {"status": "granted", "lease_token": token, "epoch": run.epoch,
                "lease_expires_in_sec": self.lease_seconds, "checkpoint": self.checkpoint_record(run)}

    @staticmethod
    def checkpoint_record(run: RunRecord) -> dict | None:
        """Where the run stands, for a worker about to restore: the last sealed checkpoint and
        the recorded Hub revision."""
        checkpoint = dict(run.latest_checkpoint) if run.latest_checkpoint else None
        if run.hub:
            checkpoint = dict(checkpoint or {}, hub=dict(run.hub))
        return checkpoint

    def renew(self, body: Body) -> dict:
        run_id = body.str("run_id", pattern=RUN_ID_RE)
        worker_id = body.str("worker_id", pattern=WORKER_ID_RE)
        token = body.str("lease_token", max_len=128)
        step = body.int("step")
        loss = body.number("loss")
        phase = body.str("phase", required=False, max_len=32)
        lines = body.lines("log_lines")
        losses = body.points("losses")
        run = self._holder_run(run_id, token, worker_id)
        # Renewals stay in memory (they are frequent and the TTL restarts on a commander
        # restart anyway); grants, releases and checkpoint reports go to disk.
        self.expires[run_id] = self.clock() + self.lease_seconds
        run.updated_at = utc_now()
        self._record_progress(run, step, loss, phase, lines, losses)
        # A cancelled run's holder is told on its renewal: it stops its trainer gracefully,
        # seals, uploads and releases, keeping its lease meanwhile (its watchdog must not kill).
        cancel = {"cancel": True} if run.status == "CANCELLED" else {}
        # A multi-node holder learns its members here: where to gather their checkpoint shards.
        members = {"members": [{k: m[k] for k in ("worker_id", "node_rank", "address")} for m in run.members]} \
            if run.nodes > 1 else {}
        return {"ok": True, "epoch": run.epoch, "lease_expires_in_sec": self.lease_seconds, **cancel, **members}

    # -- the other nodes of a multi-node run (section 4's safety argument) -------------------

    def join(self, body: Body) -> dict:
        """A node k > 0 joins the current epoch of its cluster's holder."""
        run_id = body.str("run_id", pattern=RUN_ID_RE)
        worker_id = body.str("worker_id", pattern=WORKER_ID_RE)
        group = body.str("group", pattern=WORKER_ID_RE)
        node_rank = body.int("node_rank", required=True, maximum=MAX_NODES - 1) or 0
        address = body.str("address", max_len=256, pattern=NODE_ADDRESS_RE)
        previous = body.str("previous_member_token", required=False, max_len=128)
        now = self.clock()
        run = self.runs.get(run_id)
        if run is not None and run.status in ENDED_STATUSES:
            return {"status": run.status.lower(), "run_id": run_id}
        if run is not None:
            self._expire_if_due(run, now)
            own = run.party(run.fenced, worker_id, previous) if previous else None
            if own is not None:  # a member of an ended epoch whose trainer is stopped
                with self.durable_change(run_id):
                    self._unfence(run, own)
        if run is None or not run.holder or run.group != group:
            if run is not None:  # heard, as a standby is: launch-stack tells a waiting node from a dead one
                self.note_standby(run_id, worker_id, now)
            return {"status": "waiting", "holder": run.holder if run else "",
                    "retry_after_sec": standby_poll_seconds(self.lease_seconds)}
        if not 1 <= node_rank < run.nodes:
            raise ApiError(409, f"node rank {node_rank} is not one of nodes 1..{run.nodes - 1} of run '{run_id}'")
        taken = next((m for m in run.members if m["node_rank"] == node_rank and m["worker_id"] != worker_id), None)
        if taken is not None:
            raise ApiError(409, f"node {node_rank} of this epoch is {taken['worker_id']}, not '{worker_id}'")
        token = secrets.token_urlsafe(24)
        with self.durable_change(run_id):
            run.members = [m for m in run.members if m["worker_id"] != worker_id]
            run.members.append(dataclasses.asdict(PartyRecord(worker_id, node_rank, token_digest(token), address,
                                                              utc_now())))
            self.party_expires.setdefault(run_id, {})[worker_id] = now + self.lease_seconds
            run.add_event(f"{worker_id} joined epoch {run.epoch} as node {node_rank}")
        return {"status": "joined", "member_token": token, "epoch": run.epoch, "holder": run.holder,
                "lease_expires_in_sec": self.lease_seconds, "checkpoint": self.checkpoint_record(run)}

    def member_renew(self, body: Body) -> dict:
        run_id = body.str("run_id", pattern=RUN_ID_RE)
        worker_id = body.str("worker_id", pattern=WORKER_ID_RE)
        token = body.str("member_token", max_len=128)
        run = self._run(run_id)
        self._expire_if_due(run, self.clock())
        if run.party(run.members, worker_id, token) is None:
            raise ApiError(409, "this node's epoch has ended", run_status=run.status)
        self.party_expires.setdefault(run_id, {})[worker_id] = self.clock() + self.lease_seconds
        return {"ok": True, "epoch": run.epoch, "lease_expires_in_sec": self.lease_seconds,
                "sealed_iteration": (run.latest_checkpoint or {}).get("iteration", -1)}

    def leave(self, body: Body) -> dict:
        """A member says its trainer is stopped: in a live epoch that ends the epoch (a node
        cannot leave a running job); in an ended one, it no longer holds back the next grant."""
        run_id = body.str("run_id", pattern=RUN_ID_RE)
        worker_id = body.str("worker_id", pattern=WORKER_ID_RE)
        token = body.str("member_token", max_len=128)
        reason = body.str("reason", required=False, max_len=500)
        run = self._run(run_id)
        self._expire_if_due(run, self.clock())
        member = run.party(run.members, worker_id, token)
        if member is not None:
            self._end_epoch_without(run, member, f"left: {reason or 'no reason given'}")
            return {"ok": True, "status": run.status}
        fenced = run.party(run.fenced, worker_id, token)
        if fenced is None:
            raise ApiError(409, "no epoch of this run knows this member token", run_status=run.status)
        with self.durable_change(run_id):
            self._unfence(run, fenced)
        return {"ok": True, "status": run.status}

    def _record_progress(self, run: RunRecord, step: int | None, loss: float | None, phase: str,
                         lines: list[str], losses: list[list] | None = None) -> None:
        if step is not None and step >= run.step:
            run.step = step
            if losses is None and loss is not None:  # a worker that sends no per-step losses: one point
                losses = [[step, loss]]
        # Steps redone after a handoff (from the restored checkpoint on) are not drawn twice.
        for point in losses or []:
            if not run.losses or point[0] > run.losses[-1][0]:
                run.losses.append(point)
        run.losses = thin_points(run.losses, MAX_LOSS_POINTS)
        if loss is not None:
            run.loss = loss
        if phase:
            run.worker_phase = phase
        if lines:
            run.log_tail.extend(lines)
            run.log_total += len(lines)
            del run.log_tail[:-MAX_LOG_LINES]

    def release(self, body: Body) -> dict:
        run_id = body.str("run_id", pattern=RUN_ID_RE)
        worker_id = body.str("worker_id", pattern=WORKER_ID_RE)
        token = body.str("lease_token", max_len=128)
        status = body.str("status", choices=RELEASE_STATUSES)
        reason = body.str("reason", required=False, max_len=500)
        step = body.int("step")
        loss = body.number("loss")
        lines = body.lines("log_lines")
        losses = body.points("losses")
        checkpoint = self._checkpoint_from(body.obj("latest_ckpt"))
        run = self._holder_run(run_id, token, worker_id)
        with self.durable_change(run_id):
            # The trainer's last lines and step ride on the release, so a finished run's
            # log ends with its final line instead of losing what came after the last renewal;
            # so does a sealed checkpoint whose report went unanswered.
            self._record_progress(run, step, loss, "", lines, losses)
            self._record_checkpoint(run, checkpoint)
            lease = run.current_lease()
            progressed = lease is not None and run.step > lease.start_step
            run.end_lease(status.lower() + (f": {reason}" if reason else ""), utc_now())
            self.expires.pop(run_id, None)
            run.updated_at = utc_now()
            if status == "COMPLETED":
                run.status = "COMPLETED"
                run.worker_phase = "DONE"
                run.add_event(f"run completed at step {run.step}{final_model_words(run, reason)}")
            elif status == "FAILED" and run.status != "CANCELLED":
                run.failed_leases = 1 if progressed else run.failed_leases + 1
                if run.failed_leases >= self.max_failed_leases:
                    run.status = "FAILED"
                    run.add_event(f"run failed: {run.failed_leases} consecutive leases ended FAILED without progress")
                else:
                    run.status = "PENDING"
            elif run.status != "CANCELLED":  # a cancelled run stays so when its holder hands it back
                run.status = "PREEMPTED"
        if run.status == "COMPLETED":
            final = final_model_of(run) or {}
            self.notifier.notify("completed", f"relay run {run_id} COMPLETED at step {run.step}"
                                 f"{final_model_words(run, reason)}", run_id, step=run.step,
                                 hub_repo=final.get("repo", ""), hub_revision=final.get("revision", ""))
        elif run.status == "FAILED":
            self.notifier.notify("failed", f"relay run {run_id} FAILED at step {run.step}: {reason or 'no reason given'} "
                                 f"({run.failed_leases} leases in a row ended FAILED without progress)", run_id,
                                 step=run.step, reason=reason, worker_id=worker_id)
        return {"ok": True, "status": run.status}

    def report(self, body: Body) -> dict:
        run_id = body.str("run_id", pattern=RUN_ID_RE)
        token = body.str("lease_token", max_len=128)
        step = body.int("step")
        phase = body.str("status", required=False, max_len=32)
        msg = body.str("msg", required=False, max_len=1000)
        checkpoint = self._checkpoint_from(body.obj("latest_ckpt"))
        hub = self._hub_from(body.obj("hf"))
        sync_error = body.str("sync_error", required=False, max_len=1000) if "sync_error" in body.data else None
        run = self._holder_run(run_id, token)
        was_failing = bool(run.sync_error)
        with self.durable_change(run_id):
            self._record_progress(run, step, body.number("loss"), phase, [], losses=[])  # points come with renewals
            run.updated_at = utc_now()
            if phase == "RESTARTING":
                run.trainer_restarts += 1
            self._record_checkpoint(run, checkpoint)
            if hub is not None and hub["iteration"] >= (run.hub or {}).get("iteration", -1):
                run.hub = dict(hub, epoch=run.epoch, at=utc_now())
                run.add_event(f"checkpoint {hub['iteration']} on the Hub: {hub['repo']}@{hub['revision'][:12]}")
            if sync_error is not None:
                if sync_error and sync_error != run.sync_error:
                    run.add_event(f"hub sync failing: {sync_error}")
                run.sync_error = sync_error
            if msg:
                run.add_event(msg)
        if sync_error and not was_failing:
            self.notifier.notify("sync_error", f"relay run {run_id}: Hub sync failing: {sync_error}", run_id,
                                 error=sync_error, worker_id=run.holder)
        elif sync_error == "" and was_failing:
            self.notifier.notify("sync_recovered", f"relay run {run_id}: Hub sync works again", run_id,
                                 worker_id=run.holder)
        return {"ok": True, "epoch": run.epoch}

    def cancel(self, body: Body) -> dict:
        """End a run by the user's word: no worker is granted it again (until a retry); its
        holder, told on its next renewal, stops gracefully and hands it back."""
        run = self._run(body.str("run_id", pattern=RUN_ID_RE))
        if run.status == "COMPLETED":
            raise ApiError(409, f"run '{run.run_id}' is COMPLETED: there is nothing to cancel")
        if run.status != "CANCELLED":
            with self.durable_change(run.run_id):
                run.status = "CANCELLED"
                run.updated_at = utc_now()
                run.add_event(f"cancelled at step {run.step}" + (f"; {run.holder} stops its trainer, seals, uploads "
                                                                  "and hands the run back" if run.holder else ""))
            self.notifier.notify("cancelled", f"relay run {run.run_id} CANCELLED at step {run.step}", run.run_id,
                                 step=run.step, holder=run.holder)
        return {"ok": True, "status": run.status, "holder": run.holder}

    def retry(self, body: Body) -> dict:
        """A FAILED or CANCELLED run back to PENDING, with its epochs, lease history and
        checkpoints: the next worker resumes from its latest checkpoint."""
        run = self._run(body.str("run_id", pattern=RUN_ID_RE))
        if run.status not in ("FAILED", "CANCELLED"):
            raise ApiError(409, f"run '{run.run_id}' is {run.status}: only a FAILED or CANCELLED run is retried")
        if run.holder:
            raise ApiError(409, f"run '{run.run_id}' is still held by {run.holder}, which is stopping: retry once it "
                                "has handed the run back")
        with self.durable_change(run.run_id):
            before, run.status, run.failed_leases = run.status, "PENDING", 0
            run.updated_at = utc_now()
            resume = (run.latest_checkpoint or {}).get("iteration")
            run.add_event(f"retried ({before} -> PENDING) at step {run.step}; the next worker resumes from "
                          + (f"checkpoint {resume}" if resume is not None else "a cold start"))
        return {"ok": True, "status": run.status}

    def notify_handoff(self, run: RunRecord, previous_holder: str) -> None:
        """The run went to another worker: it resumes from the recorded checkpoint, so the steps
        the previous holder made after it are done again."""
        restored = (run.latest_checkpoint or {}).get("iteration")
        lost = max(0, run.step - (restored or 0))
        self.notifier.notify("handoff", f"relay run {run.run_id}: handoff from {previous_holder} to {run.holder} at step "
                             f"{run.step} (epoch {run.epoch}); resumes from "
                             f"{f'checkpoint {restored}' if restored is not None else 'a cold start'}, {lost} steps lost",
                             run.run_id, from_worker=previous_holder, to_worker=run.holder, step=run.step,
                             epoch=run.epoch, restored_checkpoint=restored, steps_lost=lost)

    def notify_runs_without_holder(self) -> None:
        """Once per holderless stretch longer than no_holder_seconds (the lease reaper calls it)."""
        if not self.notifier.url:
            return  # nobody to tell: the reaper need not take the lock for it
        with self.lock:
            wall = utc_now()
            for run_id, run in self.runs.items():
                seconds = self.seconds_without_holder(run, wall)
                if seconds > self.no_holder_seconds and run_id not in self.told_no_holder:
                    self.told_no_holder.add(run_id)
                    self.notifier.notify("no_holder", f"relay run {run_id} has had no worker holding it for "
                                         f"{age_text(seconds)} (status {run.status}, step {run.step})", run_id,
                                         seconds=round(seconds), step=run.step, status=run.status)

    @staticmethod
    def _record_checkpoint(run: RunRecord, checkpoint: dict | None) -> None:
        """The holder's sealed checkpoint becomes the run's latest, if it is newer."""
        if checkpoint is not None and checkpoint["iteration"] > (run.latest_checkpoint or {}).get("iteration", -1):
            run.latest_checkpoint = dict(checkpoint, epoch=run.epoch, worker_id=run.holder, at=utc_now())
            run.add_event(f"checkpoint {checkpoint['iteration']} sealed by {run.holder} (epoch {run.epoch})")

    def record_spend(self, body: Body) -> dict:
        """launch-stack's GPU spend for the run (Lium's estimate), shown by status and the page."""
        run_id = body.str("run_id", pattern=RUN_ID_RE)
        spend = {name: body.number(name) or 0.0 for name in ("spent_usd", "budget_usd")}
        if min(spend.values()) < 0:
            raise ApiError(400, "spent_usd and budget_usd must not be negative")
        run = self._run(run_id)
        with self.durable_change(run_id):
            # supervisor_pid: the supervisor's heartbeat (0: it stopped), so `status` can say whether one runs
            run.gpu_spend = dict(spend, pods=body.int("pods") or 0, supervisor_pid=body.int("supervisor_pid") or 0,
                                 at=utc_now())
        return {"ok": True}

    def record_event(self, body: Body) -> dict:
        """launch-stack's word in the run's events (a pod it removed and how its worker log ended),
        or a worker's without a lease (`source`: a member's setup time)."""
        run_id = body.str("run_id", pattern=RUN_ID_RE)
        message = body.str("msg", max_len=MAX_EVENT_CHARS)
        source = body.str("source", required=False, pattern=WORKER_ID_RE) or "launch-stack"
        run = self._run(run_id)
        with self.durable_change(run_id):
            run.add_event(f"{source}: {message}")
        return {"ok": True}

    @staticmethod
    def _checkpoint_from(obj: Body | None) -> dict | None:
        if obj is None:
            return None
        return {"iteration": obj.int("iteration", required=True),
                "manifest_sha256": obj.str("manifest_sha256", pattern=re.compile(r"[0-9a-f]{64}\Z")),
                "bytes": obj.int("bytes") or 0, "files": obj.int("files") or 0}

    @staticmethod
    def _hub_from(obj: Body | None) -> dict | None:
        if obj is None:
            return None
        return {"repo": obj.str("repo", pattern=HF_REPO_RE), "revision": obj.str("revision", pattern=SHA1_RE),
                "iteration": obj.int("iteration", required=True),
                "manifest_sha256": obj.str("manifest_sha256", pattern=re.compile(r"[0-9a-f]{64}\Z"))}

    # -- views ---------------------------------------------------------------------------

    def run_view(self, run: RunRecord, now: float) -> dict:
        """Under the lock, so cheap (copies of lists, not of what is in them); the caller turns
        it into JSON or a page after letting go of the lock."""
        view = run.snapshot()
        del view["lease_token_sha256"]
        lease = run.current_lease()
        view["lease_expires_in_sec"] = round(self.expires[run.run_id] - now, 2) if run.holder else None
        view["lease_age_sec"] = round(utc_now() - lease.started_at, 1) if lease else None
        # Standbys: workers that asked for this run in the last `standby_window_sec` seconds
        # (shorter than STANDBY_WINDOW_SECONDS just after a commander start: it saw no more).
        view["standbys"] = [{"worker_id": worker, "seen_sec_ago": round(now - at, 1)}
                            for worker, at in sorted(self.standbys.get(run.run_id, {}).items())
                            if now - at <= STANDBY_WINDOW_SECONDS and worker != run.holder]
        view["standby_window_sec"] = round(min(now - self.started, STANDBY_WINDOW_SECONDS), 1)
        view["final_model"] = final_model_of(run)
        return view

    def runs_view(self) -> dict:
        now = self.clock()
        return {"runs": [self.run_view(run, now) for _, run in sorted(self.runs.items())],
                "lease_seconds": self.lease_seconds}

    def logs_view(self, run: RunRecord, query: dict[str, list[str]]) -> dict:
        """Trainer lines numbered from 1, those after `?after=N` (what `logs --follow` asks)."""
        try:
            after = int(query.get("after", ["0"])[0])
        except ValueError:
            raise ApiError(400, "after must be an integer") from None
        first = run.log_total - len(run.log_tail) + 1
        lines = [{"n": first + i, "line": line} for i, line in enumerate(run.log_tail) if first + i > after]
        return {"run_id": run.run_id, "status": run.status, "holder": run.holder, "lines": lines,
                "next": run.log_total, "dropped": max(0, first - 1 - after)}

    def count_request(self, path: str, status: int) -> None:
        with self.requests_lock:
            self.requests[(endpoint_label(path), status)] += 1

    def metrics_series(self) -> dict[str, list[tuple[str, float]]]:
        """Every run's health, as numbers: under the lock (format_metrics writes the text after)."""
        now, wall = self.clock(), utc_now()
        series: dict[str, list[tuple[str, float]]] = {name: [] for name in METRICS}
        for run_id, run in sorted(self.runs.items()):
            label = f'run_id="{run_id}"'  # RUN_ID_RE admits no character that needs escaping
            for status in RUN_STATUSES:
                series["relay_run_status"].append((f'{label},status="{status}"', float(run.status == status)))
            series["relay_run_step"].append((label, run.step))
            series["relay_run_epoch"].append((label, run.epoch))
            holders = [lease["worker_id"] for lease in run.leases]
            series["relay_run_handoffs"].append((label, sum(
                1 for before, after in zip(holders, holders[1:], strict=False) if before != after)))
            series["relay_run_trainer_restarts"].append((label, run.trainer_restarts))
            series["relay_run_sync_error"].append((label, float(bool(run.sync_error))))
            series["relay_run_seconds_without_holder"].append((label, self.seconds_without_holder(run, wall)))
            if run.holder:
                expires_in = self.expires.get(run_id, now) - now
                series["relay_run_lease_expires_in_seconds"].append((label, expires_in))
                series["relay_run_seconds_since_renewal"].append((label, self.lease_seconds - expires_in))
            last_checkpoint = run.latest_checkpoint["at"] if run.latest_checkpoint else run.created_at
            series["relay_run_seconds_since_checkpoint"].append((label, wall - last_checkpoint))
            if run.hub:
                series["relay_run_seconds_since_hub_revision"].append((label, wall - run.hub["at"]))
        with self.requests_lock:
            series["relay_commander_requests_total"] = [(f'endpoint="{endpoint}",status="{status}"', count)
                                                        for (endpoint, status), count in sorted(self.requests.items())]
        return series

    @staticmethod
    def format_metrics(series: dict[str, list[tuple[str, float]]]) -> str:
        """The Prometheus text format (docs/commander.md, 'Metrics')."""
        lines = []
        for name, (kind, text) in METRICS.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            lines += [f"{name}{{{labels}}} {value:.3f}" if isinstance(value, float) else f"{name}{{{labels}}} {value}"
                      for labels, value in series[name]]
        return "\n".join(lines) + "\n"

    @staticmethod
    def seconds_without_holder(run: RunRecord, wall: float) -> float:
        """0 while held or finished; else since the last lease ended (or the run was created)."""
        if run.holder or run.status in ENDED_STATUSES:
            return 0.0
        return wall - (run.leases[-1]["ended_at"] if run.leases else run.created_at)

    def dispatch(self, method: str, path: str, raw: bytes, query: dict[str, list[str]]) -> tuple[int, dict | str | Document]:
        routes: dict[tuple[str, str], Callable[[Body], dict]] = {
            ("POST", "/api/lease/acquire"): self.acquire,
            ("POST", "/api/lease/renew"): self.renew,
            ("POST", "/api/lease/release"): self.release,
            ("POST", "/api/lease/join"): self.join,
            ("POST", "/api/lease/member"): self.member_renew,
            ("POST", "/api/lease/leave"): self.leave,
            ("POST", "/api/job/report"): self.report,
            ("POST", "/api/runs/spend"): self.record_spend,
            ("POST", "/api/runs/cancel"): self.cancel,
            ("POST", "/api/runs/retry"): self.retry,
            ("POST", "/api/runs/event"): self.record_event,
        }
        if (method, path) in routes:
            body = Body(raw)
            with self.lock:
                return 200, routes[(method, path)](body)
        if method == "GET" and path == "/api/runs":
            with self.lock:
                return 200, self.runs_view()
        if method == "GET" and path.startswith("/api/runs/") and path.endswith("/logs"):
            run_id = urllib.parse.unquote(path[len("/api/runs/"):-len("/logs")])
            with self.lock:
                return 200, self.logs_view(self._run(run_id), query)
        if method == "GET" and path.startswith("/api/runs/"):
            run_id = urllib.parse.unquote(path[len("/api/runs/"):])
            with self.lock:
                return 200, self.run_view(self._run(run_id), self.clock())
        # The lock guards the records, never rendering or I/O: views are taken under it, pages,
        # metrics text and JSON (the handler's _send) are made after it is let go.
        if method == "GET" and path == "/":
            with self.lock:
                view = self.runs_view()
            return 200, render_status_page(view)
        if method == "GET" and path == "/metrics":
            with self.lock:
                series = self.metrics_series()
            return 200, Document(self.format_metrics(series), "text/plain; version=0.0.4; charset=utf-8")
        if path in API_ENDPOINTS:
            raise ApiError(405, f"{method} is not allowed on {path}")
        raise ApiError(404, f"no such endpoint: {path}")


# Roles.  The shared secret may do everything; the viewer secret (RELAY_VIEWER_SECRET) may
# only read: the page, /metrics and GET /api/runs… (the logs among them).  Whoever can only
# watch can then never change a run.
ROLE_SHARED, ROLE_VIEWER = "shared", "viewer"
BASIC_AUTH_PATHS = ("/", "/metrics")  # what a browser or Prometheus opens with a password
MIN_PUBLIC_SECRET_BYTES = 32

# What a connection may cost before it proved anything (docs/commander.md, "On the
# public internet"); the figures are those of well-kept servers (nginx, gunicorn, uvicorn).
TLS_HANDSHAKE_SECONDS = 10.0  # for the whole handshake (the ssl module keeps one deadline)
REQUEST_READ_SECONDS = 10.0  # request line, headers and body, from the request's first byte
IDLE_SECONDS = 5.0  # a keep-alive connection waiting for its next request, until one was signed
TRUSTED_IDLE_SECONDS = 120.0  # ... once a request on it was signed: a worker keeps its connection
WRITE_SECONDS = 10.0  # for sending one answer to a client that does not read it
MAX_HEADER_BYTES = 32 << 10  # request line and headers together
MAX_CONNECTIONS = 1024  # open at once; a connection over the cap gets a fast 503
RESERVED_FILES = 64  # descriptors kept for the state file, the notifier and the 503 itself
MAX_BODY_BYTES_IN_FLIGHT = 16 << 20  # bodies being read at once (a renewal is a few KB)
VIEW_SLOTS = 2  # pages, metrics and run records made at once (the handler's _handle says why)
BASIC_AUTH_MAX_DELAY_SECONDS = 60.0
MAX_ADDRESSES_TRACKED = 4096


def viewer_may(method: str, path: str) -> bool:
    return method == "GET" and (path in BASIC_AUTH_PATHS or path == "/api/runs" or path.startswith("/api/runs/"))


def tls_server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """The server side of TLS: the stdlib's modern defaults (forward-secret ciphers, no
    compression), TLS 1.2 at least."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:  # before OSError, of which it is a subclass
        raise UserError(f"--tls-cert {cert_file} / --tls-key {key_file}: not a PEM certificate and its key "
                        f"({exc.reason or exc})") from None
    except OSError as exc:
        raise UserError(f"--tls-cert {cert_file} / --tls-key {key_file}: {exc.strerror or exc}") from None
    return context


class RequestTooLarge(http.client.LineTooLong):
    """More header bytes than MAX_HEADER_BYTES (the stdlib parser answers it with a 431)."""

    def __init__(self) -> None:
        super().__init__(f"request line and headers over {MAX_HEADER_BYTES} bytes")


class DeadlineReader(io.RawIOBase):
    """The socket as the request parser reads it: no read waits past `deadline` (one deadline
    for a whole request, so a client dripping a byte at a time is cut off when it passes, not
    per byte) and at most `budget` more bytes are read (RequestTooLarge beyond)."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock
        self.deadline = 0.0
        self.budget = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.budget <= 0:
            raise RequestTooLarge()
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the request's deadline passed")
        self.sock.settimeout(remaining)
        received = self.sock.recv_into(memoryview(buffer)[:self.budget])
        self.budget -= received
        return received


class SendAllWriter(io.RawIOBase):
    """The socket as answers are written to it: with sendall, whose timeout is one deadline for
    all it sends, so a client that reads an answer a byte at a time is cut off at WRITE_SECONDS."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.sock.sendall(data)
        return len(data)


class BasicAuthBackoff:
    """Wrong Basic-auth passwords slow their address down: after the n-th failure in a row it
    must wait 2^(n-1)/2 s (at most BASIC_AUTH_MAX_DELAY_SECONDS) before a password is checked
    again; an earlier try gets a 429 at once.  Its own small lock, never the commander's, and
    a bounded table (the address heard from longest ago goes first)."""

    def __init__(self) -> None:
        self._failures: collections.OrderedDict[str, tuple[int, float]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def wait_seconds(self, address: str, now: float) -> float:
        with self._lock:
            _, allowed_at = self._failures.get(address, (0, now))
            return max(0.0, allowed_at - now)

    def failed(self, address: str, now: float) -> None:
        with self._lock:
            failures = self._failures.pop(address, (0, now))[0] + 1
            self._failures[address] = (failures, now + min(BASIC_AUTH_MAX_DELAY_SECONDS, 0.5 * 2 ** (failures - 1)))
            while len(self._failures) > MAX_ADDRESSES_TRACKED:
                self._failures.popitem(last=False)

    def succeeded(self, address: str) -> None:
        with self._lock:
            self._failures.pop(address, None)


class CommanderHTTPServer(http.server.ThreadingHTTPServer):
    """A thread per connection, at most `max_connections` of them, each with deadlines.

    Why threads and not a selector front: the work behind a request is short and blocking
    (a lock, a small state file written with fsync), the stdlib's request parser is blocking,
    and with every read under one deadline per request and idle connections closed after
    IDLE_SECONDS, a hostile connection holds a thread (~30 KB) for seconds, not for ever.
    The cap below the file limit keeps accept() from ever failing with EMFILE (which made the
    stdlib loop spin): a connection over the cap costs one accept, a 503 and a close, on the
    accepting thread, while the connections already open (a worker's kept-alive one among
    them) keep being served.  A selector front would hold more idle sockets per MB, but the
    file limit binds first, and it would need a second, non-blocking HTTP and TLS parser.
    """

    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], commander: Commander, secret: str, viewer_secret: str = "",
                 tls: ssl.SSLContext | None = None, max_connections: int = MAX_CONNECTIONS) -> None:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        super().__init__(address, CommanderHandler)
        self.commander = commander
        self.secret = secret
        self.viewer_secret = viewer_secret
        self.nonces = NonceCache()
        self.backoff = BasicAuthBackoff()
        self.tls = tls
        self.max_connections = max_connections
        self.connections = 0
        self.body_bytes = 0  # being read now, over all connections
        self.view_slots = threading.BoundedSemaphore(VIEW_SLOTS)
        self.counts_lock = threading.Lock()
        if tls is not None:
            # The handshake happens on the request's own thread (finish_request), so a client
            # that connects and says nothing never holds up accepting the others.
            self.socket = tls.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)
        # Basic auth sends the password readable by anyone on the path: the shared secret
        # goes that way only inside TLS or on this machine.
        self.shared_secret_over_basic = tls is not None or is_loopback(address[0])

    def get_request(self) -> tuple[Any, Any]:
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                time.sleep(0.05)  # out of descriptors (not ours alone): wait instead of spinning
            raise

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.counts_lock:
            admitted = self.connections < self.max_connections
            self.connections += admitted
        if admitted:
            super().process_request(request, client_address)
            return
        if self.tls is None:  # over TLS an answer would cost a handshake on this thread: closed only
            with contextlib.suppress(OSError):
                request.setblocking(False)
                request.send(OVER_CAPACITY_ANSWER)
        self.shutdown_request(request)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.counts_lock:
                self.connections -= 1

    def reserve_body(self, size: int) -> bool:
        with self.counts_lock:
            if self.body_bytes + size > MAX_BODY_BYTES_IN_FLIGHT:
                return False
            self.body_bytes += size
            return True

    def release_body(self, size: int) -> None:
        with self.counts_lock:
            self.body_bytes -= size

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls is not None:
            try:
                request.settimeout(TLS_HANDSHAKE_SECONDS)
                request.do_handshake()
            except (ssl.SSLError, OSError):
                return  # a failed handshake (plain HTTP, an untrusting client) has nobody to answer
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that vanished mid-answer is nothing to tell anyone; anything else is a bug,
        # said in one line (the stdlib would print a traceback for each).
        problem = sys.exc_info()[1]
        if not isinstance(problem, OSError):
            log("commander", f"connection from {client_address[0]} failed: {type(problem).__name__}: {problem}")


_OVER_CAPACITY = b'{"error": "the commander has too many connections open; try again"}'
OVER_CAPACITY_ANSWER = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                        b"Connection: close\r\nContent-Length: " + str(len(_OVER_CAPACITY)).encode() + b"\r\n\r\n"
                        + _OVER_CAPACITY)


class CommanderHandler(http.server.BaseHTTPRequestHandler):
    server: CommanderHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "relay-commander"  # no version of relay or Python: nothing to look up for an attacker
    # A buffered writer (setup) sends headers and body in one write, flushed after each
    # request: the stdlib default sends them separately, and Nagle's algorithm with the
    # client's delayed ACK then holds every answer back ~40 ms.
    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rfile.close()
        self.reader = DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self.reader)
        self.wfile = io.BufferedWriter(SendAllWriter(self.connection), 1 << 16)
        self.idle_seconds = IDLE_SECONDS  # until a request on this connection is signed
        self.answer_secret = ""  # what the answer to the current request is signed with

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # request lines are not logged: events go to the run records instead

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        pass  # (and a refusal before the request line was read has no line to log)

    def handle_one_request(self) -> None:
        """One request, under the deadlines: IDLE_SECONDS (or TRUSTED_IDLE_SECONDS) for its
        first byte, then REQUEST_READ_SECONDS for all of it, MAX_HEADER_BYTES of headers."""
        self.reader.budget = MAX_HEADER_BYTES
        self.reader.deadline = time.monotonic() + self.idle_seconds
        self.answer_secret, self.command, self.request_version = "", None, "HTTP/1.1"  # for a refusal before parsing
        try:
            if not self.rfile.peek(1):
                self.close_connection = True  # the client closed it
                return
            self.reader.deadline = time.monotonic() + REQUEST_READ_SECONDS
            super().handle_one_request()
        except RequestTooLarge as exc:
            self.send_error(431, None, str(exc))
        except OSError:  # the deadline passed (TimeoutError), the client went away, bad TLS
            self.close_connection = True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib parser's refusals (bad request line, headers too large) as JSON, and the
        connection closed after them."""
        self.close_connection = True
        self._send(code, encode_answer({"error": explain or message or http.HTTPStatus(code).phrase}), "")

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _body_size(self) -> int:
        """The announced body size, checked before a byte of it is read."""
        if self.headers.get("Transfer-Encoding"):
            raise ApiError(411, "chunked bodies are not accepted; send Content-Length")
        length = self.headers.get("Content-Length")
        if length is None:
            return 0
        try:
            size = int(length)
        except ValueError:
            raise ApiError(400, "Content-Length must be an integer") from None
        if size < 0:
            raise ApiError(400, "Content-Length must not be negative")
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"body over {MAX_BODY_BYTES} bytes")
        return size

    def _authenticate(self, method: str, body: bytes, path: str) -> None:
        server = self.server
        if not server.secret:
            self._check_protocol(signed=False)
            return
        auth = self.headers.get("Authorization", "")
        if path in BASIC_AUTH_PATHS and auth.startswith("Basic ") and not self.headers.get("X-Relay-Signature"):
            role = self._basic_auth_role(auth)
        elif path == "/api/health" and not self.headers.get("X-Relay-Signature"):
            return  # open to anyone: the load balancer's and launch-stack's liveness check
        else:
            verdict = verify_request({ROLE_SHARED: server.secret, ROLE_VIEWER: server.viewer_secret},
                                     self.headers, method, self.path, body, server.nonces)
            self.answer_secret = verdict.answer_secret
            if verdict.problem and path == "/api/health":
                return  # open to anyone all the same; only its answer goes unsigned
            if verdict.problem:
                raise ApiError(401, verdict.problem)
            role = verdict.role
            self.idle_seconds = TRUSTED_IDLE_SECONDS
            self._check_protocol(signed=True)
        if role == ROLE_VIEWER and not viewer_may(method, path):
            raise ApiError(401, "the viewer secret may only read (the page, /metrics, GET /api/runs); "
                                "changing a run takes the shared secret")

    def _check_protocol(self, signed: bool) -> None:
        """A signed request must say it speaks this protocol (older workers sign, but do not
        check answers); an unsigned one, sent to a commander without a secret, only if it says."""
        spoken = self.headers.get("X-Relay-Protocol")
        if spoken == str(PROTOCOL) or (spoken is None and not signed):
            return
        raise ApiError(400, f"this commander speaks relay protocol {PROTOCOL} (relay {VERSION}), the request "
                            f"{'protocol ' + spoken if spoken else 'an older one'}: run the same relay.py on the "
                            "commander and the pods")

    def _basic_auth_role(self, auth: str) -> str:
        server, address, now = self.server, self.client_address[0], time.monotonic()
        wait = server.backoff.wait_seconds(address, now)
        if wait > 0:
            raise ApiError(429, f"too many wrong passwords from {address}; try again in {math.ceil(wait)} s")
        try:
            _, _, password = base64.b64decode(auth[6:], validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            password = ""
        if server.viewer_secret and hmac.compare_digest(password.encode(), server.viewer_secret.encode()):
            server.backoff.succeeded(address)
            return ROLE_VIEWER
        if not hmac.compare_digest(password.encode(), server.secret.encode()):
            server.backoff.failed(address, now)
            raise ApiError(401, "wrong password")
        server.backoff.succeeded(address)
        # A request from a loopback address never crossed a network in clear: it came from this
        # machine, or through an SSH tunnel (`ssh -L 8080:127.0.0.1:8080 box`), which encrypts.
        # (A reverse proxy on this machine makes every request loopback: let it do the TLS.)
        if not server.shared_secret_over_basic and not is_loopback(self.client_address[0]):
            raise ApiError(401, "the shared secret is refused here: this commander serves plain HTTP on a public "
                                "address, where a password crosses the network readable by anyone, and this one "
                                "can change every run. Open the page with RELAY_VIEWER_SECRET, through an SSH tunnel "
                                "(ssh -L 8080:127.0.0.1:8080 this-box, then http://127.0.0.1:8080/), or serve with "
                                "--tls-cert/--tls-key (docs/commander.md, 'TLS and roles')")
        return ROLE_SHARED

    def _handle(self, method: str) -> None:
        path = urllib.parse.urlsplit(self.path).path
        reserved = 0
        try:
            try:
                size = self._body_size()
            except ApiError:
                self.close_connection = True  # the body, if any, is not read: the connection is useless
                raise
            if not self.server.reserve_body(size):
                self.close_connection = True
                raise ApiError(503, "the commander is reading too many request bodies; try again")
            reserved = size
            self.reader.budget = size + io.DEFAULT_BUFFER_SIZE  # the body, and what the buffer reads ahead
            body = self.rfile.read(size)
            if len(body) < size:
                self.close_connection = True
                return
            self._authenticate(method, body, path)
            if method == "GET" and path == "/api/health":
                status, answer = 200, encode_answer({"ok": True, "version": VERSION, "protocol": PROTOCOL})
            else:
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                # Views (the page, metrics, run records) are made VIEW_SLOTS at a time: making
                # one holds the GIL, and 16 viewers doing so at once made every renewal wait
                # its turn behind them (p50 230 ms, bench_relay.py viewers).
                with self.server.view_slots if method == "GET" else contextlib.nullcontext():
                    status, payload = self.server.commander.dispatch(method, path, body, query)
                    answer = encode_answer(payload)
        except ApiError as exc:
            status, answer = exc.status, encode_answer({"error": exc.message, **exc.fields})
        except OSError:  # the body's deadline passed, or the client went away
            self.close_connection = True
            return
        except Exception as exc:  # a bug must not take the commander down or leak a trace
            log("commander", f"internal error on {method} {path}: {type(exc).__name__}: {exc}")
            status, answer = 500, encode_answer({"error": "internal error"})
        finally:
            self.server.release_body(reserved)
        self.server.commander.count_request(path, status)
        self._send(status, answer, path)

    def _send(self, status: int, answer: tuple[bytes, str], path: str) -> None:
        data, ctype = answer
        self.connection.settimeout(WRITE_SECONDS)  # sendall keeps one deadline for the whole answer
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        if self.answer_secret:
            self.send_header("X-Relay-Response-Signature", response_signature(
                self.answer_secret, self.headers.get("X-Relay-Nonce", ""), status, data))
        if ctype.startswith("text/html"):
            # Everything is inline and escaped; this stops anything else from loading or running.
            self.send_header("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; "
                                                        "script-src 'unsafe-inline'; connect-src 'self'")
        if status == 401 and path in BASIC_AUTH_PATHS:
            self.send_header("WWW-Authenticate", 'Basic realm="relay-trainer", charset="UTF-8"')
        if status == 429:
            self.send_header("Retry-After", "1")
        if self.close_connection:
            self.send_header("Connection", "close")
        else:  # clients reconnect before this, instead of racing the commander's close
            self.send_header("Keep-Alive", f"timeout={int(self.idle_seconds)}")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


def encode_answer(payload: dict | str | Document) -> tuple[bytes, str]:
    """An answer's bytes and content type: JSON, the page (a str) or a Document."""
    if isinstance(payload, Document):
        return payload.text.encode(), payload.content_type
    if isinstance(payload, str):
        return payload.encode(), "text/html; charset=utf-8"
    return json.dumps(payload).encode(), "application/json"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, how a dual-stack socket sees IPv4
    return (mapped or address).is_loopback


def raise_file_limit() -> int:
    """Raise the soft limit on open files to the hard one (systemd gives a service 1024 unless
    LimitNOFILE says more); the limit now in force, which caps the connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):  # an unlimited hard limit cannot be the soft one
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    log("commander", f"open-file limit {now}" + (f" (raised from {soft})" if now != soft else "")
        + f"; at most {connection_cap(now)} connections at once")
    return now


def connection_cap(file_limit: int) -> int:
    return max(8, min(MAX_CONNECTIONS, file_limit - RESERVED_FILES))


def serve(host: str, port: int, state_path: str, secret: str, lease_seconds: float, insecure: bool,
          max_failed_leases: int, viewer_secret: str = "", tls_cert: str = "", tls_key: str = "",
          notify_url: str = "", no_holder_seconds: float = NOTIFY_NO_HOLDER_SECONDS) -> int:
    if lease_seconds < 2:
        raise UserError("--lease-seconds must be at least 2")
    if max_failed_leases < 1:
        raise UserError("--max-failed-leases must be at least 1")
    if not secret and not is_loopback(host) and not insecure:
        raise UserError(f"refusing to listen on {host} without a shared secret: set RELAY_SHARED_SECRET "
                        "(or pass --insecure if this network is private)")
    if secret and not is_loopback(host) and len(secret.encode()) < MIN_PUBLIC_SECRET_BYTES:
        raise UserError(f"refusing to listen on {host} with a shared secret of {len(secret.encode())} bytes: on a "
                        f"reachable address it must have at least {MIN_PUBLIC_SECRET_BYTES} (make one with "
                        "`openssl rand -hex 32`)")
    if viewer_secret and (not secret or viewer_secret == secret):
        raise UserError("RELAY_VIEWER_SECRET needs a different RELAY_SHARED_SECRET beside it "
                        "(without a shared secret everything is open anyway)")
    if bool(tls_cert) != bool(tls_key):
        raise UserError("--tls-cert and --tls-key go together")
    tls = tls_server_context(tls_cert, tls_key) if tls_cert else None
    if no_holder_seconds <= 0:
        raise UserError("--notify-no-holder-seconds must be a positive number of seconds")
    notifier = Notifier(check_notify_url(notify_url, "--notify-url / RELAY_NOTIFY_URL"), "commander")
    commander = Commander(StateStore(state_path), lease_seconds, max_failed_leases, notifier=notifier,
                          no_holder_seconds=no_holder_seconds)
    max_connections = connection_cap(raise_file_limit())
    try:
        server = CommanderHTTPServer((host, port), commander, secret, viewer_secret, tls, max_connections)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    if secret and not server.shared_secret_over_basic:
        log("commander", f"plain HTTP on {host}: from other machines the page and /metrics take only the viewer "
                         "secret; the shared secret only from this machine or an SSH tunnel (or serve with "
                         "--tls-cert/--tls-key)")
    set_process_name("relay-commander")
    stopping = threading.Event()

    def reap_expired() -> None:
        while not stopping.wait(0.25):
            commander.expire_due_leases()
            commander.notify_runs_without_holder()

    threading.Thread(target=reap_expired, name="lease-reaper", daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    bound_host, bound_port = server.server_address[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(f"relay commander {VERSION} listening on {'https' if tls else 'http'}://{shown}:{bound_port} "
          f"(state {commander.store.path}, lease {lease_seconds:g} s, auth {'on' if secret else 'off'}, "
          f"viewer secret {'on' if viewer_secret else 'off'}, notifications {'on' if notify_url else 'off'})", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        stopping.set()
        server.server_close()
        notifier.flush(5.0)  # what happened just before a stop is worth a few seconds
    print("relay commander stopped", flush=True)
    return 0


###############################################################################
# 5. Checkpoints ##############################################################
###############################################################################
#
# The trainer writes Megatron's layout into RELAY_CKPT_DIR = {l1_root}/runs/{run_id}/ckpt:
# iter_0000019/..., then latest_checkpointed_iteration.txt (only once the save is complete),
# then, for slime, rollout/global_dataset_state_dict_19.pt (the data position).  The relay
# seals a complete checkpoint by writing a manifest (sizes and SHA-256 of every file) to
# {run_dir}/sealed/; only sealed checkpoints are reported, synced, restored or counted.

TRACKER_FILE = "latest_checkpointed_iteration.txt"
SEAL_SETTLE_SECONDS = 0.5  # a dataset-state file must be this old before it counts as written


def iteration_dirname(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def dataset_state_relpath(iteration: int) -> str:
    return f"rollout/global_dataset_state_dict_{iteration}.pt"


@dataclass
class Manifest:
    """What a sealed checkpoint consists of: relative path -> [size, sha256]."""

    iteration: int
    files: dict
    epoch: int = 0
    worker_id: str = ""
    sealed_at: float = 0.0

    @property
    def digest(self) -> str:
        return hashlib.sha256(dumps({"iteration": self.iteration, "files": self.files})).hexdigest()

    @property
    def total_bytes(self) -> int:
        return sum(size for size, _ in self.files.values())

    def summary(self) -> dict:
        return {"iteration": self.iteration, "manifest_sha256": self.digest,
                "bytes": self.total_bytes, "files": len(self.files)}

    def to_bytes(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> "Manifest":
        data = json.loads(raw)
        manifest = cls(**data)
        if not isinstance(manifest.iteration, int) or not isinstance(manifest.files, dict):
            raise ValueError("malformed manifest")
        return manifest


class CheckpointDir:
    """One run's checkpoint folder on the local volume (L1) and the seals beside it."""

    def __init__(self, run_dir: str, require_dataset_state: bool) -> None:
        self.path = os.path.join(run_dir, "ckpt")
        self.seal_dir = os.path.join(run_dir, "sealed")
        self.require_dataset_state = require_dataset_state
        self._warned_missing_state: set[int] = set()
        # On node 0 of a multi-node run: brings the other nodes' shards of an iteration here
        # (section 6, "the nodes of a cluster"); True once this node has all of them.
        self.gather: Callable[[int], bool] = lambda iteration: True
        os.makedirs(self.path, exist_ok=True)
        os.makedirs(self.seal_dir, exist_ok=True)

    # -- reading the trainer's layout ------------------------------------------------------

    def tracker(self) -> str | None:
        try:
            with open(os.path.join(self.path, TRACKER_FILE), encoding="utf-8") as handle:
                return handle.read().strip()
        except (OSError, UnicodeDecodeError):
            return None

    def tracker_iteration(self) -> int | None:
        """The iteration the tracker names; None for none, for 'release' or for garbage."""
        text = self.tracker()
        return int(text) if text and text.isdigit() else None

    def iterations_on_disk(self) -> list[int]:
        found = []
        with contextlib.suppress(OSError):
            for name in os.listdir(self.path):
                match = re.fullmatch(r"iter_(\d{7,})", name)
                if match and os.path.isdir(os.path.join(self.path, name)):
                    found.append(int(match.group(1)))
        return sorted(found)

    def files_of(self, iteration: int) -> list[str]:
        """Relative paths of every file that belongs to checkpoint `iteration`."""
        root = os.path.join(self.path, iteration_dirname(iteration))
        files = []
        for folder, _, names in os.walk(root):
            files += [os.path.relpath(os.path.join(folder, n), self.path) for n in names]
        if os.path.exists(os.path.join(self.path, dataset_state_relpath(iteration))):
            files.append(dataset_state_relpath(iteration))
        return sorted(files)

    def is_complete(self, iteration: int, tracker: int | None, writer_alive: bool = True) -> bool:
        """Megatron and slime: the tracker has reached it, and its data position is saved,
        whichever of the two was written first.

        slime writes the dataset-state file after the tracker, except with --async-save
        (the tracker of N is written only when the next save starts, so the state file comes
        first), and not atomically: while the trainer lives, the file must also be
        SEAL_SETTLE_SECONDS old before it counts.
        """
        if tracker is None or iteration > tracker or not self.gather(iteration):
            return False
        if not self.require_dataset_state:
            return True
        state = os.path.join(self.path, dataset_state_relpath(iteration))
        try:
            written = os.stat(state).st_mtime
            return not writer_alive or utc_now() - written >= SEAL_SETTLE_SECONDS
        except OSError:
            if iteration == tracker and iteration not in self._warned_missing_state:
                self._warned_missing_state.add(iteration)
                log("checkpoints", f"tracker names iteration {iteration} but {dataset_state_relpath(iteration)} "
                                   "is not there yet; waiting for it (set require_dataset_state: false if your "
                                   "trainer never writes one)")
            return False

    # -- seals -----------------------------------------------------------------------------

    def sealed_iterations(self) -> list[int]:
        found = []
        with contextlib.suppress(OSError):
            for name in os.listdir(self.seal_dir):
                match = re.fullmatch(r"iter_(\d{7,})\.json", name)
                if match:
                    found.append(int(match.group(1)))
        return sorted(found)

    def manifest_path(self, iteration: int) -> str:
        return os.path.join(self.seal_dir, iteration_dirname(iteration) + ".json")

    def load_manifest(self, iteration: int) -> Manifest | None:
        try:
            with open(self.manifest_path(iteration), "rb") as handle:
                return Manifest.from_bytes(handle.read())
        except (OSError, ValueError, TypeError):
            return None

    def newest_sealed(self) -> Manifest | None:
        sealed = self.sealed_iterations()
        return self.load_manifest(sealed[-1]) if sealed else None

    def seal(self, iteration: int, epoch: int, worker_id: str,
             should_abort: Callable[[], bool] = lambda: False) -> Manifest | None:
        """Hash checkpoint `iteration` and write its manifest; None if it changed meanwhile."""
        before = self._stat_files(iteration)
        files = {}
        for rel, (size, _) in before.items():
            digest = sha256_file(os.path.join(self.path, rel), should_abort)
            if digest is None:
                return None
            files[rel] = [size, digest]
        if not files or self._stat_files(iteration) != before:
            return None  # still being written: try again at the next scan
        manifest = Manifest(iteration, files, epoch, worker_id, utc_now())
        atomic_write(self.manifest_path(iteration), manifest.to_bytes())
        return manifest

    def _stat_files(self, iteration: int) -> dict[str, tuple[int, int]]:
        stats = {}
        for rel in self.files_of(iteration):
            with contextlib.suppress(OSError):
                st = os.stat(os.path.join(self.path, rel))
                stats[rel] = (st.st_size, st.st_mtime_ns)
        return stats

    def seal_newest(self, epoch: int, worker_id: str, writer_alive: bool,
                    should_abort: Callable[[], bool] = lambda: False) -> Manifest | None:
        """Seal the newest complete checkpoint newer than every sealed one, if there is one.

        Older complete ones that were skipped (the trainer saves faster than we seal) are
        left for prune(); sealing only the newest keeps up with any save interval.
        """
        sealed = self.sealed_iterations()
        floor = sealed[-1] if sealed else -1
        tracker = self.tracker_iteration()
        for iteration in reversed(self.iterations_on_disk()):
            if iteration <= floor:
                break
            if self.is_complete(iteration, tracker, writer_alive):
                return self.seal(iteration, epoch, worker_id, should_abort)
        return None

    def verify(self, manifest: Manifest, should_abort: Callable[[], bool] = lambda: False) -> bool:
        """Every file present with the sealed size and SHA-256 (a damaged copy is refused)."""
        for rel, (size, digest) in manifest.files.items():
            path = os.path.join(self.path, rel)
            try:
                if os.path.getsize(path) != size:
                    return False
            except OSError:
                return False
            if sha256_file(path, should_abort) != digest:
                return False
        return True

    # -- preparing a resume and pruning ----------------------------------------------------

    def remove(self, iteration: int) -> None:
        shutil.rmtree(os.path.join(self.path, iteration_dirname(iteration)), ignore_errors=True)
        for path in (os.path.join(self.path, dataset_state_relpath(iteration)), self.manifest_path(iteration)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def point_tracker_at(self, iteration: int | None) -> None:
        """Make the trainer resume from `iteration` (None: cold start) and nothing newer.

        Checkpoint folders newer than the chosen one are unsealed leftovers of a holder that
        died mid-save (or damaged): they are removed so they can never be sealed later as if
        this history had produced them.
        """
        for other in self.iterations_on_disk():
            if iteration is None or other > iteration:
                self.remove(other)
        tracker = os.path.join(self.path, TRACKER_FILE)
        if iteration is not None:
            atomic_write(tracker, f"{iteration}\n".encode(), mode=0o644)
        elif os.path.isdir(os.path.join(self.path, "release")):
            atomic_write(tracker, b"release\n", mode=0o644)  # a converted base checkpoint
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tracker)

    def prune(self, keep: int, protected: set[int]) -> list[int]:
        """Keep the newest `keep` sealed checkpoints (and every protected one); remove the rest.

        Unsealed iteration folders older than the newest seal are trainer saves the relay
        skipped; they go too.  'release' (a converted base checkpoint) is never touched.
        """
        sealed = self.sealed_iterations()
        keep_set = set(sealed[-keep:]) | protected
        newest = sealed[-1] if sealed else -1
        removed = []
        for iteration in sorted(set(sealed) | set(self.iterations_on_disk())):
            if iteration in keep_set or iteration >= newest:
                continue
            self.remove(iteration)
            removed.append(iteration)
        return removed


###############################################################################
# 6. Stores (L2: the Hugging Face Hub) ########################################
###############################################################################
#
# L1 is the CheckpointDir above, on the pod's Lium volume.  L2 is a store with two calls:
# upload(manifest) -> revision and download(record) -> manifest.  Section 8 talks to it
# only through HubSync, so a slow Hub never holds up training or lease renewals.

TRAJECTORY_SETTLE_SECONDS = 2.0  # a trajectory file untouched this long is finished (slime writes in place)
TRAJECTORIES_PER_FOLDER = 1000  # the Hub takes at most 10,000 files per folder
HUB_STAGING_PREFIX = ".hub-download-"  # + the revision: a download's folder in L1, kept until it completes
HUB_THREAD_NICENESS = 10  # the Hub sync thread's nice value: the trainer's CPU work comes first
HUB_STUCK_RETRY_SECONDS = 1800.0  # after an error a retry cannot fix (quota, permission): a few requests an hour
# hf_xet's footprint off the trainer's back (its defaults: a 16 GB shard cache kept 3 weeks, 250 MB
# of logs, 1.6 GB of download buffer growing to 6.3 GB).  Consecutive checkpoints share almost no
# chunks, so a large shard cache buys nothing; a restore streams file by file.
XET_SHARD_CACHE_BYTES = 1_000_000_000
XET_LOG_BYTES = 50_000_000
XET_DOWNLOAD_BUFFER_BYTES = 512_000_000
XET_DOWNLOAD_BUFFER_PER_FILE_BYTES = 256_000_000
# The worker's own values of what configure_hub_client() changes (None: unset), given back to the
# trainer, whose own huggingface_hub must see the user's choices, not relay's.
USER_HUB_ENVIRONMENT: dict[str, str | None] = {}


def hub_client_environment(cfg: RunConfig) -> dict[str, str | None]:
    """What relay's huggingface_hub and hf_xet read from the environment (None: removed).

    hf_transfer "lfs" disables Xet, "xet" takes it even if the user's environment disabled it.
    hf_xet's cache and logs live in a folder of this worker's under the run's folder on the
    volume, bounded, never on the container disk; its download buffer is sized for a pod whose
    RAM is the trainer's; HF_XET_HIGH_PERFORMANCE (all cores, 64 GB+ of RAM) is never on; its
    thread pool has hf_xet_threads threads (tokio's default is one per core)."""
    folder = os.path.join(cfg.run_dir, "hf-xet", cfg.worker_id)
    return {
        "HF_HUB_DISABLE_XET": "1" if cfg.hf_transfer == "lfs" else None,
        "HF_XET_CACHE": folder,
        "HF_XET_SHARD_CACHE_SIZE_LIMIT": str(XET_SHARD_CACHE_BYTES),
        "HF_XET_LOG_DEST": os.path.join(folder, "logs") + os.sep,  # a folder: hf_xet rotates and prunes it
        "HF_XET_LOG_DIR_MAX_SIZE": str(XET_LOG_BYTES),
        "HF_XET_RECONSTRUCTION_DOWNLOAD_BUFFER_SIZE": str(XET_DOWNLOAD_BUFFER_BYTES),
        "HF_XET_RECONSTRUCTION_DOWNLOAD_BUFFER_LIMIT": str(XET_DOWNLOAD_BUFFER_BYTES),
        "HF_XET_RECONSTRUCTION_DOWNLOAD_BUFFER_PERFILE_SIZE": str(XET_DOWNLOAD_BUFFER_PER_FILE_BYTES),
        "HF_XET_HIGH_PERFORMANCE": None,
        "TOKIO_WORKER_THREADS": str(cfg.hf_xet_threads),
    }


def configure_hub_client(cfg: RunConfig) -> None:
    """Put hub_client_environment() in this process's environment.  Called before
    huggingface_hub is first imported: it reads HF_HUB_DISABLE_XET once, at import (hf_xet
    reads its knobs when its session starts, at the first transfer)."""
    for name, value in hub_client_environment(cfg).items():
        USER_HUB_ENVIRONMENT.setdefault(name, os.environ.get(name))
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def at_low_priority(work: Callable[[], Any]) -> Any:
    """Run `work` on a thread of its own at the Hub's low priority and return what it returns
    (or raise what it raised).  Every call that can move checkpoint bytes goes through here or
    runs on the (equally niced) sync thread: the threads the client starts for it, hf_xet's
    pool included (created by the first thread that transfers, inheriting its nice value),
    then never run at the trainer's priority, whichever of restore, prefetch or sync came first."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        yield_cpu_to_the_trainer()
        try:
            outcome["value"] = work()
        except BaseException as exc:  # noqa: BLE001  (handed to the caller)
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="hub-transfer", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class HubStore:
    """Checkpoints in a Hugging Face Hub repo under runs/{run_id}/ (one commit per checkpoint).

    Guarantee.  The commander records a Hub revision only when the current lease holder
    reports it (a stale epoch's report is refused), and a worker resuming from the Hub
    downloads exactly that recorded commit SHA, never a branch head.  So a stale holder's
    commit may land on the branch but can never become the run's latest nor be resumed from.
    Each commit names the last commit this holder knows as its parent (compare-and-swap): a
    412 means someone else committed meanwhile; the upload is then re-based on the new head.
    """

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.repo = cfg.hf_repo
        self.prefix = f"runs/{cfg.run_id}"
        self.dry_run = cfg.hf_dry_run
        self.api: Any = None
        self.reusable: dict[str, tuple[tuple, Any]] = {}  # path in repo -> (file stat, operation) not committed yet
        self.unanswered = ""  # digest of the manifest whose last commit attempt got no answer

    def check(self) -> None:
        """Fail fast, before any trainer runs: package present, token valid, repo usable."""
        if self.dry_run:
            log("hub", f"hf_dry_run: nothing will be sent to the Hub (repo {self.repo})")
            return
        configure_hub_client(self.cfg)
        try:
            import huggingface_hub  # noqa: PLC0415  (only workers with hf_repo need it)
        except ImportError:
            raise UserError("hf_repo is set, which needs huggingface_hub: pip install huggingface_hub") from None
        from huggingface_hub.utils import disable_progress_bars  # noqa: PLC0415

        disable_progress_bars()  # a worker log is a file: no progress bars in it
        token = os.environ.get("HF_TOKEN", "")
        if not token:
            raise UserError("hf_repo is set but HF_TOKEN is not in the environment (export it on the pod; "
                            "it is never read from run.yaml)")
        self.api = huggingface_hub.HfApi(token=token)
        try:
            self.api.whoami()
            self.api.create_repo(self.repo, private=True, exist_ok=True)
        except Exception as exc:  # the client raises many types; all mean "cannot use the Hub"
            raise UserError(f"hf_repo {self.repo}: {hub_error_text(exc)} (check HF_TOKEN and the repo name)") from None
        # A read-only token passes both calls above (create_repo falls back to reading an
        # existing repo) and would fail at the first upload, hours in: prove write access now.
        try:
            self.api.auth_check(self.repo, write=True)
        except Exception as exc:  # noqa: BLE001  (any answer but yes means no upload will work)
            raise UserError(f"hf_repo {self.repo}: HF_TOKEN cannot write to this repo ({hub_error_text(exc)}); "
                            "use a token with write access to it") from None
        # create_repo(private=True) leaves an existing public repo public: a run would publish
        # its optimizer state and trajectories.
        try:
            public = not self.api.repo_info(self.repo).private
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"hf_repo {self.repo}: {hub_error_text(exc)}") from None
        if public and not self.cfg.hf_allow_public:
            raise UserError(f"hf_repo {self.repo} is a PUBLIC repo: checkpoints uploaded there are published; make it "
                            "private, or set hf_allow_public: true in run.yaml if that is what you want")

    def upload(self, ckpt: CheckpointDir, manifest: Manifest, trajectories: list[str], parent: dict | None,
               message: str, still_ours: Callable[[], bool], protected: tuple[dict, ...] | list[dict] = ()) -> str:
        """One commit: the checkpoint's files, its manifest, the tracker, new trajectories, and
        the deletion of checkpoints beyond hf_keep_last_checkpoints; then their storage is freed.
        `parent` is the last record ({iteration, revision}) this holder knows: the commit names
        its revision as parent (compare-and-swap).  `protected`: records the commander may hold;
        their checkpoints stay restorable at their revisions (never deleted nor freed).

        Returns the commit SHA ('' in dry run).  Operations already uploaded by a failed
        attempt are reused (the client skips their upload; it refuses reuse only after a
        successful commit), so a retry does not re-read the checkpoint.
        """
        base = f"{self.prefix}/ckpt"
        manifest_in_repo = f"{base}/{iteration_dirname(manifest.iteration)}/relay_manifest.json"
        files = [(f"{base}/{rel}", os.path.join(ckpt.path, rel), manifest.files[rel][1]) for rel in sorted(manifest.files)]
        files += [(f"{self.prefix}/{trajectory_path_in_repo(os.path.relpath(path, self.cfg.run_dir))}", path, "")
                  for path in trajectories]
        extra = [(manifest_in_repo, manifest.to_bytes()), (f"{base}/{TRACKER_FILE}", f"{manifest.iteration}\n".encode())]
        if self.dry_run:
            log("hub", f"dry run: would commit {len(files) + len(extra)} files ({manifest.total_bytes} bytes of "
                       f"checkpoint, {len(trajectories)} trajectories) to {self.repo}: {message}")
            return ""
        protected = [r for r in [parent, *protected] if r and r.get("revision")]
        if self.unanswered == manifest.digest:
            # The last attempt got no answer: a commit the Hub timed out on may still land.
            landed = self.head_holding(manifest_in_repo, manifest.to_bytes())
            if landed:
                log("hub", f"checkpoint {manifest.iteration} had landed at {landed[:12]} despite the error")
                self.unanswered, self.reusable = "", {}
                return landed

        def commit(parent_commit: str | None) -> str:
            ops = self.operations(files, extra) + self.pruning(parent_commit, manifest.iteration,
                                                               {r["iteration"] for r in protected})
            try:
                oid = self.api.create_commit(self.repo, ops, commit_message=message, parent_commit=parent_commit).oid
            except Exception as exc:
                if (hub_status(exc) or 500) >= 500:  # no answer, or the Hub's own failure: it may have landed
                    self.unanswered = manifest.digest
                if hub_error_is_permanent(exc):  # perhaps an uploaded object is gone: upload afresh next time
                    self.reusable = {}
                raise
            self.unanswered, self.reusable = "", {}
            return oid

        try:
            revision = commit((parent or {}).get("revision"))
        except Exception as exc:
            if hub_status(exc) != 412 or not still_ours():
                raise
            head = self.api.repo_info(self.repo).sha
            log("hub", f"the branch moved past {str((parent or {}).get('revision'))[:12]} (another writer "
                       f"committed); re-basing on {head[:12]}")
            revision = commit(head)
        if still_ours():
            self.free_storage(revision, protected)
        return revision

    def operations(self, files: list[tuple[str, str, str]], extra: list[tuple[str, bytes]]) -> list[Any]:
        """Additions for a commit, reusing those of a failed attempt whose file has not changed.
        `files`: (path in repo, local path, its sha256 if the manifest has it, else '')."""
        fresh: dict[str, tuple[tuple, Any]] = {}
        for path_in_repo, source, sha256 in files:
            stat = os.stat(source)
            key = (source, stat.st_size, stat.st_mtime_ns)
            cached = self.reusable.get(path_in_repo)
            fresh[path_in_repo] = (key, cached[1] if cached and cached[0] == key else file_addition(path_in_repo, source, sha256))
        self.reusable = fresh
        from huggingface_hub import CommitOperationAdd  # noqa: PLC0415
        return [op for _, op in fresh.values()] + [CommitOperationAdd(path, data) for path, data in extra]

    def checkpoints_at(self, revision: str) -> tuple[set[int], set[str]]:
        """The checkpoint iterations in this run's folder at `revision`, and every path there."""
        base = f"{self.prefix}/ckpt/"
        try:
            entries = list(self.api.list_repo_tree(self.repo, path_in_repo=base.rstrip("/"), revision=revision,
                                                   recursive=True))
        except Exception as exc:
            if hub_status(exc) == 404:  # no checkpoint there yet
                return set(), set()
            raise
        paths = {entry.path for entry in entries}
        found = {int(m.group(1)) for path in paths if (m := re.match(re.escape(base) + r"iter_(\d+)(/|$)", path))}
        return found, paths

    def pruning(self, parent: str | None, iteration: int, protected: set[int]) -> list[Any]:
        """Deletions that leave the newest hf_keep_last_checkpoints checkpoints (this one
        included) at the head, plus the protected ones (the commander's record: a pod may be
        restoring it)."""
        keep = self.cfg.hf_keep_last_checkpoints
        if not keep:
            return []
        from huggingface_hub import CommitOperationDelete  # noqa: PLC0415
        found, paths = self.checkpoints_at(parent or "main")
        others = sorted(found - {iteration})
        kept = {iteration, *protected, *others[max(0, len(others) - keep + 1):]}
        ops = []
        for old in sorted(found - kept):
            ops.append(CommitOperationDelete(f"{self.prefix}/ckpt/{iteration_dirname(old)}/", is_folder=True))
            state = f"{self.prefix}/ckpt/{dataset_state_relpath(old)}"
            if state in paths:
                ops.append(CommitOperationDelete(state))
        return ops

    def free_storage(self, head: str, protected: list[dict]) -> None:
        """Permanently delete the LFS objects of this run's checkpoints that are no longer kept.

        A deleted folder still counts against the account's quota while history references it;
        permanently deleting its objects frees it.  Safety: only objects first pushed under this
        run's checkpoint folder go, and only those that no file at the new head and no file of a
        protected checkpoint (the commander's record, at its revision) references, so every
        revision a pod may restore stays whole; rewrite_history=False keeps every commit SHA
        the commander records.  Failing here loses nothing: the next upload tries again.
        """
        if not self.cfg.hf_keep_last_checkpoints:
            return
        base = f"{self.prefix}/ckpt/"
        try:
            candidates = [o for o in self.api.list_lfs_files(self.repo) if o.filename.startswith(base)]
            if not candidates:
                return
            referenced = {e.lfs.sha256 for e in self.api.list_repo_tree(self.repo, revision=head, recursive=True)
                          if getattr(e, "lfs", None)}
            for record in protected:
                folder = f"{base}{iteration_dirname(record['iteration'])}/"
                state = f"{base}{dataset_state_relpath(record['iteration'])}"
                referenced |= {e.lfs.sha256 for e in self.api.list_repo_tree(
                    self.repo, path_in_repo=base.rstrip("/"), revision=record["revision"], recursive=True)
                    if getattr(e, "lfs", None) and (e.path.startswith(folder) or e.path == state)}
            doomed = [o for o in candidates if o.file_oid not in referenced]
            if doomed:
                self.api.permanently_delete_lfs_files(self.repo, doomed, rewrite_history=False)
                log("hub", f"freed {sum(o.size for o in doomed)} bytes of Hub storage ({len(doomed)} objects of "
                           "checkpoints no longer kept)")
        except Exception as exc:  # noqa: BLE001  (see the docstring: nothing is lost)
            log("hub", f"could not free Hub storage: {hub_error_text(exc)}; the next upload tries again")

    def head_holding(self, manifest_in_repo: str, manifest_bytes: bytes) -> str:
        """The head commit if it holds exactly this manifest (so its whole commit landed), else ''."""
        try:
            head = self.api.repo_info(self.repo).sha
            entries = self.api.list_repo_tree(self.repo, path_in_repo=os.path.dirname(manifest_in_repo), revision=head)
            blob = {e.path: getattr(e, "blob_id", None) for e in entries}.get(manifest_in_repo)
        except Exception:  # noqa: BLE001  (not known to have landed: commit again)
            return ""
        return head if blob == git_blob_id(manifest_bytes) else ""

    def fetch_manifest(self, record: dict, folder: str) -> Manifest:
        """The manifest of the recorded checkpoint (downloaded into `folder`), checked against the record."""
        from huggingface_hub import hf_hub_download  # noqa: PLC0415
        iteration, revision = record["iteration"], record["revision"]
        manifest_path = hf_hub_download(record["repo"], f"{self.prefix}/ckpt/{iteration_dirname(iteration)}/relay_manifest.json",
                                        revision=revision, local_dir=folder)
        with open(manifest_path, "rb") as handle:
            manifest = Manifest.from_bytes(handle.read())
        if manifest.iteration != iteration or manifest.digest != record["manifest_sha256"]:
            raise ValueError(f"the manifest at {revision[:12]} is not the recorded checkpoint {iteration}")
        return manifest

    def download(self, record: dict, ckpt: CheckpointDir, should_abort: Callable[[], bool]) -> Manifest:
        """Fetch checkpoint record['iteration'] at exactly revision record['revision'] into L1, verified.

        What resumes: the staging folder is named after the revision and kept when an attempt
        fails or the worker is killed, and the client skips every file already complete there;
        files are fetched one at a time, so a kill loses at most the file in flight.  A partial
        file is never resumed (huggingface_hub 2.x writes it under a unique name and deletes it
        on failure, on both paths; 1.x's plain LFS path resumes it by Range): what a SIGKILL
        leaves of it (`*.incomplete`) is deleted and never counted as fetched.
        """
        return at_low_priority(lambda: self._download(record, ckpt, should_abort))

    def _download(self, record: dict, ckpt: CheckpointDir, should_abort: Callable[[], bool]) -> Manifest:
        from huggingface_hub import snapshot_download  # noqa: PLC0415
        iteration, revision = record["iteration"], record["revision"]
        base = f"{self.prefix}/ckpt"
        staging = self.staging_dir(ckpt, revision)
        os.makedirs(staging, exist_ok=True)
        for folder, _, names in os.walk(staging):  # a killed download's partial files: no attempt resumes them
            for name in names:
                if name.endswith(".incomplete"):
                    os.remove(os.path.join(folder, name))
        manifest = self.fetch_manifest(record, staging)
        check_free_space(ckpt.path, manifest.total_bytes - folder_bytes(staging),
                         f"fetching checkpoint {iteration} ({manifest.total_bytes} bytes)", self.cfg)
        snapshot_download(record["repo"], revision=revision, local_dir=staging, max_workers=1,
                          allow_patterns=[f"{base}/{rel}" for rel in manifest.files])
        for rel in sorted(manifest.files):
            target = os.path.join(ckpt.path, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(os.path.join(staging, base, rel), target)
        shutil.rmtree(staging, ignore_errors=True)
        if not ckpt.verify(manifest, should_abort):
            raise ValueError(f"checkpoint {iteration} from {revision[:12]} does not match its manifest")
        atomic_write(ckpt.manifest_path(iteration), manifest.to_bytes())
        return manifest

    @staticmethod
    def staging_dir(ckpt: CheckpointDir, revision: str) -> str:
        return os.path.join(ckpt.path, f"{HUB_STAGING_PREFIX}{revision}")

    @staticmethod
    def sweep_staging(ckpt: CheckpointDir, keep_revision: str | None) -> None:
        """Remove the staging folders of downloads that will not be resumed (other revisions)."""
        with contextlib.suppress(OSError):
            for name in os.listdir(ckpt.path):
                if name.startswith(HUB_STAGING_PREFIX) and name != f"{HUB_STAGING_PREFIX}{keep_revision}":
                    log("hub", f"removing the unfinished download {name} (not the recorded revision)")
                    shutil.rmtree(os.path.join(ckpt.path, name), ignore_errors=True)


def file_addition(path_in_repo: str, source: str, sha256: str) -> Any:
    """A CommitOperationAdd of a local file that carries its sha256 when the manifest has it.

    Sealing hashed every checkpoint file already: with huggingface_hub 2.x, whose operations
    hash lazily (`upload_info.is_hashed`), neither the LFS path (which hashes before its batch
    request) nor hf_xet (which takes a known sha256 instead of computing it while chunking)
    reads the file for its sha256 again, on the first attempt or any retry.  1.x hashes the
    whole file when the operation is made: there nothing is saved.  Safe because a sealed
    checkpoint's files never change (a changed one would not match its manifest on restore)."""
    from huggingface_hub import CommitOperationAdd  # noqa: PLC0415
    operation = CommitOperationAdd(path_in_repo, source)
    if sha256 and not getattr(operation.upload_info, "is_hashed", True):
        operation.upload_info.sha256 = bytes.fromhex(sha256)
    return operation


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(path) for name in names
               if os.path.isfile(os.path.join(folder, name)))


def check_free_space(path: str, needed: int, what: str, cfg: RunConfig) -> None:
    """Say plainly what is missing before a download fills the volume halfway."""
    free = shutil.disk_usage(path).free
    if free < needed:
        raise OSError(f"not enough free space in {path} for {what}: needs {needed / 1e9:.2f} GB more, "
                      f"{free / 1e9:.2f} GB free (the volume must hold (keep_last_checkpoints + 2) x one "
                      f"checkpoint: {cfg.keep_last_checkpoints + 2} here)")


class HubSync:
    """Uploads sealed checkpoints to the Hub on its own thread, so training never waits for it.

    Cadence: the newest sealed checkpoint every hf_sync_interval_seconds (milestones), and at
    once when asked (the final checkpoint, a SIGTERM).  A failure is reported to the commander
    (shown by `status`) and retried with backoff (2 s doubling to 1 min, or the Hub's
    Retry-After); the checkpoint being uploaded is protected from pruning meanwhile.
    """

    def __init__(self, store: HubStore, ckpt: CheckpointDir, cfg: RunConfig,
                 report: Callable[..., object], still_ours: Callable[[], bool]) -> None:
        self.store, self.ckpt, self.cfg = store, ckpt, cfg
        self.report, self.still_ours = report, still_ours
        self.epoch = 0
        self.synced: dict | None = None  # the last revision this lease recorded: {iteration, revision}
        self.maybe_recorded: list[dict] = []  # Hub records the commander may hold (their checkpoints stay)
        self.pending: int | None = None  # iteration being uploaded (never pruned meanwhile)
        self.failures = 0
        self.stuck = False  # the last attempt met an error a retry cannot fix
        self.next_attempt = math.inf
        # sync_now() was called and no attempt has started since: an upload running at that
        # moment (an older checkpoint) must not push the asked-for one to the next milestone
        self.requested = False
        self.trainer_stopped = False
        self.uploaded_path = os.path.join(ckpt.seal_dir, "hub_trajectories.json")
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._synced_changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def start(self, epoch: int, recorded: dict | None) -> None:
        self.epoch, self.synced, self.failures, self.trainer_stopped = epoch, recorded, 0, False
        self.maybe_recorded = [recorded] if recorded else []
        self.next_attempt = boottime() + self.cfg.hf_sync_interval_seconds
        # A new Event per thread: an earlier thread whose upload outlived stop() must still
        # see its own stop, or two threads would upload the same run side by side.
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(self._stop,), name="hub-sync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=0.5)  # an upload in flight finishes in the background
        self._thread = None

    def running(self) -> bool:
        return self._thread is not None

    def sync_now(self, trainer_stopped: bool = False) -> None:
        """Upload the newest sealed checkpoint now.  `trainer_stopped`: nothing writes any
        more, so trajectories count as finished without waiting for them to settle."""
        self.trainer_stopped = trainer_stopped
        with self._synced_changed:
            self.stuck = False  # the Hub gets one more chance, whatever it answered before
            self.requested = True
        self._wake.set()

    def protected(self) -> set[int]:
        return {self.pending} if self.pending is not None else set()

    def synced_iteration(self) -> int:
        return (self.synced or {}).get("iteration", -1)

    def trajectories_left(self) -> bool:
        """The trainer has stopped and trajectories it wrote are not on the Hub yet: those of
        its last seconds, too new for an upload that started while it ran (they had not
        settled), go up with the final checkpoint (again, if it is there already)."""
        return self.trainer_stopped and bool(self.finished_trajectories())

    def wait_synced(self, iteration: int, timeout: float) -> bool:
        """True once `iteration` is on the Hub (with every trajectory, once the trainer has
        stopped); False at the timeout, on losing the lease, or when an attempt after
        sync_now() met an error that a retry cannot fix."""
        give_up = boottime() + timeout
        with self._synced_changed:
            while self.synced_iteration() < iteration or self.trajectories_left():
                left = give_up - boottime()
                if left <= 0 or not self.still_ours() or (self.stuck and not self.requested):
                    return False
                self._synced_changed.wait(min(left, 1.0))
        return True

    def _run(self, stop: threading.Event) -> None:
        yield_cpu_to_the_trainer()
        while not stop.is_set():
            if not self.requested:
                self._wake.wait(max(0.0, min(self.next_attempt - boottime(), 60.0)))
                self._wake.clear()
            if stop.is_set() or (not self.requested and boottime() < self.next_attempt):
                continue
            with self._synced_changed:
                self.requested = False  # a sync_now() from here on asks for one more attempt
            try:
                newest = self.ckpt.newest_sealed()
                if newest is None or (newest.iteration <= self.synced_iteration() and not self.trajectories_left()):
                    self.next_attempt = boottime() + self.cfg.hf_sync_interval_seconds
                    continue
                self._upload(newest)
            except Exception as exc:  # noqa: BLE001  (this thread must outlive any surprise)
                log("hub", f"sync error: {type(exc).__name__}: {exc}; retrying in 60 s")
                self.pending, self.next_attempt = None, boottime() + 60

    def _upload(self, manifest: Manifest) -> None:
        self.pending = manifest.iteration
        trajectories = self.finished_trajectories()
        before = {path: file_version(path) for path in trajectories}
        message = (f"relay {self.cfg.run_id}: checkpoint {manifest.iteration} "
                   f"(epoch {self.epoch}, worker {self.cfg.worker_id})")
        started = boottime()
        try:
            revision = self.store.upload(self.ckpt, manifest, trajectories, self.synced, message, self.still_ours,
                                         self.maybe_recorded)
        except Exception as exc:  # any failure of the Hub or the network: report, back off, retry
            self.failures += 1
            error = hub_error_text(exc)
            if hub_error_is_permanent(exc):
                delay = HUB_STUCK_RETRY_SECONDS
                error += f"; a retry cannot fix this, next try in {delay / 60:.0f} min"
            else:
                delay = hub_retry_after(exc) or min(60.0, 2.0 ** self.failures)
            log("hub", f"upload of checkpoint {manifest.iteration} failed ({self.failures} in a row): {error}; "
                       f"retrying in {delay:.0f} s")
            self.report(sync_error=f"{error} ({self.failures} failures in a row)")
            with self._synced_changed:
                self.stuck = hub_error_is_permanent(exc)
                self._synced_changed.notify_all()
            self.next_attempt = boottime() + delay
            return
        if revision:
            log("hub", f"checkpoint {manifest.iteration} is {self.store.repo}@{revision} "
                       f"({manifest.total_bytes} bytes in {boottime() - started:.1f} s)")
            record = {"repo": self.store.repo, "revision": revision, "iteration": manifest.iteration,
                      "manifest_sha256": manifest.digest}
            acknowledged = self.report(hf=record, sync_error="")
            # Unanswered, the commander may or may not hold it: both stay protected until one is.
            self.maybe_recorded = [record] if acknowledged else [*self.maybe_recorded, record]
        with self._synced_changed:
            self.synced = {"iteration": manifest.iteration, "revision": revision or None}
            self.stuck = False
            self._synced_changed.notify_all()
        self.failures, self.pending = 0, None
        self.next_attempt = boottime() + self.cfg.hf_sync_interval_seconds
        # A file rewritten during the upload may have gone up half old: it stays "not uploaded".
        self.remember_uploaded({p: before[p] for p in trajectories if before[p] and file_version(p) == before[p]})

    # -- rollout trajectories ------------------------------------------------------------------

    def finished_trajectories(self) -> list[str]:
        """Trajectory files nobody writes any more that the Hub lacks as they are now: new ones
        and ones rewritten since their upload (after a resume slime writes a rollout's file
        again under the same name).  Hidden and .tmp files never count."""
        if not (self.cfg.mode == "rl" and self.cfg.save_rollout_trajectories):
            return []
        done = self.uploaded()
        found = []
        for folder, _, names in os.walk(self.cfg.rollout_dir):
            for name in names:
                path = os.path.join(folder, name)
                version = file_version(path)
                if name.startswith(".") or name.endswith(".tmp") or not version:
                    continue
                if done.get(os.path.relpath(path, self.cfg.run_dir)) == version:
                    continue
                if self.trainer_stopped or utc_now() - version[1] / 1e9 >= TRAJECTORY_SETTLE_SECONDS:
                    found.append(path)
        return sorted(found)

    def uploaded(self) -> dict[str, list[int]]:
        """Trajectories on the Hub: path in the run folder -> [size, mtime_ns] when uploaded."""
        try:
            with open(self.uploaded_path, encoding="utf-8") as handle:
                done = json.load(handle)
        except (OSError, ValueError):
            return {}
        return done if isinstance(done, dict) else {}  # an older relay's plain list: upload once more

    def remember_uploaded(self, versions: dict[str, list[int]]) -> None:
        if versions:
            done = self.uploaded()
            done.update({os.path.relpath(p, self.cfg.run_dir): v for p, v in versions.items()})
            atomic_write(self.uploaded_path, json.dumps(done, sort_keys=True).encode(), durable=False)


def yield_cpu_to_the_trainer() -> None:
    """Lower the calling thread's CPU priority (nice 10): an upload hashes and sends tens of GB,
    and the trainer's own CPU work (data loading, the GPU's feeding) must come first.  On Linux
    a thread's nice value is its own and the threads it starts inherit it (the client's hashing
    pool, hf_xet's workers), so the worker's other threads, lease renewals among them, keep
    their priority.  Elsewhere a thread id is no process id: nothing is changed."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HUB_THREAD_NICENESS)


def file_version(path: str) -> list[int]:
    """[size, mtime_ns] of a file ([] if it is gone): a rewrite changes it."""
    try:
        stat = os.stat(path)
    except OSError:
        return []
    return [stat.st_size, stat.st_mtime_ns]


def trajectory_path_in_repo(rel: str) -> str:
    """Where a trajectory file (its path in the run folder) goes in the repo: a subfolder per
    TRAJECTORIES_PER_FOLDER rollout ids (slime names each file after its rollout id), since the
    Hub rejects every commit once a folder holds 10,000 files.  A name without a number goes to
    one of 1,000 folders by its hash."""
    folder, name = os.path.split(rel)
    numbers = re.findall(r"\d+", name)
    if numbers:
        first = int(numbers[-1]) // TRAJECTORIES_PER_FOLDER * TRAJECTORIES_PER_FOLDER
        bucket = f"{first:08d}-{first + TRAJECTORIES_PER_FOLDER - 1:08d}"
    else:
        bucket = f"other-{int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 1000:03d}"
    return f"{folder}/{bucket}/{name}"


def git_blob_id(data: bytes) -> str:
    """The id git (and the Hub's tree listing) gives a regular file's content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def hub_status(exc: BaseException) -> int | None:
    return getattr(getattr(exc, "response", None), "status_code", None)


def hub_retry_after(exc: BaseException) -> float | None:
    """How long the Hub asked us to wait: Retry-After, or the reset time `t=N` of its RateLimit
    header (`"api";r=0;t=N`, on a 429); the longer of the two."""
    headers = getattr(getattr(exc, "response", None), "headers", None) or {}
    waits = []
    with contextlib.suppress(TypeError, ValueError):
        waits.append(float(headers.get("Retry-After")))
    reset = re.search(r"(?:^|;)\s*t=(\d+)", headers.get("RateLimit") or "")
    if reset:
        waits.append(float(reset.group(1)))
    return max(0.0, *waits) if waits else None


# How hf_xet words a refusal of its storage side (the CAS): its errors carry no HTTP response,
# only a type (PermissionError for an authentication failure) and a message such as "HTTP status
# client error (403 Forbidden)" (xet-core error.rs, as hf_xet 1.8 raises them).
XET_REFUSAL_RE = re.compile(r"\b(401|402|403)\b|unauthori[sz]ed|forbidden|quota|storage limit", re.IGNORECASE)


def hub_error_is_permanent(exc: BaseException) -> bool:
    """An answer a retry cannot change: a bad token or lost permission (401, 403), no payment or
    the storage quota (402, 403), no such repo (404), a limit of the repo such as 10,000 files
    per folder (400); from hf_xet, which has no status code, a PermissionError or a message
    saying the same.  A person must act; until then a try every HUB_STUCK_RETRY_SECONDS.
    Anything else from hf_xet (a dropped connection, a 5xx, a timeout) is transient."""
    status = hub_status(exc)
    if status is not None:
        return status in (400, 401, 402, 403, 404)
    return isinstance(exc, PermissionError) or bool(XET_REFUSAL_RE.search(str(exc)))


def hub_error_text(exc: BaseException) -> str:
    """A short, token-free description of a Hub failure: the Hub's own words when it sent some."""
    status = hub_status(exc)
    text = getattr(exc, "server_message", None) or (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    text = re.sub(r"hf_[A-Za-z0-9]{8,}", "hf_***", " ".join(text.split()))
    return f"HTTP {status}: {text}"[:300] if status else text[:300]


class HubPrefetch:
    """A standby's copy of the run's recorded Hub checkpoint, so that a takeover restores from
    its own disk instead of downloading (a 55 GB checkpoint is minutes of a GPU pod idling).

    Where: a folder of its own beside the checkpoint folder, on the same volume (handing it
    over is a rename), never the checkpoint folder itself, which may be a volume the holder
    is writing to.  What: only the newest recorded revision; an older copy is deleted before
    a newer one is fetched (a takeover would fetch the newer one anyway), and nothing is
    fetched while the volume has no room for the checkpoint's bytes.  How: one download at
    a time on its own thread, verified against its manifest (HubStore.download), a failure
    retried only after RETRY_SECONDS; the standby's requests to the commander never wait
    for it, and a standby has no other use for its bandwidth.
    """

    RETRY_SECONDS = 60.0

    def __init__(self, hub: HubStore, cfg: RunConfig, say: Callable[[str], None]) -> None:
        self.hub, self.say, self.cfg = hub, say, cfg
        self.root = os.path.join(cfg.run_dir, "prefetch", cfg.worker_id)  # this worker's alone
        self.dir = CheckpointDir(self.root, cfg.require_dataset_state)
        self.retry_at: dict[str, float] = {}  # revision -> boottime() before which it is not tried again
        self.fetching: dict | None = None
        self._thread: threading.Thread | None = None
        self._abandon = threading.Event()

    def holds(self, record: dict) -> Manifest | None:
        """The prefetched copy of `record`'s checkpoint, if it is here (sealed only once verified)."""
        manifest = self.dir.load_manifest(record["iteration"])
        return manifest if manifest is not None and manifest.digest == record["manifest_sha256"] else None

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def offer(self, record: dict, newest_here: int) -> None:
        """The commander's recorded revision, as a standby hears it: fetch it unless it is
        already here, no newer than the checkpoint folder's newest, or failed lately."""
        if (record.get("repo") != self.hub.repo or record["iteration"] <= newest_here or self.busy()
                or self.holds(record) is not None or boottime() < self.retry_at.get(record["revision"], 0.0)):
            return
        self.fetching, self._abandon = record, threading.Event()
        self._thread = threading.Thread(target=self._fetch, args=(record, self._abandon), name="hub-prefetch", daemon=True)
        self._thread.start()

    def _fetch(self, record: dict, abandon: threading.Event) -> None:
        iteration, where = record["iteration"], f"{record['repo']}@{record['revision'][:12]}"
        try:
            # Only the newest is kept (so an older copy's room counts), and whatever a killed
            # download left goes with it.  The download checks the room it needs itself.
            shutil.rmtree(self.root, ignore_errors=True)
            self.dir = CheckpointDir(self.root, self.cfg.require_dataset_state)
            self.say(f"standing by: prefetching checkpoint {iteration} from {where}")
            started = boottime()
            self.hub.download(record, self.dir, abandon.is_set)
            if not abandon.is_set():
                self.say(f"prefetched checkpoint {iteration} in {boottime() - started:.1f} s")
        except Exception as exc:  # any Hub, network or disk failure: a takeover downloads as before
            if not abandon.is_set():
                self.say(f"prefetching checkpoint {iteration} failed ({hub_error_text(exc)}); "
                         f"trying again in {self.RETRY_SECONDS:.0f} s")
                self.retry_at[record["revision"]] = boottime() + self.RETRY_SECONDS
        if abandon.is_set():  # a takeover moved on without this copy: its room is the holder's now
            shutil.rmtree(self.root, ignore_errors=True)

    def hand_over(self, record: dict | None, ckpt: CheckpointDir, abort: Callable[[], bool]) -> Manifest | None:
        """At a takeover: move the prefetched copy of `record` into `ckpt`, sealed (waiting
        for a prefetch of that very revision to finish: it is the download a restore would
        start); the checkpoint moved, or None."""
        if record and self.busy() and self.fetching is not None and self.fetching["revision"] == record["revision"]:
            self.say(f"waiting for the prefetch of checkpoint {record['iteration']} to finish")
            while self.busy() and not abort():
                self._thread.join(0.2)
        self._abandon.set()  # a prefetch of an older revision is of no use any more
        manifest = self.holds(record) if record and not self.busy() else None
        newest = ckpt.sealed_iterations()
        if manifest is None or (newest and newest[-1] >= manifest.iteration):
            self.discard()
            return None
        # An unsealed folder of this iteration is a dead holder's unfinished save (its trainer
        # is gone before the commander re-grants): this verified copy replaces it.
        ckpt.remove(manifest.iteration)
        try:
            for rel in sorted(manifest.files):
                target = os.path.join(ckpt.path, rel)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.replace(os.path.join(self.dir.path, rel), target)
            atomic_write(ckpt.manifest_path(manifest.iteration), manifest.to_bytes())
        except OSError as exc:  # unsealed, what moved is overwritten by the Hub download the restore starts
            self.say(f"cannot move the prefetched checkpoint {manifest.iteration} into {ckpt.path}: {exc.strerror or exc}")
            return None
        self.discard()
        return manifest

    def discard(self) -> None:
        """Free the disk of a copy no takeover will use (a holder's volume needs the room)."""
        if not self.busy():
            shutil.rmtree(self.root, ignore_errors=True)


# -- the nodes of a cluster: shards gathered to node 0, the restored checkpoint spread ------
#
# On N nodes every rank writes its own shard files into iter_N/ on ITS node's disk, and every
# node needs the COMPLETE checkpoint to resume (docs/worker.md, "Several nodes").  Each node's
# worker serves its checkpoint folder to the other nodes of the run on node_ip:node_port:
#   GET /shards/N      the files of iteration N on this node, with size and SHA-256
#   GET /restored/E    (node 0) the checkpoint node 0 put in place for epoch E: its manifest
#   GET /file/REL      one file, streamed
# Node 0 gathers every member's shards of N once its tracker says N (rank 0 writes the tracker
# after a barrier, so every shard is whole by then), seals the complete checkpoint and makes ONE
# Hub commit of it: the single-node seal, verify and upload path, unchanged, and node 0 then
# holds a complete copy from which new members restore over the cluster's network (10-400 Gb/s)
# instead of N downloads from the Hub.  Requests are signed with the shared secret as the
# commander's are, JSON answers signed back; a file is believed only when its size and SHA-256
# match the signed listing or manifest that named it.

NODE_FILE_CHUNK = 1 << 20


class NodeCheckpointServer(http.server.ThreadingHTTPServer):
    """This node's checkpoint folder, read-only, for the other nodes of its run."""

    daemon_threads = True

    def __init__(self, host: str, port: int, ckpt: CheckpointDir, secret: str) -> None:
        self.ckpt, self.secret = ckpt, secret
        self.nonces = NonceCache()
        self.restored: dict | None = None  # node 0: {"epoch", "iteration", "files"} once its restore is done
        self._hashes: dict[tuple[str, int, int], str] = {}  # (file, size, mtime_ns) -> SHA-256: hashed once
        try:
            super().__init__((host, port), NodeCheckpointHandler)
        except OSError as exc:
            raise UserError(f"cannot serve this node's checkpoints on {host}:{port} (node_ip, node_port): "
                            f"{exc.strerror or exc}") from None
        threading.Thread(target=self.serve_forever, name="node-checkpoints", daemon=True).start()

    def listing(self, iteration: int) -> dict[str, list]:
        """The files of iteration `iteration` here; a dataset-state file only once settled (slime
        writes it in place, not atomically)."""
        files = {}
        for rel in self.ckpt.files_of(iteration):
            path = os.path.join(self.ckpt.path, rel)
            with contextlib.suppress(OSError):
                st = os.stat(path)
                if rel == dataset_state_relpath(iteration) and utc_now() - st.st_mtime < SEAL_SETTLE_SECONDS:
                    continue
                key = (rel, st.st_size, st.st_mtime_ns)
                if key not in self._hashes:
                    self._hashes[key] = sha256_file(path) or ""
                files[rel] = [st.st_size, self._hashes[key]]
        return files


class NodeCheckpointHandler(http.server.BaseHTTPRequestHandler):
    server: NodeCheckpointServer
    timeout = 30

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        secret = self.server.secret
        if secret:
            verdict = verify_request({ROLE_SHARED: secret}, self.headers, "GET", self.path, b"", self.server.nonces)
            if verdict.problem:
                return self.answer(401, {"error": verdict.problem}, "")
        nonce = self.headers.get("X-Relay-Nonce", "")
        parts = self.path.split("/", 2)
        if len(parts) == 3 and parts[1] == "shards" and parts[2].isdigit():
            return self.answer(200, {"files": self.server.listing(int(parts[2]))}, nonce)
        if len(parts) == 3 and parts[1] == "restored" and parts[2].isdigit():
            restored = self.server.restored
            if restored is None or restored["epoch"] != int(parts[2]):
                return self.answer(404, {"error": f"node 0 has not restored epoch {parts[2]} yet"}, nonce)
            return self.answer(200, restored, nonce)
        if len(parts) == 3 and parts[1] == "file":
            return self.send_checkpoint_file(urllib.parse.unquote(parts[2]))
        return self.answer(404, {"error": "no such path"}, nonce)

    def answer(self, status: int, body: dict, nonce: str) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if nonce and self.server.secret:
            self.send_header("X-Relay-Response-Signature", response_signature(self.server.secret, nonce, status, data))
        self.end_headers()
        self.wfile.write(data)

    def send_checkpoint_file(self, rel: str) -> None:
        root = os.path.realpath(self.server.ckpt.path)
        path = os.path.realpath(os.path.join(root, rel))
        if not path.startswith(root + os.sep) or not os.path.isfile(path):
            return self.answer(404, {"error": "no such checkpoint file"}, "")
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            while chunk := handle.read(NODE_FILE_CHUNK):
                self.wfile.write(chunk)


class NodePeer:
    """Another node of this run, as its checkpoint server answers."""

    def __init__(self, address: str, secret: str) -> None:
        self.address, self.secret = address, secret
        self.client = CommanderClient(f"http://{address}", secret, timeout=30)

    def ask(self, path: str) -> dict | None:
        """A signed JSON answer; None for 'not there (yet)'.  OSError when the node does not answer."""
        try:
            reply = self.client.get(path)
        except CommanderUnreachable as exc:  # (the client's words name a commander)
            raise OSError(f"no answer from the node at {self.address}: {str(exc).rsplit(': ', 1)[-1]}") from None
        return reply.body if reply.status == 200 else None

    def fetch(self, rel: str, dest: str, size: int, digest: str, should_abort: Callable[[], bool]) -> None:
        """Copy one file here (through a .part file), believed only with the expected size and
        SHA-256; OSError when it cannot be had."""
        path = "/file/" + urllib.parse.quote(rel)
        host, _, port = self.address.rpartition(":")
        connection = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=30)
        part = dest + ".part"
        try:
            connection.request("GET", path, headers=signed_headers(self.secret, "GET", path, b"") if self.secret else {})
            answer = connection.getresponse()
            if answer.status != 200:
                raise OSError(f"{self.address} answered {answer.status} for {rel}")
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            hashed, written = hashlib.sha256(), 0
            with open(part, "wb") as handle:
                while chunk := answer.read(NODE_FILE_CHUNK):
                    if should_abort():
                        raise OSError("stopped")
                    handle.write(chunk)
                    hashed.update(chunk)
                    written += len(chunk)
            if written != size or hashed.hexdigest() != digest:
                raise OSError(f"{rel} from {self.address} is not the file its listing named")
            os.replace(part, dest)
        except (http.client.HTTPException, ValueError) as exc:
            raise OSError(f"{rel} from {self.address}: {exc}") from None
        finally:
            connection.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(part)

    def copy_files(self, files: dict, ckpt: CheckpointDir, should_abort: Callable[[], bool]) -> int:
        """Bring every listed file here that is not here already with that size; bytes copied."""
        copied = 0
        for rel, (size, digest) in sorted(files.items()):
            dest = os.path.join(ckpt.path, rel)
            with contextlib.suppress(OSError):
                if os.path.getsize(dest) == size and sha256_file(dest, should_abort) == digest:
                    continue
            self.fetch(rel, dest, size, digest, should_abort)
            copied += size
        return copied


###############################################################################
# 7. Trainer process and watchdog #############################################
###############################################################################
#
# Finding everything a trainer started, whatever it did to its session, name or environment.
# A process group misses what Ray starts in a new session; an environment tag misses what
# renames itself with setproctitle (Ray's dashboard and agents, SGLang's servers), because
# that overwrites what /proc/PID/environ shows.  So a trainer is found as a process TREE:
#
#   - the worker is a child subreaper (prctl PR_SET_CHILD_SUBREAPER): a descendant whose
#     parent exits (setsid + double fork, `ray start` leaving its daemons) is reparented to
#     the worker, not to init, so while the worker lives every process the trainer started
#     is a descendant of the worker (its watchdog's subtree aside);
#   - where a cgroup v2 can be made, the trainer joins its own cgroup before its first
#     exec, and every descendant is born inside it: `cgroup.kill` ends them all atomically,
#     forks in flight included, for whoever holds the path (worker or watchdog);
#   - after the worker's death its children are reparented away (to init or an outer
#     subreaper), so the watchdog keeps its own record: while armed (and without a cgroup)
#     it notes every TREE_RECORD_SECONDS the pids (with start times, against reuse) below
#     the worker; on the worker's death it kills those still alive and everything below
#     them, plus the cgroup, the trainer's group and every process still carrying the
#     RELAY_TRAINER_TAG.  What only this record
#     could miss: a process started in the last TREE_RECORD_SECONDS before the worker died,
#     whose parent also exited in that time, that renamed itself, on a pod without a cgroup.
#
# Killing: first SIGSTOP every member and look again until no new one appears (a stopped
# process cannot fork or exit, so no child escapes to init between looking and killing), then
# SIGKILL them all.

TRAINER_TAG_ENV = "RELAY_TRAINER_TAG"
# slime's real lines carry prefixes (logging's `[time] train_metric_utils.py:135 - `, Ray's
# `(MegatronTrainRayActor pid=N) `), so every pattern is searched anywhere in a line.
# `rollout N: {` gives the iteration (= rollout id); slime's `step K: {` is a train step
# (K = rollout id x steps per rollout + step in rollout): it gives the loss, never the step.
# The lookbehinds keep `critic-step K:` (a PPO critic's value loss) and `train/rollout` out.
ROLLOUT_RE = re.compile(r"(?<![\w/-])rollout (\d+): \{")
STEP_RE = re.compile(r"(?<![\w/-])step (\d+)(: \{|(?:/\d+)?\b)")
LOSS_RE = re.compile(r"(?:'train/loss':|(?<![\w/'\"-])loss\b['\"]?\s*[:=]?)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)")
# slime waits for its placement group forever and says so every 30 s (slime/ray/placement_group.py).
PLACEMENT_WAIT_RE = re.compile(r"Waiting for placement group of (\d+) GPUs.*?(\d+(?:\.\d+)?) GPUs registered")
NO_CHECKPOINT_WARNING_SECONDS = 3600.0
WATCHDOG_MAX_SLEEP_SECONDS = 1.0


def processes_with_env(entry: str) -> list[int]:
    """Pids (other than ours) whose environment holds `entry` ("NAME=value")."""
    needle = entry.encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as handle:
                if needle in handle.read().split(b"\0"):
                    found.append(int(name))
        except OSError:  # gone, or not ours to read
            continue
    return found


def processes_tagged(tag: str) -> list[int]:
    return processes_with_env(f"{TRAINER_TAG_ENV}={tag}")


PR_SET_CHILD_SUBREAPER = 36
TREE_RECORD_SECONDS = 2.0  # how often the watchdog notes the pids below the worker (~4 ms of CPU each)
STALE_CGROUP_SECONDS = 60.0
LEFTOVER_TERM_SECONDS = 1.0  # after the launcher ended: SIGTERM to what is left, this long, then SIGKILL


def become_child_subreaper() -> None:
    _prctl(PR_SET_CHILD_SUBREAPER, 1)


@dataclass
class ProcInfo:
    ppid: int
    pgid: int
    started: int  # clock ticks after boot: with the pid, names one process even after pid reuse
    zombie: bool


def process_table() -> dict[int, ProcInfo]:
    """Every process in /proc (our pid namespace) with its parent, group and start time."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(b")") + 2:].split()  # the name in parentheses may hold spaces
        table[int(name)] = ProcInfo(int(fields[1]), int(fields[2]), int(fields[19]), fields[0] == b"Z")
    return table


def descendants(table: dict[int, ProcInfo], roots: set[int]) -> set[int]:
    """Every pid below `roots` in `table` (roots excluded)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for pid, info in table.items():
        children[info.ppid].append(pid)
    found: set[int] = set()
    pending = list(roots)
    while pending:
        for child in children.get(pending.pop(), ()):
            if child not in found and child not in roots:
                found.add(child)
                pending.append(child)
    return found


def cgroup2_home() -> str | None:
    """This process's own cgroup v2 folder, when the unified hierarchy is mounted here."""
    try:
        with open("/proc/self/cgroup") as handle:
            path = next((line[3:].strip() for line in handle if line.startswith("0::")), None)
        with open("/proc/self/mountinfo") as handle:
            mounts = [line.split() for line in handle]
    except OSError:
        return None
    for fields in mounts:
        if path is not None and fields[fields.index("-") + 1] == "cgroup2":
            return os.path.join(fields[4], path.lstrip("/"))
    return None


def make_trainer_cgroup(tag: str) -> str:
    """A fresh cgroup for one trainer, or "" where none can be made (read-only /sys/fs/cgroup
    in most containers, cgroup v1 only, kernels before 5.14 without cgroup.kill), or when
    RELAY_TRAINER_CGROUP=off (a host whose own cgroup manager must not see foreign folders)."""
    home = None if os.environ.get("RELAY_TRAINER_CGROUP") == "off" else cgroup2_home()
    if home is None:
        return ""
    # Empty ones a minute old were left by a worker killed together with its watchdog (a live
    # trainer's is never empty, and a new one is joined within milliseconds of its creation).
    with contextlib.suppress(OSError):
        for name in os.listdir(home):
            stale = os.path.join(home, name)
            if name.startswith("relay-trainer-") and utc_now() - os.stat(stale).st_mtime > STALE_CGROUP_SECONDS:
                remove_cgroup(stale)
    path = os.path.join(home, f"relay-trainer-{tag}")
    try:
        os.mkdir(path)
    except OSError:
        return ""
    if not os.path.exists(os.path.join(path, "cgroup.kill")):
        remove_cgroup(path)
        return ""
    return path


def cgroup_pids(path: str) -> set[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as handle:
            return {int(word) for word in handle.read().split()}
    except (OSError, ValueError):
        return set()


def remove_cgroup(path: str) -> None:
    with contextlib.suppress(OSError):
        os.rmdir(path)  # refused while a process is inside: then it stays until the next stop


@dataclass
class TrainerTree:
    """Every process one trainer started (see the section comment for how each is found)."""

    tag: str
    owner: int  # the worker, a child subreaper: the trainer's processes are below it
    exclude: set[int]  # the owner's children that are not the trainer's (its watchdog)
    pgid: int | None = None
    cgroup: str = ""
    recorded: dict[int, int] = field(default_factory=dict)  # pid -> start time, as last seen
    owner_started: int = -1  # the owner's start time: a dead worker's reused pid is not the owner

    def __post_init__(self) -> None:
        owner = process_table().get(self.owner)
        self.owner_started = owner.started if owner else -1

    def members(self, thorough: bool = True, table: dict[int, ProcInfo] | None = None) -> set[int]:
        """Live processes of the trainer; `thorough` adds the environment-tag scan (slower)."""
        table = process_table() if table is None else table
        me = os.getpid()
        found = cgroup_pids(self.cgroup) if self.cgroup else set()
        roots = {pid for pid, started in self.recorded.items() if pid in table and table[pid].started == started}
        owner = table.get(self.owner)
        if owner is not None and owner.started == self.owner_started and not owner.zombie:
            found |= descendants(table, {self.owner}) - descendants(table, self.exclude) - self.exclude
        found |= roots | descendants(table, roots)
        if self.pgid:
            found |= {pid for pid, info in table.items() if info.pgid == self.pgid}
        if thorough:
            found |= set(processes_tagged(self.tag))
        found |= descendants(table, found)
        return {pid for pid in found if pid != me and pid in table and not table[pid].zombie}

    def record(self) -> None:
        """Note the members and their start times (the watchdog, for after the owner's death).
        Not needed with a cgroup: cgroup.kill finds them all."""
        if not self.cgroup:
            table = process_table()
            self.recorded = {pid: table[pid].started for pid in self.members(False, table)}

    def signal_all(self, sig: int) -> int:
        """Send `sig` to every member once; how many there were."""
        members = self.members()
        for pid in members:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        return len(members)

    def kill(self, within: float = 5.0) -> bool:
        """SIGKILL every member, none escaping by fork or reparenting; True once none is left."""
        give_up = boottime() + within
        if self.cgroup:
            with contextlib.suppress(OSError), open(os.path.join(self.cgroup, "cgroup.kill"), "w") as handle:
                handle.write("1")
        stopped: set[int] = set()
        while boottime() < give_up:
            fresh = self.members() - stopped
            if not fresh:
                break
            for pid in fresh:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGSTOP)
            stopped |= fresh
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        while (left := self.members()) and boottime() < give_up:
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)  # killed processes need a moment to leave the process table
        return not left

    def remove_cgroup(self, within: float, reap: Callable[[], None] = lambda: None) -> None:
        """Remove the trainer's cgroup once it can be: the kernel refuses while a process that
        was inside is dead but not yet reaped (`reap`: the worker's own adopted orphans)."""
        give_up = boottime() + within
        while self.cgroup:
            reap()
            try:
                os.rmdir(self.cgroup)
            except FileNotFoundError:
                pass
            except OSError:
                if boottime() < give_up:
                    time.sleep(0.02)
                    continue
            return


def reap_adopted_orphans(keep: set[int]) -> None:
    """Reap the exited processes a child subreaper inherits (the trainer's, whose parents
    exited first), so they do not pile up as zombies over a long run.  `keep`: children
    whose exit status someone else waits for (the launcher's Popen, the watchdog)."""
    children: set[int] = set()
    with contextlib.suppress(OSError):  # our children, from the few threads we have: cheap
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children") as handle:
                children |= {int(word) for word in handle.read().split()}
    for pid in children - keep:
        try:
            with open(f"/proc/{pid}/stat", "rb") as handle:
                zombie = handle.read().rsplit(b") ", 1)[1][:1] == b"Z"
        except (OSError, IndexError):
            continue
        if zombie:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


def watchdog_loop(commands: int) -> int:
    """The watchdog: kill the armed trainer's tree when its lease deadline passes or the worker dies.

    One watchdog serves a worker for its whole life.  The worker feeds it through a pipe
    whose write end only the worker holds: `arm TAG DEADLINE` (a trainer is about to start),
    `pgid N` (its process group), `cgroup PATH` (its cgroup, when one was made), `deadline T`
    (CLOCK_BOOTTIME seconds, after each renewal), `disarm` (the trainer is stopped).  End of
    file means the worker is gone, even while it is an unreaped zombie, and an unrenewed
    lease cannot be trusted: kill at once.  A stopped (SIGSTOP) worker keeps the pipe open
    but stops sending deadlines, so the deadline fires.
    """
    set_process_name("relay-watchdog")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # only the worker (or its death) ends the watch
    worker = os.getppid()  # forked or spawned by the worker
    tree: TrainerTree | None = None
    deadline, next_record = math.inf, 0.0
    pending = b""
    while True:
        if tree is not None and boottime() >= deadline:
            clean = tree.kill()
            tree.remove_cgroup(1.0)  # its processes are the worker's to reap (or init's): they may linger
            log("watchdog", f"the lease deadline passed: killed the trainer's process tree{'' if clean else ' (some processes resisted)'}")
            tree, deadline = None, math.inf
        if tree is not None and boottime() >= next_record:
            tree.record()
            next_record = boottime() + TREE_RECORD_SECONDS
        # Asleep until the deadline, the next record or a command (idle: until told).  Capped
        # at a second because select's clock stops while the machine is suspended and
        # CLOCK_BOOTTIME does not: a deadline that passed during a suspend is seen within a
        # second of waking.
        timeout = (min(max(min(deadline, next_record) - boottime(), 0.0), WATCHDOG_MAX_SLEEP_SECONDS)
                   if tree is not None else None)
        ready, _, _ = select.select([commands], [], [], timeout)
        if not ready:
            continue
        chunk = os.read(commands, 4096)
        if not chunk:
            if tree is not None:
                clean = tree.kill()
                tree.remove_cgroup(1.0)
                log("watchdog", f"the worker died: killed the trainer's process tree{'' if clean else ' (some processes resisted)'}")
            return 0
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            words = line.decode(errors="replace").split()
            if words[:1] == ["arm"] and len(words) == 3:
                tree = TrainerTree(words[1], worker, {os.getpid()})
                deadline, next_record = float(words[2]), 0.0
            elif words[:1] == ["pgid"] and len(words) == 2 and tree is not None:
                tree.pgid = int(words[1])
            elif words[:1] == ["cgroup"] and len(words) >= 2 and tree is not None:
                tree.cgroup = line.decode(errors="replace").split(" ", 1)[1]
            elif words[:1] == ["deadline"] and len(words) == 2 and tree is not None:
                deadline = float(words[1])
            elif words[:1] == ["disarm"]:
                tree, deadline = None, math.inf


class Watchdog:
    """The worker's handle on its watchdog process.

    It is forked once, before the worker starts any thread, so it costs only the pages it
    writes (copy-on-write) instead of a second interpreter.  A replacement for a watchdog
    that died is started by exec instead (`relay.py watchdog`): forking a process that runs
    threads could deadlock the child.
    """

    def __init__(self, pid: int, commands: int) -> None:
        self.pid = pid
        self.commands = commands
        os.set_blocking(commands, False)  # a stopped watchdog must never block renewals
        self._lock = threading.Lock()
        self._exited = False

    @classmethod
    def fork(cls) -> "Watchdog":
        assert threading.active_count() == 1, "fork the watchdog before starting threads"
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the watchdog
            code = 1
            try:
                os.close(write_end)
                os.setsid()  # out of the worker's group: a terminal's Ctrl-C or killpg misses it
                code = watchdog_loop(read_end)
            finally:
                os._exit(code)
        os.close(read_end)
        return cls(pid, write_end)

    @classmethod
    def spawn(cls) -> "Watchdog":
        read_end, write_end = os.pipe()
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "relay.py"), "watchdog"], stdin=read_end,
                                start_new_session=True, close_fds=True)
        os.close(read_end)
        return cls(proc.pid, write_end)

    def _send(self, line: str) -> None:
        with self._lock, contextlib.suppress(OSError):
            os.write(self.commands, (line + "\n").encode())

    def arm(self, tag: str, deadline: float) -> None:
        self._send(f"arm {tag} {deadline:.3f}")

    def watch(self, pgid: int, cgroup: str) -> None:
        self._send(f"pgid {pgid}")
        if cgroup:
            self._send(f"cgroup {cgroup}")

    def extend(self, deadline: float) -> None:
        self._send(f"deadline {deadline:.3f}")

    def disarm(self) -> None:
        self._send("disarm")

    def alive(self) -> bool:
        if not self._exited:
            try:
                self._exited = os.waitpid(self.pid, os.WNOHANG)[0] == self.pid
            except ChildProcessError:
                # Already reaped: subprocess reaps the spawned watchdog's discarded Popen at the
                # next Popen (a trainer restart).  Reading that as "alive" would leave the
                # trainer unguarded, so it counts as exited (and is replaced).
                self._exited = True
        return not self._exited


class Progress:
    """What the trainer said lately: step, loss, when it last advanced, the last lines (bounded).

    The step reported is the checkpoint iteration where the trainer says it: slime's
    `rollout N: {` lines (iteration = rollout id); otherwise `step N` (the mock's
    `step N/M loss X`).  Loss: slime's `'train/loss': X` in `step K: {...}`, or `loss X`.
    Output alone is not progress: slime waiting for GPUs logs every 30 s while nothing trains.
    """

    def __init__(self) -> None:
        self.step = 0
        self.counts_rollouts = False
        self.loss: float | None = None
        self.last_advance = boottime()  # a new step or rollout (the worker adds new checkpoints)
        self.placement_wait = ""  # slime's last "waiting for a placement group" line, until a rollout
        self.unsent_lines: list[str] = []
        self.unsent_losses: list[list] = []  # [step, loss] of every step printed since the last renewal
        self._losses_seen = 0  # since the last renewal; every `_loss_stride`-th is kept
        self._loss_stride = 1
        self._lock = threading.Lock()

    def advance_to(self, step: int) -> None:
        if step > self.step:
            self.step = step
            self.last_advance = boottime()

    def observe(self, line: str) -> None:
        rollout = ROLLOUT_RE.search(line)
        if rollout:
            self.counts_rollouts = True
            self.placement_wait = ""
            self.advance_to(int(rollout.group(1)))
        match = STEP_RE.search(line)
        point = None  # the loss curve's x is the train step (slime: several per rollout)
        if match:
            if not self.counts_rollouts and not match.group(2).startswith(":"):
                self.advance_to(int(match.group(1)))
            loss = LOSS_RE.search(line, match.end())
            if loss:
                with contextlib.suppress(ValueError):
                    self.loss = float(loss.group(1))
                    if math.isfinite(self.loss):
                        point = [int(match.group(1)), self.loss]
        waiting = PLACEMENT_WAIT_RE.search(line)
        if waiting:
            self.placement_wait = (f"waiting for a placement group of {waiting.group(1)} GPUs, "
                                   f"{float(waiting.group(2)):g} registered with Ray")
        with self._lock:
            self.unsent_lines.append(line[:500])
            del self.unsent_lines[:-20]
            if point is not None:
                self._add_loss_point(point)

    def _add_loss_point(self, point: list) -> None:
        """Bounded per renewal and evenly spaced: when more steps are printed than a renewal
        carries, every other point goes and from then on only every (doubled) stride-th is kept."""
        self._losses_seen += 1
        if self._losses_seen % self._loss_stride == 0:
            self.unsent_losses.append(point)
            if len(self.unsent_losses) > MAX_LOSS_POINTS_PER_RENEWAL:
                self.unsent_losses = self.unsent_losses[1::2]
                self._loss_stride *= 2

    def take_lines(self) -> list[str]:
        with self._lock:
            lines, self.unsent_lines = self.unsent_lines, []
        return lines

    def take_losses(self) -> list[list]:
        with self._lock:
            losses, self.unsent_losses = self.unsent_losses, []
            self._losses_seen, self._loss_stride = 0, 1
        return losses


class TrainerProcess:
    """The trainer black box: its own session (and cgroup, where one can be made), output
    passed through line by line."""

    # Joins the cgroup before exec, so the launcher's first child is already born inside it,
    # and says whether it could (a cgroup we may create but not move into, as without
    # delegation, must not be trusted to hold the trainer) on a pipe handed over as its stdin:
    # fd 0, because dash (/bin/sh on Debian and Ubuntu) takes only single-digit descriptors in
    # a redirection, and a worker holding ten open files would pass a pipe numbered 10 or more.
    JOIN_CGROUP = ('if { echo $$ > "$0/cgroup.procs"; } 2>/dev/null; then echo joined >&0; fi; '
                   'exec "$@" </dev/null')

    def __init__(self, argv: list[str], env: dict[str, str], progress: Progress, cwd: str, watchdog_pid: int,
                 on_exit: Callable[[], None]) -> None:
        tag = env[TRAINER_TAG_ENV]
        self.on_exit = on_exit  # the worker sleeps until something happens: this is one
        cgroup = make_trainer_cgroup(tag)
        joined_r, joined_w = os.pipe() if cgroup else (-1, -1)
        if cgroup:
            argv = ["sh", "-c", self.JOIN_CGROUP, cgroup, *argv]
        try:
            self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=joined_w if cgroup else subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                         close_fds=True)
        finally:
            if cgroup:
                os.close(joined_w)
        if cgroup:
            with os.fdopen(joined_r, "rb") as joined:  # answered before the trainer's first command
                if joined.read() != b"joined\n":
                    remove_cgroup(cgroup)
                    cgroup = ""
        self.tree = TrainerTree(tag, os.getpid(), {watchdog_pid}, pgid=self.proc.pid, cgroup=cgroup)
        self.launcher_exited = threading.Event()
        self.exited = threading.Event()
        pumps = [threading.Thread(target=self._pump, args=(pipe, out, progress), daemon=True)
                 for pipe, out in ((self.proc.stdout, sys.stdout), (self.proc.stderr, sys.stderr))]
        for pump in pumps:
            pump.start()
        threading.Thread(target=self._wait, args=(pumps,), daemon=True).start()

    @staticmethod
    def _pump(pipe: Any, out: Any, progress: Progress) -> None:
        for raw in iter(pipe.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            progress.observe(line)
            with contextlib.suppress(OSError, ValueError):
                out.write(f"[trainer] {line}\n")
                out.flush()
        pipe.close()

    def _wait(self, pumps: list[threading.Thread]) -> None:
        self.proc.wait()
        self.launcher_exited.set()
        for pump in pumps:
            pump.join(timeout=2)
        self.exited.set()
        self.on_exit()

    def exit_code(self) -> int | None:
        return self.proc.returncode if self.exited.is_set() else None

    def kill(self) -> None:
        """SIGKILL everything the trainer started, now (the lease is gone)."""
        self.tree.kill()

    def stop(self, grace: float, whole_group: bool) -> None:
        """Stop within `grace` seconds: the launcher first, then whatever is left.

        A launch script (`whole_group` false) gets SIGTERM alone: its trap runs slime's own
        stop step against a Ray cluster that nobody else is signalling yet (Ray's daemons
        share its process group; a cluster dying at the same moment makes that step hang, and
        the daemons outlive a SIGTERM by 6-15 s).  A user's trainer_command gets it as a group
        (`bash -c` dies at once; its children deserve the grace).  Then SIGTERM to what is
        left (Ray's daemons, the `ray job submit` client, SGLang servers), at most
        LEFTOVER_TERM_SECONDS, and SIGKILL until nothing is left.
        """
        began = boottime()
        give_up = began + grace
        group = self.tree.pgid or self.proc.pid
        with contextlib.suppress(ProcessLookupError, PermissionError):  # once: a second TERM cuts a trap short
            if whole_group:
                os.killpg(group, signal.SIGTERM)
            else:
                os.kill(self.proc.pid, signal.SIGTERM)
        self.launcher_exited.wait(grace)
        while whole_group and boottime() < give_up and any(
                info.pgid == group and not info.zombie for info in process_table().values()):
            time.sleep(0.05)
        launcher_seconds = boottime() - began
        left = self.tree.signal_all(signal.SIGTERM)
        if left:
            leftovers_until = min(give_up, boottime() + LEFTOVER_TERM_SECONDS)
            while boottime() < leftovers_until and self.tree.members(thorough=False):
                time.sleep(0.05)
        self.kill()
        log("trainer", f"stopped in {boottime() - began:.1f} s: the launcher took {launcher_seconds:.1f} s to end, "
                       f"then {left} processes were left to end")
        self.exited.wait(5)


def trainer_argv(cfg: RunConfig) -> list[str]:
    if cfg.trainer_command:
        return ["bash", "-c", cfg.trainer_command]
    return ["bash", os.path.join(HERE, f"launch_{cfg.mode}.sh")]


def trainer_environment(cfg: RunConfig, epoch: int, resume_iteration: int | None, ckpt_dir: str,
                        tag: str, gpus: int | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RELAY_SHARED_SECRET"}
    for name, value in USER_HUB_ENVIRONMENT.items():  # the trainer's Hub client is the user's, not relay's
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    env.update(cfg.env)
    pattern = os.path.join(cfg.rollout_dir, cfg.rollout_trajectory_pattern)
    keep_rollouts = cfg.mode == "rl" and cfg.save_rollout_trajectories
    # Plain words (the config refuses paths that would need quoting): slime scripts expand
    # $RELAY_SLIME_ARGS unquoted, and quote characters would reach slime literally.
    slime_args = f"--load {ckpt_dir} --save {ckpt_dir}"
    if keep_rollouts:
        slime_args += f" --save-debug-rollout-data {pattern}"
    env.update({
        "RELAY_RUN_ID": cfg.run_id,
        "RELAY_WORKER_ID": cfg.worker_id,
        "RELAY_MODE": cfg.mode,
        "RELAY_LEASE_EPOCH": str(epoch),
        "RELAY_CKPT_DIR": ckpt_dir,
        "RELAY_RESUME_STEP": "" if resume_iteration is None else str(resume_iteration),
        "RELAY_ROLLOUT_DIR": cfg.rollout_dir,
        "RELAY_ROLLOUT_PATTERN": pattern if keep_rollouts else "",
        "RELAY_SLIME_ARGS": slime_args,
        "RELAY_PYTHON": sys.executable,
        # What `nvidia-smi -L` lists (0 when it lists none): slime's scripts size `ray start
        # --num-gpus` and `--actor-num-gpus-per-node` from it, so a command never hard-codes
        # a count that a smaller pod would not have.
        "RELAY_NUM_GPUS": str(gpus or 0),
        # Where this node stands in the run (docs/worker.md, "Several nodes"); one node: 0 of 1.
        "RELAY_NODE_RANK": str(cfg.node_rank),
        "RELAY_NUM_NODES": str(cfg.nodes),
        "RELAY_NODE_IP": cfg.node_ip or "127.0.0.1",
        "RELAY_MASTER_ADDR": cfg.master_addr or cfg.node_ip or "127.0.0.1",
        "RELAY_WAIT_FOR_NODES": f"{sys.executable} {os.path.join(HERE, 'relay.py')} wait-for-nodes",
        TRAINER_TAG_ENV: tag,
    })
    if cfg.nodes > 1:  # slime probes the default route for its own address otherwise
        env.setdefault("SLIME_HOST_IP", cfg.node_ip)
        interface = interface_of(cfg.node_ip)
        for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME"):
            if interface:  # torch, NCCL and NVSHMEM pick an interface of their own otherwise
                env.setdefault(name, interface)
    # One Weights & Biases run per relayed run: every restart, on any pod, resumes the same
    # run instead of starting a new one (W&B reads these when slime calls wandb.init without
    # an id).  A user's own choice, from the worker's environment or `env`, wins.
    env.setdefault("WANDB_RUN_ID", wandb_run_id(cfg.run_id))
    env.setdefault("WANDB_RESUME", "allow")
    return env


def interface_of(address: str) -> str:
    """The network interface holding `address` (`ip -o addr`), '' when none or no `ip`: on a
    Lium cluster, the overlay's, which slime's scripts name in GLOO/NCCL_SOCKET_IFNAME."""
    try:
        listing = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    for line in listing.splitlines():  # "3: ib0    inet 10.42.0.1/24 brd ..."
        fields = line.split()
        if len(fields) > 3 and fields[3].split("/")[0] == address:
            return fields[1]
    return ""


def gpus_on_this_pod() -> int | None:
    """How many GPUs `nvidia-smi -L` lists; None when it cannot say (no driver, no tool)."""
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    count = sum(line.startswith("GPU ") for line in listing.stdout.splitlines())
    return count if listing.returncode == 0 and count else None


def gpus_slime_asks_for(command: str) -> int | None:
    """`--actor-num-gpus-per-node` of a slime command (slime's default, 8, when a command that
    runs slime's train.py or train_async.py leaves it out); None when not a number we can read
    (`$RELAY_NUM_GPUS`: the pod's own count)."""
    given = re.search(r"--actor-num-gpus-per-node[= ]+(\S+)", command)
    if given:
        return int(given.group(1)) if given.group(1).isdigit() else None
    return 8 if re.search(r"\btrain(?:_async)?\.py\b", command) else None


def gpus_ray_advertises(command: str) -> int | None:
    """`ray start ... --num-gpus N` of a command, when N is a number."""
    given = re.search(r"\bray start\b[^&;|]*?--num-gpus[= ]+(\d+)\b", command)
    return int(given.group(1)) if given else None


def slime_command(cfg: RunConfig) -> str:
    return cfg.trainer_command or cfg.env.get(f"SLIME_{cfg.mode.upper()}_CMD",
                                              os.environ.get(f"SLIME_{cfg.mode.upper()}_CMD", ""))


def gpu_shortfall(cfg: RunConfig, have: int | None) -> str:
    """One line when the command asks for GPUs this pod (`have`, from nvidia-smi) lacks, else "".

    Fewer GPUs registered with Ray than slime asks for: its placement group waits forever
    (logging every 30 s).  More registered than the pod has (`ray start --num-gpus 8` on a
    2-GPU pod): the placement succeeds and the job fails on CUDA.  Saying it at start saves
    the user a stall timeout's worth of billing to find out.
    """
    command = slime_command(cfg)
    if have is None:
        return ("nvidia-smi lists no GPU on this pod: RELAY_NUM_GPUS is 0 and slime will wait for GPUs forever; "
                "check the driver with `nvidia-smi -L`, or run on a pod with GPUs" if "RELAY_NUM_GPUS" in command else "")
    advertised = gpus_ray_advertises(command)
    if advertised is not None and advertised > have:
        return (f"this pod has {have} GPUs but `ray start --num-gpus {advertised}` registers {advertised} with Ray: "
                f"slime's placement will succeed and its job fail on CUDA; use --num-gpus $RELAY_NUM_GPUS")
    wanted = gpus_slime_asks_for(command)
    if wanted is None or have >= wanted:
        return ""
    return (f"this pod has {have} GPUs but slime asks for {wanted} (--actor-num-gpus-per-node): its placement "
            f"group will wait forever and the stall timeout will end the trainer; "
            f"use --actor-num-gpus-per-node $RELAY_NUM_GPUS")


# slime drops a flag it does not know without a word (each of its parsers runs with
# parse_known_args), so `--lerning-rate 1e-5` trains days at the default rate.  The flags it
# accepts, read from slime's, Megatron's and SGLang's sources at the versions slime's image
# pins, are in slime_flags.txt beside relay.py (tools/make_slime_flags.py makes it).
SLIME_FLAGS_FILE = os.path.join(HERE, "slime_flags.txt")
SLIME_ENTRY_POINTS = ("train.py", "train_async.py")
SHELL_COMMAND_ENDS = {"&&", "||", ";", "|", "&", ";;"}


@dataclass
class SlimeFlags:
    exact: set[str]  # every flag slime accepts
    by_prefix: list[str]  # those on parsers with allow_abbrev: a unique prefix of one is that flag

    @classmethod
    def load(cls, path: str = SLIME_FLAGS_FILE) -> "SlimeFlags | None":
        try:
            with open(path) as handle:
                lines = [line.split() for line in handle if line.startswith("--")]
        except OSError:
            return None
        return cls({words[0] for words in lines}, [words[0] for words in lines if words[1:] == ["prefix"]])

    def accepts(self, flag: str) -> bool:
        return flag in self.exact or sum(known.startswith(flag) for known in self.by_prefix) == 1


def slime_command_flags(command: str) -> list[str]:
    """The flags a shell command passes to slime's train.py / train_async.py (words after the
    script up to the end of that simple command; `--x=v` is `--x`; words built from a
    variable, such as $RELAY_SLIME_ARGS or "${MODEL_ARGS[@]}", are not known before run time)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    try:
        words = list(lexer)
    except ValueError:  # unbalanced quotes: bash -c will say so itself
        return []
    flags, in_slime = [], False
    for word in words:
        if word in SHELL_COMMAND_ENDS:
            in_slime = False
        elif os.path.basename(word) in SLIME_ENTRY_POINTS:
            in_slime = True
        elif in_slime and word.startswith("--") and "$" not in word:
            flags.append(word.split("=", 1)[0])
    return flags


def unknown_slime_flags(command: str, known: SlimeFlags) -> list[str]:
    """Each flag of the command slime would drop, with the nearest one it knows."""
    found = []
    for flag in dict.fromkeys(slime_command_flags(command)):
        if not known.accepts(flag):  # among 1,400 flags a looser match names an unrelated one
            found.append(flag + did_you_mean(flag, known.exact, cutoff=0.75))
    return found


def slime_flags_problem(command: str) -> str:
    """What is wrong with the flags a command passes to slime ("" when nothing is, or when the
    command runs no slime or the list is missing: then it says so in the log)."""
    if not slime_command_flags(command):
        return ""
    known = SlimeFlags.load()
    if known is None:
        log("relay", f"{SLIME_FLAGS_FILE} is missing: the slime command's flags are not checked")
        return ""
    unknown = unknown_slime_flags(command, known)
    return (f"slime does not know {', '.join(unknown)} and would drop it without a word; fix the command, or set "
            "check_slime_flags: false for a slime build with flags of its own") if unknown else ""


def check_slime_flags(cfg: RunConfig) -> None:
    """Refuse, before any lease, a slime command with a flag slime would silently drop."""
    problem = slime_flags_problem(slime_command(cfg)) if cfg.check_slime_flags else ""
    if problem:
        raise UserError(f"{'trainer_command' if cfg.trainer_command else f'SLIME_{cfg.mode.upper()}_CMD'}: {problem}")


def stop_ray_job() -> int:
    """slime's stop step, run by launch_sft.sh / launch_rl.sh when the worker stops them: stop
    this trainer's own Ray job (RELAY_RAY_JOB_ID on the job API at 127.0.0.1:RELAY_RAY_DASHBOARD_PORT)
    while its cluster is still whole, through the REST call `ray job stop` makes (the CLI alone
    takes 2-5 s to start on a busy pod), every call with a timeout (a dying cluster hangs Ray's
    CLI).  `ray stop --force` is left out on purpose: it kills every Ray process on the machine,
    and the worker kills exactly this trainer's processes next."""
    job_id = os.environ.get("RELAY_RAY_JOB_ID", "")
    if not job_id:
        return 0
    job = f"http://127.0.0.1:{os.environ.get('RELAY_RAY_DASHBOARD_PORT', '8265')}/api/jobs/{job_id}"
    status = "?"
    try:
        urllib.request.urlopen(urllib.request.Request(job + "/stop", method="POST"), timeout=2).close()
        give_up = time.monotonic() + 4  # Ray sends the driver SIGTERM, then SIGKILL after 3 s
        while time.monotonic() < give_up and status not in ("STOPPED", "SUCCEEDED", "FAILED"):
            time.sleep(0.2)
            with urllib.request.urlopen(job, timeout=2) as answer:
                status = json.load(answer).get("status", "?")
    except (OSError, ValueError, http.client.HTTPException) as exc:
        status = (f"not stopped ({getattr(exc, 'reason', exc)}): the command must start Ray's dashboard on "
                  "127.0.0.1:$RELAY_RAY_DASHBOARD_PORT and submit with `ray job submit --submission-id "
                  "$RELAY_RAY_JOB_ID` (docs/slime.md)")
    print(f"launch script: Ray job {job_id} is {status}", flush=True)
    return 0


def ray_nodes_registered(dashboard: str) -> tuple[int, float]:
    """The live nodes of the Ray cluster whose dashboard answers at `dashboard`, and their GPUs,
    from Ray's state API (what `ray list nodes` reads)."""
    with urllib.request.urlopen(f"{dashboard}/api/v0/nodes?limit=10000&detail=true", timeout=5) as answer:
        document = json.load(answer)
    nodes = [node for node in (((document.get("data") or {}).get("result") or {}).get("result")) or []
             if isinstance(node, dict) and node.get("state") == "ALIVE"]
    return len(nodes), sum(float((node.get("resources_total") or {}).get("GPU", 0)) for node in nodes)


def wait_for_nodes(every: float) -> int:
    """`$RELAY_WAIT_FOR_NODES` in node 0's slime command, between `ray start --head` and `ray job
    submit`: wait until Ray has every node's GPUs (RELAY_NUM_NODES x RELAY_NUM_GPUS).  slime's
    placement group would wait for ever too; submitting only once it can be placed keeps
    the job's start quick and the waiting visible: the line printed meanwhile has slime's words,
    so a cluster that never completes is a stall whose reason names the GPUs missing."""
    nodes = int(os.environ.get("RELAY_NUM_NODES", "1"))
    need = nodes * int(os.environ.get("RELAY_NUM_GPUS", "0") or 0)
    dashboard = f"http://127.0.0.1:{os.environ.get('RELAY_RAY_DASHBOARD_PORT', '8265')}"
    started = time.monotonic()
    last_said = -every
    while True:
        try:
            joined, have = ray_nodes_registered(dashboard)
        except (OSError, ValueError, AttributeError, http.client.HTTPException):
            joined, have = 0, 0.0  # the dashboard is still starting
        if joined >= nodes and have >= need:
            print(f"relay: all {need} GPUs of {nodes} node(s) are in Ray", flush=True)
            return 0
        waited = time.monotonic() - started
        if waited - last_said >= every:
            print(f"relay: Waiting for placement group of {need} GPUs (elapsed {waited:.0f}s): {have:.0f} GPUs "
                  f"registered with Ray, on {joined} of {nodes} nodes; the other nodes' workers start Ray on theirs",
                  flush=True)
            last_said = waited
        time.sleep(0.5)


def wandb_run_id(run_id: str) -> str:
    """A stable W&B run id for a relay run: lowercase hex only, valid whatever run_id holds."""
    return "relay-" + hashlib.sha256(run_id.encode()).hexdigest()[:16]


###############################################################################
# 8. Worker ###################################################################
###############################################################################


class RestoreFailed(Exception):
    """The recorded checkpoint cannot be brought to this pod (the Hub is unreachable)."""


def final_model_text(repo: str, revision: str) -> str:
    return (f"final model: {repo} at revision {revision}\n"
            f"Affine hand-off: af chutes_push --repo {repo} --revision {revision}\n"
            f"                 af commit --repo {repo} --revision {revision} --chute-id <the id chutes_push prints>")


@dataclass
class Lease:
    token: str
    epoch: int
    ttl: float
    sent_at: float  # boottime() when the acquire request that granted it was sent
    checkpoint: dict | None


def trusted_ttl(told: Any, cfg: RunConfig) -> float | None:
    """The lease TTL an answer states, clamped to the run's max_lease_seconds; None for a value
    that is no positive number (that answer is then no grant and no renewal).  Answers are
    signed, so this guards against a commander misconfigured (--lease-seconds above what the
    run allows) more than against a forger; a shorter TTL only makes the worker stop sooner."""
    if not isinstance(told, (int, float)) or isinstance(told, bool) or not math.isfinite(told) or told <= 0:
        return None
    return min(float(told), cfg.max_lease_seconds)


def lease_margin(ttl: float) -> float:
    """How long before the commander's expiry the worker stops trusting its lease.

    It covers the watchdog's wake-up, the time SIGKILL takes to empty the process table,
    and scheduling delay, with room to spare; 20% of the TTL, at least 0.5 s.
    """
    return max(0.5, 0.2 * ttl)


class LeaseKeeper:
    """Renews one lease on its own thread and alone decides when it can no longer be trusted.

    Which clock: CLOCK_BOOTTIME on this pod; the commander uses its own monotonic clock, and
    only durations cross the wire.  Deadline: send time of the last successful renewal + TTL
    − margin.  The commander's expiry is receipt time + TTL, and receipt comes after sending,
    so this deadline precedes the commander's expiry by at least the margin (clock-rate
    drift between machines is parts per million).  Renewal every TTL/3: two renewals may be
    lost before the deadline.  What a pause does: if this process is stopped (SIGSTOP, swap
    storm), renewals stop, and the watchdog, a separate process holding the same deadline,
    kills the trainer when it passes; if the whole pod freezes, the thawed watchdog sees the
    passed deadline on its first poll, and any late write by the thawed trainer carries a
    stale epoch that the commander refuses.  Renewal never waits behind checkpoint hashing
    or uploads: those run on other threads.  What an answer says is believed only when it
    carries the commander's signature for this very request (section 3): a 409 or TTL
    written by someone on the path is no answer, and the TTL is clamped by trusted_ttl.
    """

    def __init__(self, client: CommanderClient, cfg: RunConfig, lease: Lease, progress: Progress,
                 watchdog: Watchdog, on_lost: Callable[[str], None], on_cancel: Callable[[], None],
                 path: str = "/api/lease/renew", payload: Callable[[], dict] | None = None) -> None:
        self.client, self.cfg, self.lease, self.progress = client, cfg, lease, progress
        self.watchdog = watchdog
        self.on_lost, self.on_cancel = on_lost, on_cancel
        # A member of a multi-node epoch renews at /api/lease/member with a payload of its own:
        # same rules, same deadline.
        self.path = path
        self.payload = payload or self.holder_payload
        self.deadline = lease.sent_at + lease.ttl - lease_margin(lease.ttl)
        self.phase = "RESTORING"
        self.answer: dict = {}  # the last renewal's answer (a multi-node holder's members ...)
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def lose(self, why: str) -> None:
        """The lease can no longer be trusted (deadline, 409): once, and the trainer dies first."""
        if not self.lost.is_set():
            self.lost.set()
            self.on_lost(why)

    def holder_payload(self) -> dict:
        return {"run_id": self.cfg.run_id, "worker_id": self.cfg.worker_id, "lease_token": self.lease.token,
                "step": self.progress.step, "loss": self.progress.loss, "phase": self.phase,
                "log_lines": self.progress.take_lines(), "losses": self.progress.take_losses()}

    def _run(self) -> None:
        interval = self.lease.ttl / 3
        next_renewal = self.lease.sent_at + interval
        complained = told_unsigned = False
        while not self._stop.is_set():
            now = boottime()
            if now >= self.deadline:
                self.lose("the lease deadline passed without a successful renewal")
                return
            if now < next_renewal:
                self._stop.wait(min(next_renewal, self.deadline) - now)
                continue
            sent = boottime()
            try:
                reply = self.client.post(self.path, self.payload(), timeout=max(0.2, min(interval, self.deadline - sent)))
            except CommanderUnsigned as exc:  # no answer: said once a lease (someone may forge every one)
                if not told_unsigned:
                    log("worker", str(exc))
                    told_unsigned = True
                next_renewal = boottime() + min(1.0, interval / 2)
                continue
            except CommanderUnreachable as exc:
                if not complained:
                    log("worker", f"renewal failed, retrying until the lease deadline: {exc}")
                    complained = True
                next_renewal = boottime() + min(1.0, interval / 2)
                continue
            ttl = trusted_ttl(reply.body.get("lease_expires_in_sec"), self.cfg) if reply.status == 200 else None
            if ttl is not None:
                self.deadline = sent + ttl - lease_margin(ttl)
                self.watchdog.extend(self.deadline)
                next_renewal = sent + interval
                complained = False
                self.answer = reply.body
                if reply.body.get("cancel"):  # the user cancelled the run: stop as on SIGTERM, lease kept
                    self.on_cancel()
            elif reply.status == 409:
                self.lose(f"the commander refused the renewal: {reply.body.get('error', '')}")
                return
            else:
                log("worker", f"renewal answered {reply.status}: {reply.body.get('error', 'no lease_expires_in_sec')}")
                next_renewal = boottime() + min(1.0, interval / 2)


class Worker:
    """One pod's worker: a state machine over named states, each a method returning the next.

        ACQUIRING ─granted→ RESTORING → TRAINING ─exit 0→ FINISHING → EXITED
            ↑  └─completed/failed→ EXITED      │ ├─crash/stall→ CRASHED ─restarts left→ RESTORING
            │                                  │ │                    └─no restarts left→ ACQUIRING
            └──────────── LOST ←─lease lost────┘ └─SIGTERM/SIGINT→ STOPPING → EXITED
    """

    SCAN_SECONDS = 1.0

    def __init__(self, cfg: RunConfig, watchdog: Watchdog, hub: HubStore | None = None) -> None:
        self.cfg = cfg
        self.watchdog = watchdog
        self.client = CommanderClient(cfg.commander_url, cfg.relay_shared_secret, ca_file=cfg.commander_ca_file)
        self.ckpt = CheckpointDir(cfg.run_dir, cfg.require_dataset_state)
        self.hub = hub
        self.sync = HubSync(hub, self.ckpt, cfg, self.report, self.lease_held) if hub is not None else None
        use_prefetch = hub is not None and cfg.hf_prefetch and not hub.dry_run
        self.prefetch = HubPrefetch(hub, cfg, self.say) if use_prefetch else None
        self.progress = Progress()
        self.wake = threading.Event()
        self.stop_requested = threading.Event()
        self.lease: Lease | None = None
        self.keeper: LeaseKeeper | None = None
        self.trainer: TrainerProcess | None = None
        self.previous_token = ""
        self.resume_iteration: int | None = None
        self.unreported: Manifest | None = None  # sealed under this lease, not yet acknowledged
        self.restarts = 0
        self.crash_reason = ""
        # Asked once, before any lease (nvidia-smi may take seconds): the pod's GPUs do not change.
        self.gpus = gpus_on_this_pod()
        self.gpu_warning = gpu_shortfall(cfg, self.gpus)
        self.told_unsigned = False
        self.setup_note = ""
        self.exit_code = 0
        self.cancelled = False  # the commander said the run is cancelled (on a renewal)
        # A multi-node run: this node serves its checkpoint folder to the others (section 6);
        # node 0 gathers their shards before it seals (iterations gathered under this lease).
        self.node_server = NodeCheckpointServer(cfg.node_ip, cfg.node_port, self.ckpt, cfg.relay_shared_secret) \
            if cfg.nodes > 1 else None
        self.gathered: set[int] = set()
        self.gather_complaint = Complaint(self.say)
        if cfg.nodes > 1 and cfg.node_rank == 0:
            self.ckpt.gather = self.gather_shards

    # -- plumbing --------------------------------------------------------------------------

    def say(self, message: str) -> None:
        log(f"worker {self.cfg.worker_id}", message)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.stop_requested.set()
        self.wake.set()

    def _on_cancel(self) -> None:
        # On the keeper's thread, at every renewal while the run is cancelled: the main loop
        # stops the trainer gracefully, seals, uploads and releases, as on SIGTERM.
        self.cancelled = True
        self.stop_requested.set()
        self.wake.set()

    def _on_lease_lost(self, why: str) -> None:
        # Runs on the keeper's thread: kill first, talk later.
        trainer = self.trainer
        if trainer is not None:
            trainer.kill()
        self.say(f"lease lost: {why}")
        self.wake.set()

    def _post(self, path: str, payload: dict) -> Reply | None:
        # Under a lease, an answer after its deadline is worthless (the lease can no longer be
        # trusted), so a commander that accepts the connection and hangs never holds up a
        # stop or a hand-back for longer than the lease has left.
        keeper = self.keeper  # read once: the Hub-sync thread reports too, and drop_lease clears it
        timeout = max(0.5, keeper.deadline - boottime()) if keeper is not None else None
        try:
            return self.client.post(path, payload, timeout=timeout)
        except CommanderUnsigned as exc:
            if not self.told_unsigned:  # once: someone on the path may send one for every request
                self.say(str(exc))
                self.told_unsigned = True
            return None
        except CommanderUnreachable as exc:
            self.say(str(exc))
            return None

    def report(self, **fields: Any) -> bool:
        """Report progress or a checkpoint; True once acknowledged.  A 409 means the lease is
        gone (fenced)."""
        if self.lease is None:
            return False
        payload = {"run_id": self.cfg.run_id, "lease_token": self.lease.token, "step": self.progress.step,
                   "loss": self.progress.loss, **fields}
        reply = self._post("/api/job/report", payload)
        if reply is not None and reply.status == 409 and self.keeper is not None:
            self.keeper.lose(f"the commander refused a report: {reply.body.get('error', '')}")
        return reply is not None and reply.status == 200

    def report_checkpoint(self, manifest: Manifest, **fields: Any) -> None:
        """Report a sealed checkpoint.  One the commander never acknowledged is sent again at
        the next scan and rides on the release: otherwise the run's record would lag behind
        the disk (and a completed run would name an older final checkpoint)."""
        self.unreported = None if self.report(latest_ckpt=manifest.summary(), **fields) else manifest

    def lease_lost(self) -> bool:
        return self.keeper is not None and self.keeper.lost.is_set()

    def lease_held(self) -> bool:
        return self.lease is not None and not self.lease_lost()

    def aborting(self) -> bool:
        """Long work (hashing, downloads) while training or restoring gives way to a stop or a lost lease."""
        return self.stop_requested.is_set() or self.lease_lost()

    def seal_and_report(self, abort: Callable[[], bool] | None = None) -> Manifest | None:
        """Seal the newest complete checkpoint, report it, prune.  While stopping, only a
        lost lease may interrupt it (`abort`): the last checkpoint is what a stop must keep."""
        assert self.lease is not None
        alive = self.trainer is not None and self.trainer.exit_code() is None
        try:
            manifest = self.ckpt.seal_newest(self.lease.epoch, self.cfg.worker_id, alive, abort or self.aborting)
        except OSError as exc:  # a full or failing volume: keep the lease, say it, try again later
            self.say(f"cannot seal a checkpoint in {self.ckpt.path}: {exc.strerror or exc}")
            self.report(msg=f"{self.cfg.worker_id}: cannot seal a checkpoint: {exc.strerror or exc}")
            return None
        if manifest is None:
            if self.unreported is not None:
                self.report_checkpoint(self.unreported)
            return None
        self.progress.step = max(self.progress.step, manifest.iteration)
        self.say(f"sealed checkpoint {manifest.iteration} ({len(manifest.files)} files, {manifest.total_bytes} bytes)")
        self.report_checkpoint(manifest, status="TRAINING")
        removed = self.ckpt.prune(self.cfg.keep_last_checkpoints, self.sync.protected() if self.sync else set())
        if removed:
            self.say(f"pruned checkpoints {', '.join(map(str, removed))}")
        return manifest

    def gather_shards(self, iteration: int) -> bool:
        """Node 0: bring every member's files of checkpoint `iteration` here (section 6); True once
        all of them are, and its dataset state too (written by whichever node holds the data)."""
        if iteration in self.gathered:
            return True
        members = (self.keeper.answer.get("members") if self.keeper is not None else None) or []
        if len(members) < self.cfg.nodes - 1:
            return False  # the renewal that names every member has not come yet
        copied = 0
        try:
            for member in members:
                peer = NodePeer(str(member["address"]), self.cfg.relay_shared_secret)
                listing = peer.ask(f"/shards/{iteration}") or {}
                copied += peer.copy_files(checked_file_listing(listing.get("files")), self.ckpt, self.aborting)
        except (OSError, KeyError, TypeError, ValueError) as exc:
            self.gather_complaint.still(f"cannot gather checkpoint {iteration} from the other nodes yet: {exc}")
            return False
        self.gather_complaint.over(f"gathered checkpoint {iteration} from the other nodes again")
        if self.cfg.require_dataset_state and not os.path.exists(os.path.join(self.ckpt.path, dataset_state_relpath(iteration))):
            return False  # no node has its data position yet: the next scan asks again
        self.gathered.add(iteration)
        self.say(f"gathered checkpoint {iteration} from {len(members)} other node(s): {copied} bytes copied")
        return True

    def wait_for_commander(self) -> None:
        """A commander nobody can reach at start, one of another protocol, or one that does not
        know this worker's secret is a configuration mistake: exit 2.  Said at the first failed
        try, naming the URL and the reason, and again every 10 s meanwhile.  (Only here, before
        any lease, is an unsigned answer read at all: to say why the worker cannot start.)"""
        give_up = boottime() + self.cfg.commander_wait_seconds
        complaint = Complaint(self.say, every=10.0)
        url = self.cfg.commander_url
        while True:
            try:
                reply = self.client.get("/api/health", timeout=5)
                if is_relay_commander(reply):
                    self.refuse_to_start(reply, "")
                    complaint.over(f"reached the commander at {url}")
                    return
                if reply.status < 500:  # (a 5xx may be a proxy whose commander is restarting)
                    raise UserError(f"{url} is not a relay commander (its /api/health answered HTTP {reply.status}): "
                                    "commander_url in the run config")
                problem = f"{url}/api/health answered HTTP {reply.status}"
            except CommanderNotTrusted as exc:
                raise UserError(str(exc)) from None
            except CommanderUnsigned as exc:
                if exc.reply.status in (200, 401):  # not a 503 of a commander with too many connections
                    self.refuse_to_start(exc.reply, str(exc))
                problem = str(exc)
            except CommanderUnreachable as exc:
                problem = str(exc)
            if boottime() >= give_up or self.stop_requested.is_set():
                raise UserError(f"{problem} (commander_url in the run config)")
            complaint.still(f"{problem}; trying again for up to {give_up - boottime():.0f} s more "
                            "(commander_wait_seconds)")
            self.stop_requested.wait(1.0)

    def run_setup(self) -> None:
        """run.yaml `setup`, once, in the trainer's environment, its output in this log; how long
        it took is an event of the run (status, the page): on a cluster member it is part of
        what a new cluster costs before training resumes."""
        if not self.cfg.setup:
            return
        self.say(f"setup: {self.cfg.setup}")
        started = boottime()
        env = {k: v for k, v in os.environ.items() if k != "RELAY_SHARED_SECRET"}
        proc = subprocess.Popen(["bash", "-c", self.cfg.setup], env=dict(env, **self.cfg.env), stdin=subprocess.DEVNULL,
                                start_new_session=True)
        while proc.poll() is None:
            if self.stop_requested.wait(0.5):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise UserError("stopped during setup")
        took = boottime() - started
        if proc.returncode != 0:
            raise UserError(f"setup failed with status {proc.returncode} after {took:.0f} s: {self.cfg.setup}")
        self.say(f"setup done in {took:.1f} s")
        self.setup_note = f"setup done in {took:.0f} s"  # an event once the run has this worker in it

    def tell_setup_time(self) -> None:
        if self.setup_note:
            with contextlib.suppress(CommanderUnreachable):
                self.client.post("/api/runs/event", {"run_id": self.cfg.run_id, "source": self.cfg.worker_id,
                                                     "msg": self.setup_note}, timeout=5)
            self.setup_note = ""

    def refuse_to_start(self, reply: Reply, unsigned: str) -> None:
        """Exit 2 (UserError) on a health answer of another protocol, or unsigned (`unsigned`
        says so): the commander refused this worker's signature, or speaks another protocol."""
        where = f"{self.cfg.commander_url}/api/health"
        if reply.status == 401:
            raise UserError(f"the commander refused this worker: {reply.body.get('error', '')} "
                            "(check relay_shared_secret / RELAY_SHARED_SECRET)")
        if reply.body.get("protocol") != PROTOCOL:
            raise UserError(f"{where}: the commander runs relay {reply.body.get('version', '(unknown version)')} "
                            f"with relay protocol {reply.body.get('protocol', 1)}, this worker relay {VERSION} "
                            f"with protocol {PROTOCOL}: run the same relay.py on the commander and the pods")
        if unsigned:
            raise UserError(f"the commander at {self.cfg.commander_url} does not sign its answers with this worker's "
                            "secret: check relay_shared_secret / RELAY_SHARED_SECRET (or something on the path "
                            "answers in its place)")

    # -- the state machine -----------------------------------------------------------------

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.wait_for_commander()
        self.run_setup()
        state = "ACQUIRING"
        while state != "EXITED":
            following = getattr(self, f"state_{state.lower()}")()
            if following != state:
                self.say(f"{state} -> {following}")
            state = following
        return self.exit_code

    def ask_for_lease(self, path: str, payload: dict, complaint: Complaint) -> dict | None:
        """The commander's answer to a lease request (acquire, join); None when none came (said
        through `complaint`, and waited a little)."""
        try:
            reply = self.client.post(path, payload)
        except CommanderNotTrusted as exc:  # a new certificate mid-run: no lease goes to an unverified peer
            raise UserError(str(exc)) from None
        except CommanderUnreachable as exc:  # an unsigned answer among them: an unsigned grant is no grant
            complaint.still(f"{exc}; retrying")
            self.stop_requested.wait(2.0)
            return None
        complaint.over(f"reached the commander at {self.cfg.commander_url} again")
        if reply.status in (401, 403):
            raise UserError(f"the commander refused this worker: {reply.body.get('error', '')} "
                            "(check relay_shared_secret / RELAY_SHARED_SECRET)")
        if reply.status != 200:
            raise UserError(f"the commander refused the lease request: {reply.body.get('error', reply.status)}")
        return reply.body

    def run_has_ended(self, status: Any) -> bool:
        """Said and the exit code set when the commander answered that the run is over."""
        if status == "completed":
            self.say(f"run {self.cfg.run_id} is COMPLETED; nothing to do")
            self.exit_code = 0
        elif status == "failed":
            self.say(f"run {self.cfg.run_id} is FAILED (see `relay.py status --run {self.cfg.run_id}`; "
                     f"`relay.py retry {self.cfg.run_id}` reopens it)")
            self.exit_code = 1
        elif status == "cancelled":
            self.say(f"run {self.cfg.run_id} is CANCELLED; nothing to do (`relay.py retry {self.cfg.run_id}` reopens it)")
            self.exit_code = 0
        else:
            return False
        return True

    def state_acquiring(self) -> str:
        complaint = Complaint(self.say)
        said_standing_by = False
        while not self.stop_requested.is_set():
            sent = boottime()
            payload = {"run_id": self.cfg.run_id, "worker_id": self.cfg.worker_id, "mode": self.cfg.mode}
            if self.cfg.total_steps:  # for "step N/total" in status and on the page
                payload["total_steps"] = self.cfg.total_steps
            if self.cfg.nodes > 1:
                payload.update(nodes=self.cfg.nodes, group=self.cfg.group)
            if self.previous_token:
                payload["previous_lease_token"] = self.previous_token
            body = self.ask_for_lease("/api/lease/acquire", payload, complaint)
            if body is None:
                continue
            status = body.get("status")
            ttl = trusted_ttl(body.get("lease_expires_in_sec"), self.cfg)
            if status == "granted" and ttl is not None:
                if ttl < body["lease_expires_in_sec"]:
                    self.say(f"the commander grants {body['lease_expires_in_sec']:g} s leases; this worker trusts "
                             f"{ttl:g} s (max_lease_seconds) and renews as if that were the lease")
                self.lease = Lease(body["lease_token"], int(body["epoch"]), ttl, sent, body.get("checkpoint"))
                self.previous_token = self.lease.token
                self.say(f"lease granted, epoch {self.lease.epoch}")
                self.keeper = LeaseKeeper(self.client, self.cfg, self.lease, self.progress, self.watchdog,
                                          self._on_lease_lost, self._on_cancel)
                self.restarts = 0
                self.tell_setup_time()
                self.gathered.clear()  # iteration numbers repeat after a resume from an older checkpoint
                if self.node_server is not None:
                    self.node_server.restored = None
                return "RESTORING"
            if self.run_has_ended(status):
                return "EXITED"
            if not said_standing_by:
                held = (f"held by {body.get('holder')}" if body.get("holder") else
                        f"waiting for {', '.join(body.get('waiting_for') or [])} of its last epoch to stop")
                self.say(f"standing by: run {held} (epoch {body.get('epoch')})")
                said_standing_by = True
            if self.prefetch is not None and isinstance(body.get("hub"), dict):
                sealed = self.ckpt.sealed_iterations()
                self.prefetch.offer(body["hub"], sealed[-1] if sealed else -1)
            self.stop_requested.wait(float(body.get("retry_after_sec", 1.0)))
        self.exit_code = 0
        return "EXITED"

    def restore(self) -> tuple[int | None, str]:
        """Put the newest trustworthy checkpoint in place: its iteration (None: a cold start)
        and where it came from, in words.

        Order: the newest sealed checkpoint in L1 that verifies, when it is at least as new as
        the commander's record (a copy of the recorded Hub revision prefetched while standing
        by is moved into L1 first); else the commander-recorded Hub revision; else whatever L1
        has (older than recorded: progress since then was lost with the other pod's volume).
        """
        assert self.lease is not None
        record = self.lease.checkpoint or {}
        recorded = record.get("iteration", -1)
        # A checkpoint the previous holder completed but had no time to seal: its trainer is
        # dead (the commander only re-grants after that holder's watchdog deadline), so the
        # files can no longer change.
        self.ckpt.seal_newest(self.lease.epoch, self.cfg.worker_id, False, self.aborting)
        hub_record = record.get("hub")
        prefetched = self.prefetch.hand_over(hub_record, self.ckpt, self.aborting) if self.prefetch is not None else None
        local = None
        for iteration in reversed(self.ckpt.sealed_iterations()):
            manifest = self.ckpt.load_manifest(iteration)
            if manifest is not None and self.ckpt.verify(manifest, self.aborting):
                local = manifest
                break
            if self.aborting():
                return None, "a cold start"
            self.say(f"checkpoint {iteration} in L1 is damaged; removing it and trying an older one")
            self.ckpt.remove(iteration)
        if self.hub is not None:
            self.hub.sweep_staging(self.ckpt, (hub_record or {}).get("revision"))
        newest_here = local.iteration if local is not None else -1
        source = "L1"
        if prefetched is not None and local is not None and local.iteration == prefetched.iteration:
            source = f"the Hub at {hub_record['revision'][:12]} (prefetched while standing by)"
        if self.hub is not None and hub_record and newest_here < recorded and hub_record["iteration"] > newest_here:
            if self.hub.dry_run:
                self.say("hf_dry_run: not fetching the Hub's newer checkpoint")
            else:
                local = self.download_from_hub(hub_record)
                source = f"the Hub at {hub_record['revision'][:12]}"
        if local is not None and local.iteration < recorded:
            self.say(f"WARNING: the newest checkpoint here is {local.iteration}, the commander recorded {recorded}; "
                     "resuming from the older one")
        iteration = local.iteration if local is not None else None
        try:
            self.ckpt.point_tracker_at(iteration)
        except OSError as exc:
            raise RestoreFailed(f"cannot prepare {self.ckpt.path}: {exc.strerror or exc}") from None
        return iteration, "a cold start" if iteration is None else f"checkpoint {iteration} in {source}"

    def download_from_hub(self, record: dict) -> Manifest:
        assert self.hub is not None
        where = f"{record['repo']}@{record['revision'][:12]}"
        for attempt in range(1, 4):
            self.say(f"fetching checkpoint {record['iteration']} from {where}")
            started = boottime()
            try:
                manifest = self.hub.download(record, self.ckpt, self.aborting)
            except Exception as exc:  # any Hub or network failure: retry, then give the lease back
                if self.aborting():
                    raise RestoreFailed("interrupted") from None
                self.say(f"fetching from the Hub failed (attempt {attempt} of 3): {hub_error_text(exc)}")
                self.stop_requested.wait(2.0 * attempt)
                continue
            self.say(f"fetched checkpoint {manifest.iteration} ({manifest.total_bytes} bytes) in {boottime() - started:.1f} s")
            return manifest
        raise RestoreFailed(f"cannot fetch checkpoint {record['iteration']} from {where}")

    def state_restoring(self) -> str:
        assert self.lease is not None and self.keeper is not None
        self.keeper.phase = "RESTORING"
        try:
            self.resume_iteration, where = self.restore()
        except RestoreFailed as exc:
            # This pod cannot reach the recorded checkpoint; training from anything older
            # would throw progress away.  Give the run back and try again later.
            self.say(f"{exc}; releasing the lease and retrying in 10 s")
            self.release("PREEMPTED", str(exc))
            self.drop_lease()
            self.stop_requested.wait(10.0)
            return "ACQUIRING"
        if self.keeper.lost.is_set():
            return "LOST"
        if self.stop_requested.is_set():
            return "STOPPING"
        self.progress.step = self.resume_iteration or 0
        restored = self.ckpt.load_manifest(self.resume_iteration) if self.resume_iteration is not None else None
        if self.node_server is not None:  # what the other nodes copy before they start (MemberWorker)
            self.node_server.restored = {"epoch": self.lease.epoch, "iteration": self.resume_iteration,
                                         "files": restored.files if restored is not None else {}}
        resumes = f"{self.cfg.worker_id} resumes from {where} (epoch {self.lease.epoch})"
        if restored is not None:
            self.report_checkpoint(restored, status="RESTORED", msg=resumes)
        else:
            self.report(status="RESTORED", msg=resumes)
        self.say(f"resuming from {where}")
        if self.sync is not None and not self.sync.running():
            hub = (self.lease.checkpoint or {}).get("hub") or {}
            self.sync.start(self.lease.epoch, hub if hub.get("repo") == self.cfg.hf_repo else None)
            if self.cfg.nodes > 1 and restored is not None and restored.iteration > hub.get("iteration", -1):
                # A cluster has no volume: this disk alone holds it (after a lost node, the
                # supervisor keeps this node only until the Hub has it), so it goes first.
                self.sync.sync_now()
        if self.cfg.nodes > 1 and not self.every_node_joined():
            return "LOST" if self.lease_lost() else "STOPPING" if self.stop_requested.is_set() else "CRASHED"
        return "TRAINING"

    def every_node_joined(self) -> bool:
        """Node 0 starts its part only once every other node joined the epoch (each then copies
        the restored checkpoint and starts its own part): a trainer that ran alone would write
        checkpoints no node could complete.  Nodes that never come are a stall, said so."""
        assert self.keeper is not None and self.lease is not None
        give_up = boottime() + self.cfg.stall_timeout_seconds
        said = False
        while not self.aborting():
            joined = self.keeper.answer.get("members") or []
            if len(joined) >= self.cfg.nodes - 1:
                self.say(f"all {self.cfg.nodes} nodes are in epoch {self.lease.epoch}")
                return True
            if boottime() > give_up:
                self.crash_reason = (f"stalled: {len(joined) + 1} of {self.cfg.nodes} nodes joined epoch "
                                     f"{self.lease.epoch} in {self.cfg.stall_timeout_seconds:g} s")
                return False
            if not said:
                self.say(f"waiting for the other {self.cfg.nodes - 1} node(s) of {self.cfg.group} to join epoch "
                         f"{self.lease.epoch}")
                said = True
            self.wake.wait(0.5)
            self.wake.clear()
        return False

    def start_trainer(self) -> None:
        assert self.lease is not None and self.keeper is not None
        tag = secrets.token_hex(12)
        # Armed before the trainer exists: if the worker dies in between, the watchdog's end
        # of file still finds the trainer by its tag.
        self.watchdog.arm(tag, self.keeper.deadline)
        env = trainer_environment(self.cfg, self.lease.epoch, self.resume_iteration, self.ckpt.path, tag, self.gpus)
        self.progress.last_advance = boottime()
        self.progress.placement_wait = ""
        if self.gpu_warning:  # said at the first start only
            self.say(f"WARNING: {self.gpu_warning}")
            self.report(msg=f"{self.cfg.worker_id}: {self.gpu_warning}")
            self.gpu_warning = ""
        self.trainer = TrainerProcess(trainer_argv(self.cfg), env, self.progress, os.getcwd(), self.watchdog.pid,
                                      self.wake.set)
        self.watchdog.watch(self.trainer.tree.pgid or 0, self.trainer.tree.cgroup)
        if self.trainer.tree.cgroup:
            self.say(f"trainer started in its own cgroup {self.trainer.tree.cgroup}")

    def end_trainer(self, graceful: bool) -> None:
        """Stop the trainer tree (if still running) and disarm its watchdog."""
        if self.trainer is not None:
            if graceful:
                self.trainer.stop(self.cfg.stop_grace_seconds, whole_group=bool(self.cfg.trainer_command))
            else:
                self.trainer.kill()
            self.trainer.exited.wait(5)
            keep = {self.trainer.proc.pid, self.watchdog.pid}
            self.trainer.tree.remove_cgroup(2.0, lambda: reap_adopted_orphans(keep))
        self.watchdog.disarm()
        self.trainer = None

    def state_training(self) -> str:
        assert self.keeper is not None
        self.keeper.phase = "TRAINING"
        self.start_trainer()
        assert self.trainer is not None
        last_progress = started = boottime()
        warned_no_checkpoint = False
        next_scan = boottime()
        while True:
            # Asleep until the next scan unless woken: a lost lease, a signal and the
            # trainer's exit all set `wake`; a dead watchdog is noticed at the next scan
            # (meanwhile the keeper still kills the trainer at the lease deadline).
            self.wake.wait(max(0.0, next_scan - boottime()))
            self.wake.clear()
            if self.keeper.lost.is_set():
                return "LOST"
            if self.stop_requested.is_set():
                return "STOPPING"
            if self.trainer.exit_code() is not None:
                code = self.trainer.exit_code()
                self.end_trainer(graceful=False)  # leftovers of an exited trainer die too
                if code == 0:
                    return "FINISHING"
                self.crash_reason = f"trainer exited with status {code}"
                return "CRASHED"
            if not self.watchdog.alive():
                self.say("the watchdog died: stopping the trainer (it must not run unguarded) and starting a new watchdog")
                self.end_trainer(graceful=False)
                self.watchdog = self.keeper.watchdog = Watchdog.spawn()
                return "RESTORING"
            if boottime() >= next_scan:
                next_scan = boottime() + self.SCAN_SECONDS
                reap_adopted_orphans({self.trainer.proc.pid, self.watchdog.pid})
                if self.seal_and_report() is not None:
                    last_progress = self.progress.last_advance = boottime()
            if not warned_no_checkpoint and last_progress == started and boottime() - started > NO_CHECKPOINT_WARNING_SECONDS:
                warned_no_checkpoint = True
                self.say(f"WARNING: the trainer has run {NO_CHECKPOINT_WARNING_SECONDS / 3600:.0f} h without a checkpoint; "
                         "slime saves nothing without --save-interval (see docs/slime.md)")
                self.report(msg=f"{self.cfg.worker_id}: no checkpoint after {NO_CHECKPOINT_WARNING_SECONDS:.0f} s")
            # Judged by progress, not output: slime stuck in placement logs every 30 s forever.
            quiet = boottime() - self.progress.last_advance
            if quiet > self.cfg.stall_timeout_seconds:
                waiting = self.progress.placement_wait
                self.say(f"trainer stalled: no new step and no checkpoint for {quiet:.0f} s"
                         + (f" ({waiting})" if waiting else ""))
                self.end_trainer(graceful=False)
                self.crash_reason = f"stalled for {quiet:.0f} s" + (f": {waiting}" if waiting else "")
                return "CRASHED"

    def state_crashed(self) -> str:
        self.restarts += 1
        self.say(f"{self.crash_reason} (restart {self.restarts} of {self.cfg.max_trainer_restarts})")
        self.seal_and_report(abort=self.lease_lost)
        if self.cfg.nodes > 1:
            # Every node's part of the trainer must start again, from one checkpoint: a new
            # epoch (the commander bounds how many fail in a row without progress).
            self.release("FAILED", f"{self.crash_reason}; the trainer starts again on all {self.cfg.nodes} nodes")
            self.drop_lease()
            return "ACQUIRING"
        if self.restarts <= self.cfg.max_trainer_restarts:
            self.report(status="RESTARTING", msg=f"{self.cfg.worker_id}: {self.crash_reason}; restarting")
            return "RESTORING"
        self.release("FAILED", f"{self.crash_reason}; {self.cfg.max_trainer_restarts} restarts used")
        self.drop_lease()
        return "ACQUIRING"

    def state_lost(self) -> str:
        self.end_trainer(graceful=False)
        self.drop_lease()
        return "ACQUIRING"

    def state_stopping(self) -> str:
        why = "the run was cancelled" if self.cancelled else "worker stopped by a signal"
        self.say(f"stopping: {why}")
        if self.keeper is not None:
            self.keeper.phase = "STOPPING"
        self.end_trainer(graceful=True)
        if self.keeper is not None and not self.keeper.lost.is_set():
            sealed = self.seal_and_report(abort=self.lease_lost) or self.ckpt.newest_sealed()
            if self.sync is not None and sealed is not None and sealed.iteration > self.sync.synced_iteration():
                self.say(f"best effort: syncing checkpoint {sealed.iteration} to the Hub for up to "
                         f"{self.cfg.stop_grace_seconds:g} s")
                self.sync.sync_now(trainer_stopped=True)
                self.sync.wait_synced(sealed.iteration, self.cfg.stop_grace_seconds)
            self.release("PREEMPTED", why)
        self.drop_lease()
        self.exit_code = 0
        return "EXITED"

    def state_finishing(self) -> str:
        sealed = self.seal_and_report(abort=self.lease_lost)
        newest = sealed or self.ckpt.newest_sealed()
        # Completion is judged by the sealed checkpoint alone: what the trainer printed (slime's
        # train-step numbers run ahead of its iterations) proves nothing about what was saved.
        last = newest.iteration if newest else None
        if self.cfg.total_steps and (last is None or last < self.cfg.total_steps - 1):
            self.crash_reason = (f"trainer exited 0 with its last sealed checkpoint at iteration "
                                 f"{'none' if last is None else last}, before total_steps {self.cfg.total_steps} "
                                 "(a stopped job also exits 0)")
            return "CRASHED"
        reason = "trainer exited 0"
        final_on_hub = False
        if self.sync is not None and newest is not None:
            timeout = self.cfg.hf_final_sync_timeout_seconds
            self.say(f"syncing the final checkpoint {newest.iteration} to the Hub (for up to {timeout:g} s)")
            self.sync.sync_now(trainer_stopped=True)
            final_on_hub = self.sync.wait_synced(newest.iteration, timeout)
            if not final_on_hub:
                if self.lease_lost():
                    return "LOST"
                on_hub = self.sync.synced_iteration()
                # Said on the release, so the commander's record, `status` and the supervisor
                # (which keeps this pod) all know where the only copy is.
                reason += (f"; the final checkpoint {newest.iteration} is NOT on the Hub (the Hub has "
                           f"{f'checkpoint {on_hub}' if on_hub >= 0 else 'no checkpoint of this run'}): it is on "
                           f"{self.cfg.worker_id} in {self.ckpt.path}")
                self.say(f"WARNING: {reason}")
        if not self.release("COMPLETED", reason):
            # The commander never heard it: the run is not done in its records.  The next
            # grant restores this final checkpoint, the trainer exits at once, and we try again.
            self.say("the commander did not acknowledge the completion; trying again with a new lease")
            self.drop_lease()
            return "ACQUIRING"
        self.say(f"run {self.cfg.run_id} COMPLETED at step {self.progress.step}")
        revision = (self.sync.synced or {}).get("revision") if self.sync is not None and final_on_hub else None
        if revision:  # only a revision that holds the final checkpoint is the final model
            print(final_model_text(self.cfg.hf_repo, revision), flush=True)
        self.drop_lease()
        self.exit_code = 0
        return "EXITED"

    def release(self, status: str, reason: str) -> bool:
        """Hand the lease back with the last step and trainer lines; True once acknowledged.

        The keeper stops first, so no renewal in flight can take lines this payload needs or
        land after the release.  Retries until the lease deadline (a commander restart keeps
        the lease with a full TTL), so a brief outage does not lose a completion.
        """
        if self.lease is None or self.keeper is None:
            return False
        self.keeper.stop()
        payload = {"run_id": self.cfg.run_id, "worker_id": self.cfg.worker_id, "lease_token": self.lease.token,
                   "status": status, "reason": reason, "step": self.progress.step, "loss": self.progress.loss,
                   "log_lines": self.progress.take_lines(), "losses": self.progress.take_losses()}
        if self.unreported is not None:
            payload["latest_ckpt"] = self.unreported.summary()
        while not self.keeper.lost.is_set() and boottime() < self.keeper.deadline:
            reply = self._post("/api/lease/release", payload)
            if reply is not None:
                if reply.status != 200:
                    self.say(f"release answered {reply.status}: {reply.body.get('error', '')}")
                self.previous_token = ""
                return reply.status == 200
            time.sleep(min(1.0, max(0.0, self.keeper.deadline - boottime())))
        return False

    def drop_lease(self) -> None:
        self.unreported = None
        if self.sync is not None:
            self.sync.stop()
        if self.keeper is not None:
            self.keeper.stop()
        self.keeper = None
        self.lease = None


class MemberWorker(Worker):
    """The worker on node k > 0 of a multi-node run.  It joins the epoch node 0's worker holds
    (section 4), copies the checkpoint node 0 restored (section 6), runs this node's part of
    the trainer (slime: `ray start --address ... --block`) and renews its membership; its
    watchdog kills this node's trainer processes at its own deadline, as the holder's does.
    Seals, uploads and the run's progress are node 0's.

        ACQUIRING ─joined→ RESTORING → TRAINING ─trainer exit: leave (the epoch ends)→ ACQUIRING
            │  └─run over→ EXITED                    ├─epoch ended→ LOST ─leave→ ACQUIRING
            └─waiting for its cluster's epoch        └─SIGTERM→ STOPPING ─leave→ EXITED
    """

    def node0(self) -> NodePeer:
        return NodePeer(f"{self.cfg.master_addr}:{self.cfg.node_port}", self.cfg.relay_shared_secret)

    def state_acquiring(self) -> str:
        complaint = Complaint(self.say)
        said_waiting = False
        while not self.stop_requested.is_set():
            sent = boottime()
            payload = {"run_id": self.cfg.run_id, "worker_id": self.cfg.worker_id, "group": self.cfg.group,
                       "node_rank": self.cfg.node_rank, "address": f"{self.cfg.node_ip}:{self.cfg.node_port}"}
            if self.previous_token:
                payload["previous_member_token"] = self.previous_token
            body = self.ask_for_lease("/api/lease/join", payload, complaint)
            if body is None:
                continue
            ttl = trusted_ttl(body.get("lease_expires_in_sec"), self.cfg)
            if body.get("status") == "joined" and ttl is not None:
                self.lease = Lease(body["member_token"], int(body["epoch"]), ttl, sent, body.get("checkpoint"))
                self.previous_token = self.lease.token
                self.say(f"joined epoch {self.lease.epoch} of {body.get('holder')} as node {self.cfg.node_rank}")
                self.keeper = LeaseKeeper(self.client, self.cfg, self.lease, self.progress, self.watchdog,
                                          self._on_lease_lost, lambda: None, path="/api/lease/member",
                                          payload=self.member_payload)
                self.tell_setup_time()
                return "RESTORING"
            if self.run_has_ended(body.get("status")):
                return "EXITED"
            if not said_waiting:
                self.say(f"waiting for node 0 of {self.cfg.group} to hold run {self.cfg.run_id}")
                said_waiting = True
            self.stop_requested.wait(float(body.get("retry_after_sec", 1.0)))
        self.exit_code = 0
        return "EXITED"

    def member_payload(self) -> dict:
        """A member's renewal: its token alone (node 0 reports the run's progress)."""
        lease = self.lease
        return {"run_id": self.cfg.run_id, "worker_id": self.cfg.worker_id, "member_token": lease.token if lease else ""}

    def state_restoring(self) -> str:
        assert self.lease is not None and self.keeper is not None
        node0, complaint = self.node0(), Complaint(self.say)
        restored = None
        while restored is None and not self.aborting():
            try:
                restored = node0.ask(f"/restored/{self.lease.epoch}")
            except OSError as exc:
                complaint.still(f"node 0 has not restored yet: {exc}")
            if restored is None:
                self.wake.wait(0.5)
        if self.lease_lost():
            return "LOST"
        if self.stop_requested.is_set():
            return "STOPPING"
        assert restored is not None
        iteration = restored.get("iteration")
        try:
            copied = node0.copy_files(checked_file_listing(restored.get("files")), self.ckpt, self.aborting)
        except (OSError, ValueError, TypeError) as exc:
            self.leave(f"cannot copy checkpoint {iteration} from node 0: {exc}")
            return "ACQUIRING"
        self.ckpt.point_tracker_at(iteration if isinstance(iteration, int) else None)
        self.resume_iteration = iteration if isinstance(iteration, int) else None
        self.say(f"checkpoint {'none (a cold start)' if iteration is None else iteration} from node 0 is in place "
                 f"({copied} bytes copied)")
        return "TRAINING"

    def state_training(self) -> str:
        assert self.keeper is not None
        self.keeper.phase = "TRAINING"
        self.start_trainer()
        assert self.trainer is not None
        while True:
            self.wake.wait(self.SCAN_SECONDS)
            self.wake.clear()
            if self.lease_lost():
                return "LOST"
            if self.stop_requested.is_set():
                return "STOPPING"
            code = self.trainer.exit_code()
            if code is not None or not self.watchdog.alive():
                why = f"its trainer exited with status {code}" if code is not None else "its watchdog died"
                self.say(f"{why}: this node leaves epoch {self.lease.epoch if self.lease else '?'}, which ends it")
                self.end_trainer(graceful=False)
                if not self.watchdog.alive():
                    self.watchdog = self.keeper.watchdog = Watchdog.spawn()
                self.leave(why)
                return "ACQUIRING"
            reap_adopted_orphans({self.trainer.proc.pid, self.watchdog.pid})
            self.prune_below(int(self.keeper.answer.get("sealed_iteration", -1)))

    def prune_below(self, sealed: int) -> None:
        """This node's shards of iterations node 0 has sealed past, but the newest few."""
        for iteration in self.ckpt.iterations_on_disk()[:-self.cfg.keep_last_checkpoints]:
            if iteration < sealed:
                self.ckpt.remove(iteration)

    def state_lost(self) -> str:
        self.end_trainer(graceful=False)
        self.leave("its epoch ended")  # its trainer is dead: the next epoch need not wait for its expiry
        return "ACQUIRING"

    def state_stopping(self) -> str:
        self.say("stopping: worker stopped by a signal")
        self.end_trainer(graceful=True)
        self.leave("the worker was stopped")
        self.exit_code = 0
        return "EXITED"

    def leave(self, reason: str) -> None:
        """Tell the commander this node's trainer is dead (ending a live epoch); the lease goes."""
        if self.lease is not None and self.keeper is not None:
            self.keeper.stop()
            payload = {"run_id": self.cfg.run_id, "worker_id": self.cfg.worker_id, "member_token": self.lease.token,
                       "reason": reason}
            self.keeper = None  # (its deadline would cut the request short after a lost lease)
            give_up = boottime() + 5.0  # unheard, the commander forgets this node at its expiry anyway
            while self._post("/api/lease/leave", payload) is None and boottime() < give_up:
                time.sleep(1.0)
        self.drop_lease()


def checked_file_listing(files: Any) -> dict[str, tuple[int, str]]:
    """A listing another node sent ({path: [size, sha256]}), refused unless every path stays
    inside the checkpoint folder."""
    if not isinstance(files, dict):
        raise ValueError("the listing is not an object")
    checked = {}
    for rel, entry in files.items():
        parts = str(rel).split("/")
        if rel.startswith("/") or ".." in parts or not (isinstance(entry, list) and len(entry) == 2
                                                         and isinstance(entry[0], int) and isinstance(entry[1], str)):
            raise ValueError(f"the listing names {rel!r}")
        checked[rel] = (entry[0], entry[1])
    return checked


def run_worker(config_path: str) -> int:
    cfg = load_run_config(config_path)
    check_slime_flags(cfg)
    if not cfg.trainer_command and not os.path.exists(os.path.join(HERE, f"launch_{cfg.mode}.sh")):
        raise UserError(f"launch_{cfg.mode}.sh is not next to relay.py ({HERE}); copy it there or set trainer_command")
    try:
        os.makedirs(cfg.run_dir, exist_ok=True)
    except OSError as exc:
        raise UserError(f"l1_root {cfg.l1_root}: cannot create the run folder: {exc.strerror}") from None
    set_process_name("relay-worker")
    become_child_subreaper()  # see section 7: the trainer's processes stay below the worker
    watchdog = Watchdog.fork()  # first: no thread may exist yet (see Watchdog)
    if cfg.node_rank > 0:  # node 0 alone talks to the Hub
        return MemberWorker(cfg, watchdog).run()
    hub = HubStore(cfg) if cfg.hf_repo else None
    if hub is not None:
        hub.check()
    return Worker(cfg, watchdog, hub).run()


###############################################################################
# 9. Lium and launch-stack ####################################################
###############################################################################
#
# launch-stack drives the `lium` command (lium.io 0.32).  Every pod it rents gets a name unique
# to its attempt and is written to a local state file BEFORE `lium up` runs, with the ids of the
# pods that already bear that name (never ours); its own id, from `up --json` or from the error
# of a failed `up`, is recorded next, and every later lium call names the pod by that id.  So a
# pod left billing by a failed `up`, or by a crash of launch-stack itself, can always be found
# and removed, a restarted supervisor adopts its pods instead of renting new ones, and a pod of
# the same name that someone else rented is never touched.

# Lium's pod statuses (upper case in `lium ps`).  A dead or dying pod is removed and replaced at
# once: it cannot work, and some still bill (REBOOT_FAILED).  Any other status is logged and
# counts as live only for no_lease_grace_seconds.
POD_LIVE_STATUSES = ("PENDING", "STARTING", "RUNNING", "REBOOT_PENDING")
POD_DEAD_STATUSES = ("FAILED", "STOPPED", "ERROR", "TERMINATED", "DELETED", "REMOVED", "CANCELLED", "CREATION_FAILED",
                     "BROKEN", "REBOOT_FAILED", "DELETING")
# `lium up` error codes after which a pod may exist although no id came back.
RENT_UNANSWERED = ("rent_outcome_unknown", "api_timeout")
# `lium up` exit 6: the account's balance (a 403) or the API key's budget (a 402) refused the rent;
# renting again cannot help until someone adds funds (lium.io 0.32 cli/utils.py `_classify_sdk_error`).
LIUM_FUNDS_REFUSED = ("insufficient_balance", "budget_exceeded")
# `lium clusters up` error codes after which the nodes are, or may be, rented and billing: a second
# `up` could rent a second cluster; `clusters ps` shows the first (lium.io 0.32 cli/clusters/command.py
# 210-267).  The error's data names the cluster (`cluster_id`) or its members (`pod_ids`) when it can.
CLUSTER_RENT_BILLING = ("cluster_rented_not_listed", "cluster_rent_uncertain", "cluster_not_ready",
                        "cluster_member_failed", "cluster_ttl_not_scheduled")
COMMANDER_CA_FILENAME = "commander_ca.pem"  # stack.yaml commander.tls_ca_file, on the pod beside run.yaml


class LiumError(Exception):
    """`lium` failed; the message is its own (from the JSON error envelope when there is one),
    `code` and `data` the envelope's (`data.pod_id` names a pod a failed `up` left billing)."""

    def __init__(self, message: str, code: str = "", data: dict | None = None) -> None:
        super().__init__(message)
        self.code, self.data = code, data or {}


class BudgetReached(Exception):
    """relay.budget_usd allows no new pod."""


class EveryPodWouldFail(Exception):
    """A pod's worker failed for a reason the next pod would meet too (its config, an unreachable
    commander): renting another would only bill again."""


WORKER_LOG_TAIL_LINES = 40
SUCCESS_MARKS = ("reached the commander", "lease granted", "standing by")  # the worker got past the commander


def failure_every_pod_meets(lines: list[str]) -> str:
    """Why a worker failed, from the end of its log, when that reason is not the pod's own: an
    exit 2 (a configuration mistake: `relay: error: ...`), or a commander it never reached.
    '' for anything else (a preemption, a crash of this pod's trainer)."""
    errors = [line.split("relay: error: ", 1)[1] for line in lines if "relay: error: " in line]
    if errors:
        return errors[-1]
    unreachable = [line for line in lines if "cannot reach the commander" in line]
    if unreachable and not any(mark in line for line in lines for mark in SUCCESS_MARKS):
        return unreachable[-1]
    return ""


def choose_fabric(offers: list[dict], gpu: str, gpus_per_node: int, nodes: int) -> str:
    """The fabric to rent `nodes` whole nodes on, from `lium clusters list --format json` rows: the
    cheapest per node among those with `nodes` nodes free, of GPU type `gpu` (any when empty) with at
    least `gpus_per_node` GPUs each; InfiniBand before RoCE at one price (the faster wire for the
    same money).  LiumError `no_fabric`, naming what is offered, when none fits."""
    fits = [offer for offer in offers
            if int(offer.get("free_count") or 0) >= nodes and int(offer.get("gpus_per_node") or 0) >= gpus_per_node
            and (not gpu or str(offer.get("gpu_type") or "").upper() == gpu.upper())]
    if not fits:
        offered = "; ".join(f"{offer.get('fabric_id')} has {offer.get('free_count')} of {offer.get('node_count')} "
                            f"{offer.get('gpus_per_node')}×{offer.get('gpu_type')} nodes free" for offer in offers)
        raise LiumError(f"no Lium fabric has {nodes} nodes of {gpus_per_node}×{gpu or 'any GPU'} free "
                        f"({offered or '`lium clusters list` shows no fabric'})", "no_fabric")
    cheapest = min(fits, key=lambda offer: (float(offer.get("price_per_node_hour") or 0.0),
                                            offer.get("fabric_type") != "infiniband", str(offer["fabric_id"])))
    return str(cheapest["fabric_id"])


def lium_cluster_named_in(message: str) -> dict:
    """What a `lium clusters up` error message names that may bill: the cluster's id ("Cluster <id>
    not ready", "Cluster <id>: member ... is CREATION_FAILED") or its members' ids ("confirmed (pods
    <id>, <id>)", when no cluster id is known yet)."""
    named: dict = {}
    if found := re.search(r"Cluster ([0-9a-fA-F-]{36})\b", message):
        named["cluster_id"] = found.group(1)
    if found := re.search(r"\(pods ([^)]*)\)", message):
        named["pod_ids"] = [pod.strip() for pod in found.group(1).split(",") if pod.strip()]
    return named


@dataclass
class Execution:
    """One `lium exec --json` result: the remote command's own exit code and output, or why
    it could not run (`error`: SSH trouble, pod gone)."""

    exit_code: int
    stdout: str = ""
    stderr: str = ""
    error: str = ""


class Lium:
    """The `lium` command, or with dry_run a printout of each command it would run.  Pods are
    always named by their id: names are not unique in an account."""

    def __init__(self, dry_run: bool) -> None:
        self.dry_run = dry_run
        if not dry_run and shutil.which("lium") is None:
            raise UserError("the lium command is not installed: pip install lium.io (and set LIUM_API_KEY)")

    def run(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess:
        if self.dry_run:
            print(f"would run: {shlex.join(['lium', *args])}", flush=True)
            return subprocess.CompletedProcess(args, 0, "", "")
        return self.query(*args, timeout=timeout)

    def query(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """A `lium` call, made in a dry run too (the preflight's, which only read).  A wide terminal:
        `volumes list` prints a table only, whose columns would fold at 80."""
        env = dict(os.environ, LIUM_NONINTERACTIVE="1", LIUM_OUTPUT="json", LIUM_SELF_UPDATE_DISABLE="1", COLUMNS="250")
        try:
            return subprocess.run(["lium", *args], capture_output=True, text=True, timeout=timeout, env=env,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(args, 124, "", f"lium {args[0]} did not answer within {timeout:.0f} s")

    @staticmethod
    def json_rows(result: subprocess.CompletedProcess) -> list[dict]:
        """The rows of a `--format json` listing ([] when it failed or printed something else)."""
        with contextlib.suppress(ValueError):
            rows = json.loads(result.stdout or "[]") if result.returncode == 0 else []
            return [row for row in rows if isinstance(row, dict)] if isinstance(rows, list) else []
        return []

    @staticmethod
    def envelope(result: subprocess.CompletedProcess) -> dict:
        """The JSON error envelope on the last stderr line ({} when there is none)."""
        lines = [line for line in (result.stderr or "").strip().splitlines() if line.strip()]
        with contextlib.suppress(ValueError, IndexError):
            document = json.loads(lines[-1])
            if isinstance(document, dict) and isinstance(document.get("error"), dict):
                return document
        return {}

    @classmethod
    def error_text(cls, result: subprocess.CompletedProcess) -> str:
        error = cls.envelope(result).get("error")
        if error:
            hint = f" ({error['hint']})" if error.get("hint") else ""
            return f"{error.get('message', 'error')}{hint} [exit {result.returncode}]"
        lines = [line for line in (result.stderr or result.stdout or "").strip().splitlines() if line.strip()]
        return f"{lines[-1] if lines else 'no message'} [exit {result.returncode}]"

    def check(self, result: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
        if result.returncode != 0:
            document = self.envelope(result)
            data = document.get("data")
            raise LiumError(f"lium {what} failed: {self.error_text(result)}", str(document.get("error", {}).get("code", "")),
                            data if isinstance(data, dict) else None)
        return result

    def up(self, group: LiumGroup, name: str, volume: str, budget_usd: float | None) -> dict:
        """Rent a pod and wait until it is RUNNING; its `lium ps` row (id, huid, price ...)."""
        # `up` needs a node or a filter; --gpu alone rents one GPU, -c the rest of a node.
        what = [group.node] if group.node else ["--gpu", group.gpu, "-c", str(group.gpu_count)]
        args = ["up", *what, "--name", name, "--template_id", group.template_id,
                "--timeout", str(math.ceil(group.up_timeout_seconds))]
        for flag, value in (("--volume", volume), ("--ttl", group.ttl),
                            ("--budget", f"{budget_usd:.2f}" if budget_usd is not None else "")):
            if value:
                args += [flag, value]
        # --json: without it (or --no-ssh) `up` opens an interactive SSH session when ready.
        result = self.check(self.run(*args, "-y", "--json",
                                     timeout=group.up_timeout_seconds + 120), "up")
        if self.dry_run:
            return {}
        try:
            pod = json.loads(result.stdout)["pod"]
            pod["id"]  # noqa: B018 (the one field everything after relies on)
        except (ValueError, KeyError, TypeError):
            raise LiumError(f"lium up printed no pod: {result.stdout[:200]!r}") from None
        return pod

    def listing(self, *args: str, key: str = "id", read_in_dry_run: bool = False) -> list[dict]:
        """A `--format json` listing's rows with a `key` ([] in a dry run unless `read_in_dry_run`: a
        listing only reads); a failed call or output that is not JSON is a LiumError, never an empty
        account."""
        if self.dry_run and not read_in_dry_run:
            return []
        what = " ".join(args)
        result = self.check(self.query(*args, "--format", "json", timeout=120), what)
        try:
            rows = json.loads(result.stdout or "[]")
        except ValueError:
            raise LiumError(f"lium {what} printed something that is not JSON: {result.stdout[:200]!r}") from None
        return [row for row in rows if isinstance(row, dict) and row.get(key)] if isinstance(rows, list) else []

    def pods(self) -> list[dict]:
        """`lium ps`: every pod of the account, ours or not (cluster members too, without their cluster)."""
        return self.listing("ps")

    def exec(self, pod: str, command: str, timeout: float = 300.0) -> Execution:
        # --json: plain `exec` prints its own lines ("Executing on ...") among the command's output.
        result = self.run("exec", pod, "--json", command, timeout=timeout)
        if self.dry_run:
            return Execution(0)
        with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
            ran = json.loads(result.stdout)["results"][0]
            return Execution(int(ran["exit_code"]), str(ran.get("stdout") or ""), str(ran.get("stderr") or ""),
                             str(ran.get("error") or ""))
        return Execution(result.returncode or 1, error=self.error_text(result))

    def scp(self, pod: str, local: str, remote: str) -> None:
        self.check(self.run("scp", pod, local, remote, timeout=1800), f"scp to {pod}")

    def remove(self, pod: str) -> float | None:
        """Remove a pod; what it spent by Lium's estimate (None when it was already gone)."""
        result = self.run("rm", pod, "-y", "--format", "json", timeout=300)
        if result.returncode == 5:  # no such pod: already gone
            return None
        self.check(result, f"rm {pod}")
        with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
            return float(json.loads(result.stdout)["removed"][0]["spent_usd"])
        return None

    @staticmethod
    def printed_document(result: subprocess.CompletedProcess) -> dict:
        """The JSON object a command printed on stdout ({} when none)."""
        with contextlib.suppress(ValueError):
            document = json.loads(result.stdout or "{}")
            return document if isinstance(document, dict) else {}
        return {}

    # -- clusters: several whole nodes on one fabric (`lium clusters`, lium.io 0.32) --------------

    def cluster_up(self, group: LiumGroup, name: str, nodes: int, fabric: str = "",
                   cluster_template_id: str = "") -> dict:
        """Rent `nodes` whole nodes of one fabric as a cluster and wait until every member is RUNNING
        with SSH (`lium clusters up`): the printed cluster, {id, name, status, size, master_addr,
        price_per_hour, hostfile, removal_scheduled_at, pods: [{id, huid, name, status, node_rank,
        overlay_ip, ssh_cmd, host, ssh_port, ports, gpu_type, gpu_count, price_per_hour}]}.
        `fabric` empty: the cheapest that fits group.gpu × group.gpu_count (choose_fabric).  Every
        member has the same name and gets group.ttl.  The template is the newest
        `daturaai/lium-cluster` one unless `cluster_template_id` names another of that image: Lium
        refuses any other image on a cluster, so group.template_id is not used.  A LiumError whose
        code is in CLUSTER_RENT_BILLING may leave nodes billing: its data names the cluster
        (`cluster_id`) or the members (`pod_ids`) when lium did."""
        if not fabric:
            fabric = choose_fabric(self.listing("clusters", "list", key="fabric_id", read_in_dry_run=True), group.gpu, group.gpu_count, nodes)
        args = ["clusters", "up", fabric, "--nodes", str(nodes), "--name", name,
                "--timeout", str(math.ceil(group.up_timeout_seconds))]
        for flag, value in (("--template_id", cluster_template_id), ("--ttl", group.ttl)):
            if value:
                args += [flag, value]
        # `up` waits (--wait is its default) polling every 10 s, so it may outlast --timeout by that much.
        result = self.run(*args, "-y", "--format", "json", timeout=group.up_timeout_seconds + 120)
        if self.dry_run:
            return {}
        cluster = self.printed_document(result)
        if result.returncode != 0 and cluster.get("ok") is False and cluster.get("id"):
            # --ttl failed on some member: the cluster is printed with ok false and the members
            # without a removal time (cli/clusters/command.py:241-245), no error envelope
            raise LiumError(f"lium clusters up failed: {cluster.get('error')} [exit {result.returncode}]",
                            "cluster_ttl_not_scheduled", {"cluster_id": cluster["id"],
                                                          "unscheduled": cluster.get("unscheduled")})
        try:
            self.check(result, "clusters up")
        except LiumError as exc:
            if exc.code in CLUSTER_RENT_BILLING:
                exc.data = {**lium_cluster_named_in(str(exc)), **exc.data}
            raise
        if not cluster.get("id") or not isinstance(cluster.get("pods"), list):
            raise LiumError(f"lium clusters up printed no cluster: {result.stdout[:200]!r}")
        return cluster

    def clusters(self) -> list[dict]:
        """`lium clusters ps`: every cluster of the account, each as `cluster_up` returns it (no
        removal_scheduled_at); a cluster's status is its first member's that is not RUNNING."""
        return self.listing("clusters", "ps")

    def cluster_remove(self, cluster_id: str) -> float | None:
        """Remove every member of a cluster (`lium clusters rm`, one API call); what the removed
        members spent by Lium's estimate, read from `lium ps` just before (`clusters rm` reports no
        spend); None when no member carries the id any more (already gone).  A member the API failed
        to remove keeps billing: LiumError `cluster_removal_failed` with its id in data.pod_ids."""
        spent = {row["id"]: row.get("spent_usd") for row in self.pods()}
        result = self.run("clusters", "rm", cluster_id, "-y", "--format", "json", timeout=300)
        if result.returncode == 5 or self.dry_run:  # cluster_not_found: no pod carries the id
            return None
        removal = self.printed_document(result)
        members = [row for row in removal.get("results") or [] if isinstance(row, dict)]
        if result.returncode != 0 and removal.get("ok") is False:  # per-member results on stdout, no envelope
            raise LiumError(f"lium clusters rm {cluster_id} failed: {removal.get('error')} [exit {result.returncode}]",
                            "cluster_removal_failed", {"cluster_id": cluster_id,
                                                       "pod_ids": [row.get("pod") for row in members if not row.get("success")]})
        self.check(result, f"clusters rm {cluster_id}")
        return round(sum((float(spent.get(row.get("pod")) or 0.0) for row in members if row.get("success")), 0.0), 2)


@dataclass
class PodRecord:
    name: str
    created_at: float
    state: str = "creating"  # creating -> active -> removed
    has_volume: bool = False  # lium.volume is attached to it (one pod at a time)
    id: str = ""  # Lium's pod id, from `up --json`: every lium call names the pod by it
    huid: str = ""
    price_per_hour: float = 0.0
    spent_usd: float = 0.0  # as `lium ps` last showed it; final from `lium rm`
    # Pods of this name that existed before our `up`: never ours, whatever their name says.
    foreign_ids: list = field(default_factory=list)
    node_rank: int = 0  # a member of a cluster: its place (0: the master) and address on its overlay
    overlay_ip: str = ""

    @property
    def label(self) -> str:
        return f"{self.name} ({self.huid or self.id})" if self.id else self.name

    @property
    def ref(self) -> str:
        """How lium calls name the pod: its id (a dry run has none yet)."""
        return self.id or f"<id of {self.name}>"


@dataclass
class ClusterRecord:
    """A Lium cluster rented for a multi-node run: one unit, rented, lost and removed whole.
    Its members are pods (`lium exec`/`scp` by id) named {cluster name}-node{k} here, which
    is also their worker's id (in Lium every member bears the cluster's name)."""

    name: str
    created_at: float
    state: str = "creating"  # creating -> active -> (keeping: node 0 alone holds the last checkpoint) -> removed
    id: str = ""  # Lium's cluster id, from `clusters up`
    nodes: int = 2
    members: list = field(default_factory=list)  # PodRecords, by node rank
    foreign_ids: list = field(default_factory=list)  # clusters of this name before our `up`

    @property
    def label(self) -> str:
        return f"{self.name} ({self.id[:8]})" if self.id else self.name

    @property
    def spent_usd(self) -> float:
        return sum(member.spent_usd for member in self.members)

    @property
    def price_per_hour(self) -> float:
        return sum(member.price_per_hour for member in self.members)


class StackState:
    """launch-stack's own record of the pods it rented (JSON, 0600), written before each `up`,
    shared by its parts: the commander's and the supervisor's process, the fleet's rents.
    (Keys are only ever added: a file an older relay wrote loads, its missing keys empty.)"""

    def __init__(self, path: str, run_id: str, persist: bool) -> None:
        self.path, self.run_id, self.persist = path, run_id, persist
        self.attempts = 0
        self.pods: list[PodRecord] = []
        self.clusters: list[ClusterRecord] = []  # lium.nodes > 1
        # The commander launch-stack started: its pid and start time (the pid file holds the pid
        # alone, for `kill $(cat commander.pid)`; the pair names one process for good).
        self.commander: dict = {}
        self.supervisor: dict = {}  # the same for a `launch-stack --supervise` of this stack
        if persist and os.path.exists(path):
            self.load()

    def load(self) -> None:
        """Read the file (again, after a supervisor that kept writing it was stopped)."""
        try:
            with open(self.path, encoding="utf-8") as handle:
                data = json.load(handle)
            self.attempts = int(data["attempts"])
            self.pods = [PodRecord(**pod) for pod in data["pods"]]
            self.clusters = [ClusterRecord(**dict(cluster, members=[PodRecord(**m) for m in cluster["members"]]))
                             for cluster in data.get("clusters") or []]
            self.commander = dict(data.get("commander") or {})
            self.supervisor = dict(data.get("supervisor") or {})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"stack state file {self.path} is unreadable ({exc}); move it away to start afresh") from None
        if data.get("run_id") != self.run_id:
            raise UserError(f"stack state file {self.path} belongs to run {data.get('run_id')!r}, not {self.run_id!r}; "
                            "set relay.state_path to a file of its own")

    def save(self) -> None:
        if self.persist:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            atomic_write(self.path, json.dumps({"run_id": self.run_id, "attempts": self.attempts, "commander": self.commander,
                                                "supervisor": self.supervisor,
                                                "pods": [dataclasses.asdict(p) for p in self.pods],
                                                "clusters": [dataclasses.asdict(c) for c in self.clusters]},
                                               indent=1).encode())


# -- preflight: nothing is rented that cannot work ----------------------------------------
#
# A pod rented for a stack that cannot work bills until the supervisor gives up on it
# (no_lease_grace_seconds), and the reason is in a log that goes with the pod.  So every
# check that can be made from this box is made before the first rent, and each failure is
# one line naming the field and the fix.

PLACEHOLDER = re.compile(r"YOUR_|\bCHANGE_?ME\b")  # what the shipped examples leave for the user to fill in
# RFC 5737's documentation networks and RFC 2606's example domains: never a real commander
EXAMPLE_NETWORKS = tuple(ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"))
EXAMPLE_DOMAIN = re.compile(r"(^|\.)example\.(com|net|org)$", re.I)
MIN_SECRET_BYTES = 32
UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


@dataclass
class Check:
    """One preflight check: what it looked at (a field or a secret), and its problem ('' if none)."""

    what: str
    problem: str = ""
    found: str = ""  # what was found, when it passed (or why it was not checked)

    def line(self) -> str:
        if self.problem:
            return f"preflight: {self.what}: {self.problem}"
        return f"preflight ok: {self.what}: {self.found or 'ok'}"


ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def env_reference(value: str) -> str | None:
    """NAME when a worker.env / run.env value is exactly ${NAME}: taken from launch-stack's own
    environment.  Only a whole value: `$VAR` and `${VAR}` inside a command are the pod shell's."""
    match = ENV_REFERENCE.fullmatch(value)
    return match.group(1) if match else None


def env_from_here(env: dict) -> dict[str, str]:
    """An env map with its ${NAME} values taken from this process's environment."""
    return {key: os.environ.get(name, "") if (name := env_reference(value)) else value for key, value in env.items()}


def env_reference_checks(cfg: StackConfig) -> list[Check]:
    """Each ${NAME} of worker.env and run.env is set here (its value is never printed)."""
    checks = []
    for group, env in (("worker.env", cfg.worker.env), ("run.env", cfg.run.env)):
        for key, value in env.items():
            name = env_reference(value)
            if name and not os.environ.get(name):
                checks.append(Check(f"{group}.{key}", f"${{{name}}} is not set where launch-stack runs: export {name}=..."))
            elif name:
                checks.append(Check(f"{group}.{key}", found=f"${{{name}}} is set here (*** {len(os.environ[name])} "
                                                           "characters; it travels in the pod's 0600 relay.env)"))
    return checks


def is_example_host(host: str) -> bool:
    with contextlib.suppress(ValueError):
        return any(ipaddress.ip_address(host) in net for net in EXAMPLE_NETWORKS)
    return bool(EXAMPLE_DOMAIN.search(host))


def placeholder_checks(cfg: StackConfig) -> list[Check]:
    """Every field still holding a placeholder of the examples (YOUR_..., a documentation address)."""
    checks = []
    groups = {"commander": cfg.commander, "lium": cfg.lium, "run": cfg.run, "worker": cfg.worker}
    for group, record in groups.items():
        for name, value in dataclasses.asdict(record).items():
            if group == "run" and name in ("commander_url", "worker_id", "relay_shared_secret"):
                continue  # set by launch-stack, not by the user
            items = value.items() if isinstance(value, dict) else [("", value)]
            for key, text in items:
                where = f"{group}.{name}{f'.{key}' if key else ''}"
                host = urllib.parse.urlsplit(text).hostname or "" if isinstance(text, str) and "://" in text else ""
                if isinstance(text, str) and PLACEHOLDER.search(text):
                    checks.append(Check(where, f"{text!r} is a placeholder of the example: put your own value there"))
                elif host and is_example_host(host):
                    checks.append(Check(where, f"{text!r} is a documentation address ({host}), not a real one: "
                                               "put your own there"))
    return checks


def secret_checks(cfg: StackConfig) -> list[Check]:
    """A commander that listens beyond loopback needs a long shared secret."""
    public_host = urllib.parse.urlsplit(cfg.run.commander_url).hostname or ""
    if is_loopback(cfg.commander.host) and is_loopback(public_host):
        return []
    fix = "export RELAY_SHARED_SECRET=\"$(python3 -c 'import secrets; print(secrets.token_hex(32))')\""
    size = len(cfg.secret.encode())
    if not size:
        return [Check("RELAY_SHARED_SECRET", f"not set, and the commander at {cfg.run.commander_url} is reachable from "
                                             f"other machines: {fix}")]
    if size < MIN_SECRET_BYTES:
        return [Check("RELAY_SHARED_SECRET", f"{size} bytes; a commander reachable from other machines needs at least "
                                             f"{MIN_SECRET_BYTES}: {fix}")]
    return [Check("RELAY_SHARED_SECRET", found=f"{size} bytes")]


def public_url_checks(cfg: StackConfig, lium_is_remote: bool) -> list[Check]:
    """commander.public_url names a host that resolves, and one a pod on Lium can reach."""
    url = cfg.run.commander_url
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if is_example_host(host) or PLACEHOLDER.search(url):
        return []  # said by placeholder_checks
    try:
        addresses = sorted({info[4][0] for info in socket.getaddrinfo(host, parts.port or 80, type=socket.SOCK_STREAM)})
    except (OSError, UnicodeError) as exc:
        return [Check("commander.public_url", f"host {host!r} does not resolve ({exc}): set the address pods reach "
                                              "this machine at")]
    if lium_is_remote and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        return [Check("commander.public_url", f"{url} is a loopback address, which no Lium pod can reach: set "
                                              "commander.host: 0.0.0.0 and public_url: http://THIS_MACHINES_PUBLIC_IP:PORT")]
    return [Check("commander.public_url", found=f"{host} resolves to {', '.join(addresses)}")]


def commander_answer_check(url: str, ca_file: str) -> Check:
    """GET /api/health at the URL the pods will use, from this box."""
    client = CommanderClient(url, timeout=5, ca_file=ca_file)
    try:
        reply = client.get("/api/health")
    except CommanderUnreachable as exc:
        return Check("commander.public_url", f"{exc}: pods would not reach it either; set public_url to an address of "
                                             "this machine that is open to the internet (firewall, port)")
    if not is_relay_commander(reply):
        return Check("commander.public_url", f"{url} answers, but not as a relay commander (HTTP {reply.status}): "
                                             "another service has that address or port")
    return Check("commander.public_url", found=f"{url}/api/health answers from this box (relay {reply.body['version']})")


def lium_checks(cfg: StackConfig, lium: Lium) -> list[Check]:
    """The key works, and the template, volume and node (or GPU type) exist: read with the real CLI,
    the calls side by side (each is about a second of CPU)."""
    group = cfg.lium
    calls = {"key": ("whoami", "--json"), "templates": ("templates", "--format", "json"), "nodes": ("ls", "--format", "json")}
    if group.nodes > 1:  # whole nodes on one fabric: `clusters list` offers them, not `ls`
        calls["nodes"] = ("clusters", "list", "--format", "json")
    if group.volume:
        calls["volumes"] = ("volumes", "list")
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        futures = {name: pool.submit(lium.query, *args) for name, args in calls.items()}
        results = {name: future.result() for name, future in futures.items()}
    if results["key"].returncode != 0:
        return [Check("LIUM_API_KEY", f"Lium refuses it ({Lium.error_text(results['key'])}): export LIUM_API_KEY with a "
                                      "key of your lium.io account (or run `lium init`)")]
    checks = [Check("LIUM_API_KEY", found="Lium accepts it")]
    if group.nodes > 1:
        try:
            fabric = group.fabric or choose_fabric(Lium.json_rows(results["nodes"]), group.gpu, group.gpu_count, group.nodes)
            checks.append(Check("lium.nodes", found=f"fabric {fabric} for {group.nodes} nodes of {group.gpu_count} {group.gpu}"))
        except LiumError as exc:
            checks.append(Check("lium.nodes", f"{exc}: lower lium.nodes, pick another GPU type, or wait"))
        if not group.template_id:  # the CLI takes the newest daturaai/lium-cluster template
            return checks
    templates = Lium.json_rows(results["templates"])
    template = next((row for row in templates if group.template_id in (row.get("id"), row.get("huid"))), None)
    checks.append(Check("lium.template_id", found=f"template {template.get('name')} ({template.get('docker_image')}:"
                                                  f"{template.get('docker_image_tag')})") if template else
                  Check("lium.template_id", f"no template {group.template_id!r} among the {len(templates)} `lium templates` "
                                            "lists: use the id of your relay-trainer template (`lium templates --format json`)"))
    huid = group.volume.split(":", 1)[1] if group.volume else ""
    if UUID_RE.fullmatch(huid):  # `volumes list` shows HUIDs only
        checks.append(Check("lium.volume", found=f"not checked: {huid} is an id; `lium volumes list` shows HUIDs"))
    elif huid:
        listed = results["volumes"].returncode == 0 and re.search(rf"(?<!\S){re.escape(huid)}(?!\S)", results["volumes"].stdout)
        checks.append(Check("lium.volume", found=f"volume {huid} exists") if listed else
                      Check("lium.volume", f"no volume {huid!r} in `lium volumes list`: create one with `lium volumes new "
                                           "NAME` and use the HUID it lists"))
    nodes = Lium.json_rows(results["nodes"])
    if group.nodes > 1:
        return checks
    if group.node:
        node = next((row for row in nodes if group.node in (row.get("id"), row.get("huid"))), None)
        checks.append(Check("lium.node", found=f"node {node.get('huid')} ({node.get('config')}, "
                                              f"${node.get('price_per_hour')}/h)") if node else
                      Check("lium.node", f"no node {group.node!r} among the {len(nodes)} `lium ls` shows (rented by "
                                         "someone else, or a typo): pick one from `lium ls`, or set lium.gpu instead"))
    else:
        kinds = {str(row.get("gpu_type")).lower() for row in nodes}
        offering = [row for row in nodes if str(row.get("gpu_type")).lower() == group.gpu.lower()
                    and int(row.get("available_gpu_count") or 0) >= group.gpu_count]
        if offering:
            checks.append(Check("lium.gpu", found=f"{len(offering)} node(s) offer {group.gpu_count} {group.gpu}, from "
                                                 f"${min(float(r.get('price_per_hour') or 0) for r in offering):g}/h"))
        elif group.gpu.lower() in kinds:
            checks.append(Check("lium.gpu", f"no node has {group.gpu_count} free {group.gpu} now (`lium ls --gpu "
                                            f"{group.gpu}`): lower lium.gpu_count, pick another GPU type, or wait"))
        else:
            checks.append(Check("lium.gpu", f"no node offers GPU type {group.gpu!r} (`lium ls` shows "
                                            f"{', '.join(sorted(kinds)) or 'none'}): use one of those"))
    return checks


def hub_checks(cfg: StackConfig) -> list[Check]:
    """run.hf_repo set: the token the pods will get is here, may write the repo, and the repo is
    private (unless allowed).  Read only: a missing repo is created by the worker, private."""
    repo = cfg.run.hf_repo
    if not repo or cfg.run.hf_dry_run:
        return []
    worker_env = env_from_here(cfg.worker.env)
    token = os.environ.get("HF_TOKEN") or worker_env.get("HF_TOKEN", "")
    if not token:
        return [Check("HF_TOKEN", f"run.hf_repo is {repo} but HF_TOKEN is not set where launch-stack runs (it is what "
                                  "the pods get): export HF_TOKEN=hf_... (a token with write access)")]
    try:
        import huggingface_hub  # noqa: PLC0415  (only stacks with hf_repo need it)
    except ImportError:
        return [Check("run.hf_repo", "checking the repo needs huggingface_hub here: pip install huggingface_hub")]
    endpoint = worker_env.get("HF_ENDPOINT") or os.environ.get("HF_ENDPOINT") or None
    api = huggingface_hub.HfApi(endpoint=endpoint, token=token)
    try:
        role = ((api.whoami().get("auth") or {}).get("accessToken") or {}).get("role", "")
    except Exception as exc:  # noqa: BLE001  (the client raises many types; all mean "this token cannot be used")
        return [Check("HF_TOKEN", f"the Hub refuses it ({hub_error_text(exc)}): export a valid token")]
    from huggingface_hub.errors import RepositoryNotFoundError  # noqa: PLC0415

    try:
        private = api.repo_info(repo).private
    except RepositoryNotFoundError:
        if role == "read":
            return [Check("HF_TOKEN", f"a read-only token cannot create {repo}: use a token with write access")]
        return [Check("run.hf_repo", found=f"{repo} does not exist yet: the first worker creates it, private")]
    except Exception as exc:  # noqa: BLE001
        return [Check("run.hf_repo", f"{repo}: {hub_error_text(exc)}")]
    try:
        api.auth_check(repo, write=True)
    except Exception as exc:  # noqa: BLE001  (any answer but yes means no upload will work)
        return [Check("HF_TOKEN", f"it cannot write to {repo} ({hub_error_text(exc)}): use a token with write access")]
    if not private and not cfg.run.hf_allow_public:
        return [Check("run.hf_repo", f"{repo} is a PUBLIC repo: checkpoints uploaded there are published; make it "
                                     "private, or set run.hf_allow_public: true")]
    return [Check("run.hf_repo", found=f"{repo} is {'private' if private else 'public (allowed)'} and HF_TOKEN may write it")]


def slime_checks(cfg: StackConfig) -> list[Check]:
    """The slime command the pods will run passes slime only flags it knows (a typo would be
    dropped without a word, days into the run)."""
    name = f"SLIME_{cfg.run.mode.upper()}_CMD"
    command = cfg.run.trainer_command or {**env_from_here(cfg.worker.env), **env_from_here(cfg.run.env)}.get(name, "")
    if not cfg.run.check_slime_flags or not slime_command_flags(command):
        return []
    where = "run.trainer_command" if cfg.run.trainer_command else f"worker.env.{name}"
    problem = slime_flags_problem(command)
    return [Check(where, problem) if problem else
            Check(where, found=f"slime knows all {len(set(slime_command_flags(command)))} flags of the command")]


def preflight(cfg: StackConfig, lium: Lium) -> list[Check]:
    """Every check that needs no running commander, in the order a user fixes them."""
    checks = placeholder_checks(cfg) + env_reference_checks(cfg) + secret_checks(cfg) + slime_checks(cfg)
    lium_base = urllib.parse.urlsplit(os.environ.get("LIUM_BASE_URL", "https://lium.io/api")).hostname or ""
    checks += public_url_checks(cfg, lium_is_remote=not is_loopback(lium_base))
    if shutil.which("lium") is None:
        checks.append(Check("lium", "the lium command is not installed: pip install lium.io (and set LIUM_API_KEY)"))
    else:
        checks += lium_checks(cfg, lium)
    return checks + hub_checks(cfg)


COMMANDER_SILENT_POLLS = 3  # unanswered polls of a commander whose process lives before it is restarted
SUPERVISOR_POLL_TIMEOUT_SECONDS = 3.0  # how long one poll waits for the commander (see LocalCommander.run_record)


def process_start_ticks(pid: int) -> int | None:
    """When `pid` started (clock ticks after boot: /proc/PID/stat field 22); None if it is gone.
    A pid and its start time name one process: the system may give a dead one's pid to another."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def recorded_pid(pid_path: str, record: dict) -> int | None:
    """The pid in a pid file (the pid alone), if that process still runs and is the one the
    stack state recorded (pid and start time): a stale file whose pid the system gave to
    another process names nobody, so nothing of anyone else's is adopted or killed."""
    try:
        with open(pid_path, encoding="utf-8") as handle:
            fields = handle.read().split()
        pid = int(fields[0])
        started = int(fields[1]) if len(fields) > 1 else None  # (an older relay wrote the start time there)
        if record:
            started = int(record["start_ticks"]) if record.get("pid") == pid else -1
        if started is not None and process_start_ticks(pid) != started:
            return None
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, IndexError, KeyError, TypeError):
        return None


def stop_process(pid: int, signum: int, grace: float) -> None:
    """Signal a process and wait for it to end; SIGKILL after `grace` seconds."""
    os.kill(pid, signum)
    give_up = time.monotonic() + grace
    while time.monotonic() < give_up:
        with contextlib.suppress(ChildProcessError):  # our own child: reap it, or its zombie looks alive
            os.waitpid(pid, os.WNOHANG)
        if process_start_ticks(pid) is None:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@dataclass
class CommanderProcess:
    """The commander launch-stack started, now or earlier (its pid file), which --supervise
    starts again when it is gone or stops answering."""

    pid: int
    started: int | None
    popen: subprocess.Popen | None = None  # our own child: reaped here, or its zombie would look alive

    def alive(self) -> bool:
        if self.popen is not None and self.popen.poll() is not None:
            return False
        return process_start_ticks(self.pid) == self.started


def stack_say(message: str) -> None:
    """One line of launch-stack's log: stderr, local time first."""
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}", file=sys.stderr, flush=True)


# The supervisor's own events (Supervisor.notify), which the commander and fleet report too.
Notify = Callable[..., None]


# -- the local commander -----------------------------------------------------------------


class LocalCommander:
    """The commander launch-stack starts on this box (or finds running there): started and
    checked by launch, started again by --supervise when it is gone or hung, stopped by `down`.
    Its pid and start time are in the stack state (`commander`) and its pid file."""

    def __init__(self, cfg: StackConfig, state: StackState, dry_run: bool, notify: Notify) -> None:
        self.cfg, self.state, self.dry_run, self.notify = cfg, state, dry_run, notify
        self.client = CommanderClient(cfg.local_url, cfg.secret, timeout=10, ca_file=cfg.commander.tls_ca_file)
        self.process: CommanderProcess | None = None  # None: not ours to restart (another tool runs it)
        self.silent_polls = 0

    def healthy(self) -> bool:
        try:
            return self.client.get("/api/health", timeout=3).status == 200
        except CommanderNotTrusted as exc:
            raise UserError(f"{exc} (commander.tls_ca_file in {self.cfg.path})") from None
        except CommanderUnreachable:
            return False

    def pid(self) -> int | None:
        """The commander launch-stack started, if it still runs (its pid file and the stack state)."""
        return recorded_pid(self.cfg.commander.pid_path, self.state.commander)

    def ensure(self) -> dict:
        group = self.cfg.commander
        summary = {"url": self.cfg.local_url, "public_url": self.cfg.run.commander_url, "state_path": group.state_path,
                   "log_path": group.log_path, "pid_path": group.pid_path}
        if not self.dry_run and self.healthy():
            if not group.restart_if_running:
                stack_say(f"commander already running at {self.cfg.local_url}: reusing it")
                pid = self.pid()  # its pid file: an earlier launch-stack started it, so it is ours
                if pid is not None:
                    self.process = CommanderProcess(pid, process_start_ticks(pid))
                return dict(summary, pid=pid)
            stack_say("commander running; restarting it (commander.restart_if_running)")
            self.stop()
        if not self.cfg.secret and not is_loopback(group.host):
            raise UserError(f"{self.cfg.path}: commander: host {group.host} needs a shared secret "
                            "(RELAY_SHARED_SECRET or commander.shared_secret)")
        return dict(summary, pid=self.start())

    def start(self) -> int | None:
        group = self.cfg.commander
        argv = [group.python_bin or sys.executable, os.path.join(HERE, "relay.py"), "serve", "--host", group.host,
                "--port", str(group.port), "--state-path", group.state_path, "--lease-seconds", f"{group.lease_seconds:g}"]
        if group.tls_cert:
            argv += ["--tls-cert", group.tls_cert, "--tls-key", group.tls_key]
        # Secrets reach the commander through its environment, never its command line.
        secrets_env = {name: value for name, value in (("RELAY_SHARED_SECRET", self.cfg.secret),
                                                        ("RELAY_NOTIFY_URL", self.cfg.notify_url)) if value}
        if self.dry_run:
            masked = "".join(f"{name}=*** " for name in secrets_env)
            print(f"would run: {masked}{shlex.join(argv)} >> {group.log_path} 2>&1 &", flush=True)
            return None
        for path in (group.log_path, group.pid_path, group.state_path):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        env = dict(os.environ, **secrets_env)
        with open(group.log_path, "ab") as log_file:
            proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)
        self.process = CommanderProcess(proc.pid, process_start_ticks(proc.pid), proc)
        self.state.commander = {"pid": proc.pid, "start_ticks": self.process.started}
        self.state.save()
        atomic_write(group.pid_path, f"{proc.pid}\n".encode())
        give_up = time.monotonic() + group.wait_seconds
        while not self.healthy():
            if proc.poll() is not None or time.monotonic() > give_up:
                with open(group.log_path, encoding="utf-8", errors="replace") as log_file:
                    last = (log_file.read().strip().splitlines() or ["(empty log)"])[-1]
                raise UserError(f"the commander did not come up at {self.cfg.local_url}: {last}")
            time.sleep(0.2)
        stack_say(f"commander started at {self.cfg.local_url} (pid {proc.pid}, log {group.log_path})")
        return proc.pid

    def stop(self) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        stop_process(pid, signal.SIGTERM, 10)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.cfg.commander.pid_path)
        self.state.commander = {}
        self.state.save()
        stack_say(f"commander stopped (pid {pid})")
        return True

    def check_public_url(self) -> None:
        """The commander answers at public_url from this box, before any rent: a pod gets that URL.
        A commander started for this launch is stopped again when it does not."""
        group = self.cfg.commander
        check = commander_answer_check(self.cfg.run.commander_url, group.tls_ca_file)
        if self.dry_run:
            if check.problem:
                check = Check(check.what, found="nothing answers there yet: launch-stack starts the commander, then "
                                                "checks this before renting")
            print(check.line(), flush=True)
        elif check.problem:
            if self.process is not None and self.process.popen is not None:  # started now
                self.stop()
            raise UserError(check.line())

    def run_record(self) -> dict | None:
        """The run as the commander sees it ({} before its first lease); None when unreachable.

        Asked with a short timeout: a hung commander is restarted after COMMANDER_SILENT_POLLS
        unanswered polls, each at most this long plus the poll interval (about 20 s in all),
        well inside the holder's own deadline (80% of the lease) for leases of 30 s and more,
        so a hang costs the run no lease.  A commander that answers takes milliseconds."""
        try:
            reply = self.client.get(f"/api/runs/{self.cfg.run.run_id}", timeout=SUPERVISOR_POLL_TIMEOUT_SECONDS)
        except CommanderUnreachable as exc:
            stack_say(f"commander unreachable ({exc}); pods are left as they are")
            return None
        self.silent_polls = 0
        return reply.body if reply.status == 200 else {}

    def revive(self) -> None:
        """Start our commander again, on the same state file (every lease kept, each with a
        full TTL, as after any restart), when its process is gone, or when it has not
        answered for COMMANDER_SILENT_POLLS polls and is still the process we started (a
        hung commander is killed first).  A commander that is not ours is only waited for."""
        if self.process is None:
            return
        self.silent_polls += 1
        old = self.process
        if old.alive():
            if self.silent_polls < COMMANDER_SILENT_POLLS:
                return
            why = f"has not answered for {self.silent_polls} polls"
            with contextlib.suppress(ProcessLookupError):
                os.kill(old.pid, signal.SIGKILL)  # its state file is written atomically: a kill loses nothing
            if old.popen is not None:
                old.popen.wait()
        else:
            why = "is gone"
        stack_say(f"the commander (pid {old.pid}) {why}: starting it again on {self.cfg.commander.state_path}")
        try:
            pid = self.start()
        except UserError as exc:  # e.g. its port still taken: the next poll tries again
            stack_say(f"{exc}; trying again at the next poll")
            return
        self.silent_polls = 0
        self.notify("commander_restarted", f"the commander (pid {old.pid}) {why}: started again (pid {pid}), "
                                           "every lease kept", old_pid=old.pid, pid=pid)

    def tell_the_run(self, message: str) -> None:
        """An event in the run's record (status, the page); a run no worker has asked for yet has none."""
        with contextlib.suppress(CommanderUnreachable):
            self.client.post("/api/runs/event", {"run_id": self.cfg.run.run_id, "msg": message[:MAX_EVENT_CHARS]},
                             timeout=5)


# -- the rented pods: a fleet ------------------------------------------------------------


class PodFleet:
    """The pods rented for the run, one worker each: the fleet the Supervisor keeps.

    A fleet rents, watches and removes *units* for the supervising loop: a unit is one pod
    here (one whole cluster for a multi-node run, rented, replaced and removed as one), a
    record in the stack state, written before its rent (so it can be found and removed after
    any crash), with `name`, `label` and `state` ("creating" -> "active" -> "removed").  The
    loop talks to a fleet only through this contract:

      units_wanted                  1, or 2 with relay.hot_standby (the holder's and a standby's)
      attempts                      rents tried so far (relay.max_pods caps them)
      live() -> [unit]              the units Lium shows live, read now; dead ones are removed,
                                    gone ones marked removed (and notified: pod_lost)
      rent_and_deploy() -> (unit, worker summary)   one more unit, its worker(s) started;
                                    raises BudgetReached (nothing more can be rented),
                                    LiumError (try again later), EveryPodWouldFail (stop)
      remove(unit, why) -> [lines]  the unit removed, the end of its worker log kept and returned
      give_up_on(unit, why)         remove() a unit whose worker cannot work; EveryPodWouldFail
                                    when its log shows a reason every unit would meet
      remove_all(why) -> [names]    every unit not removed yet (after reading Lium): `down`
      silence_seconds()             how long a standing-by worker may stay unheard
      silent(run, alive) -> [unit]  live units whose worker the commander has not heard that long
      sole_keeper(run) -> name|None the unit whose removal would lose the run's last checkpoint
      rented() -> [unit]            every unit rented, removed ones too
      not_removed() -> [unit]       the units the stack state does not record as removed
      spent_usd(), spend_line()     the run's GPU spend so far (with relay.budget_usd)
      left_line()                   what is left billing, and how to adopt or remove it
      summary(unit, worker) -> dict the unit in launch-stack's summary (worker None: adopted)
    """

    def __init__(self, cfg: StackConfig, state: StackState, lium: Lium, dry_run: bool, commander: LocalCommander,
                 notify: Notify) -> None:
        self.cfg, self.state, self.lium, self.dry_run = cfg, state, lium, dry_run
        self.commander, self.notify = commander, notify  # where events of the pods are told
        self.units_wanted = 2 if cfg.relay.hot_standby else 1
        self.unit_word = "pod"
        self.started = time.monotonic()
        self.worker_started: dict[str, float] = {}  # pod -> when this process started its worker
        self.unknown_status_since: dict[str, float] = {}  # pod id -> when its unknown status was first seen
        self.listing: list[dict] | None = None  # the `lium ps` rows of this poll, not yet used by a rent

    @property
    def attempts(self) -> int:
        return self.state.attempts

    def rented(self) -> list[PodRecord]:
        """Every pod this stack rented, removed ones too (the stack state's order)."""
        return self.state.pods

    def not_removed(self) -> list[PodRecord]:
        """The pods the stack state does not record as removed (Lium is not asked)."""
        return [pod for pod in self.state.pods if pod.state != "removed"]

    def spent_usd(self) -> float:
        """The run's GPU spend so far, every pod it rented together (Lium's estimate)."""
        return round(sum(pod.spent_usd for pod in self.state.pods), 2)

    def budget_left(self) -> float | None:
        """USD relay.budget_usd still allows; None without a budget."""
        budget = self.cfg.relay.budget_usd
        return round(budget - self.spent_usd(), 2) if budget else None

    def spend_line(self) -> str:
        budget = self.cfg.relay.budget_usd
        return f"GPU spend ${self.spent_usd():.2f}" + (f" of a ${budget:.2f} budget" if budget else "")

    def left_line(self) -> str:
        names = ", ".join(p.name for p in self.not_removed()) or "none"
        return (f"pods left as they are: {names} (`relay.py launch-stack {self.cfg.path} --supervise` adopts them, "
                f"`relay.py down {self.cfg.path}` removes them); {self.spend_line()} so far")

    # -- renting ---------------------------------------------------------------------------

    def rent_and_deploy(self) -> tuple[PodRecord, dict]:
        """One more pod, its worker started: the pod and the worker's summary."""
        record = self.create_pod()
        return record, self.deploy_worker(record)

    def summary(self, record: PodRecord, worker: dict | None) -> dict:
        return {"pod": {"name": record.name, "id": record.id or None, "huid": record.huid or None,
                        "template_id": self.cfg.lium.template_id, "price_per_hour": record.price_per_hour},
                "worker": worker or self.worker_summary(None, None)}  # None: adopted, its worker started earlier

    def create_pod(self) -> PodRecord:
        """Rent a pod (`lium up` returns once it is RUNNING); a pod a failed `up` left billing is removed."""
        budget = self.budget_left()
        if budget is not None and budget < 0.01:
            raise BudgetReached(f"the run's {self.spend_line()} has reached relay.budget_usd: no new pod")
        self.state.attempts += 1
        name = f"{self.cfg.lium.pod_name or 'relay-' + self.cfg.run.run_id}-{self.state.attempts}"
        # A volume attaches to one pod at a time: a standby beside its holder goes without
        # (and resumes from the Hub); a replacement for the pod that had it takes it over.
        volume = self.cfg.lium.volume if not any(p.has_volume for p in self.not_removed()) else ""
        listing = self.listing if self.listing is not None else self.lium.pods()
        self.listing = None  # the listing of this poll serves one rent
        record = PodRecord(name, utc_now(), has_volume=bool(volume),
                           foreign_ids=[row["id"] for row in listing if row.get("name") == name])
        self.state.pods.append(record)
        self.state.save()  # before `up`: whatever happens next, this pod can be found and removed
        stack_say(f"creating pod {name} (template {self.cfg.lium.template_id}"
                 f"{f', volume {volume}' if volume else ', no volume' if self.cfg.lium.volume else ''}"
                 f"{f', budget ${budget:.2f}' if budget is not None else ''})")
        try:
            self.note_pod(record, self.lium.up(self.cfg.lium, name, volume, budget))
        except LiumError as exc:
            if exc.code == "budget_exhausted" or ("--budget" in str(exc) and exc.code == "invalid_arguments"):
                record.state = "removed"  # refused before renting, or removed by lium once it started too late
                self.state.save()
                raise BudgetReached(f"the {budget:.2f} USD left of relay.budget_usd is not enough for another pod "
                                    f"({exc}); {self.spend_line()}") from None
            self.refuse_unpaid(record, exc)
            if not self.adopt_unanswered_rent(record, exc):
                raise
        record.state = "active"
        self.state.save()
        stack_say(f"pod {record.label} is rented (${record.price_per_hour:.2f}/h)")
        return record

    def refuse_unpaid(self, record: Any, exc: LiumError) -> None:
        """BudgetReached when Lium's account could not pay for the rent (refused before renting:
        nothing bills, and renting again cannot help until someone adds funds)."""
        if exc.code in LIUM_FUNDS_REFUSED:
            record.state = "removed"
            self.state.save()
            raise BudgetReached(f"Lium's account cannot pay for another {self.unit_word} ({exc}); {self.spend_line()}") from None

    def adopt_unanswered_rent(self, record: PodRecord, exc: LiumError) -> bool:
        """After a failed `up`: remove the pod it left billing, or find the pod of a rent that
        got no answer.  True when such a pod was found and is ours to use."""
        if exc.data.get("pod_id"):  # rented, then failed (pod_not_ready ...): it bills until removed
            record.id = str(exc.data["pod_id"])
            self.state.save()
            self.remove(record, f"`lium up` failed after renting it ({exc.code or 'error'})", has_worker=False)
            return False
        if exc.code not in RENT_UNANSWERED:
            record.state = "removed"  # nothing was rented
            self.state.save()
            return False
        lookup = self.cfg.lium.rent_lookup_seconds
        stack_say(f"{exc}; looking for pod {record.name} in `lium ps` for {lookup:g} s before renting again")
        give_up = time.monotonic() + lookup
        while True:
            row = next((row for row in self.lium.pods() if self.may_be_ours(record, row)), None)
            if row is not None:
                self.note_pod(record, row)
                stack_say(f"the rent went through after all: pod {record.label} is ours, using it")
                return True
            if time.monotonic() > give_up:
                record.state = "removed"
                self.state.save()
                stack_say(f"no pod {record.name} appeared in {lookup:g} s: the rent did not happen")
                return False
            time.sleep(self.cfg.lium.poll_interval_seconds)

    @staticmethod
    def may_be_ours(record: PodRecord, row: dict) -> bool:
        """A pod of `record`'s rent whose id never came back: its name, created after we wrote the
        record (a minute's clock skew allowed), and not among the pods that bore the name before."""
        try:
            created = datetime.datetime.fromisoformat(str(row.get("created_at")).replace("Z", "+00:00")).timestamp()
        except ValueError:
            return False
        return row.get("name") == record.name and row["id"] not in record.foreign_ids and created >= record.created_at - 60

    def note_pod(self, record: PodRecord, row: dict) -> None:
        """What `lium up`/`lium ps` says of our pod: its id first, then its price and spend."""
        if self.dry_run:
            return
        record.id = str(row["id"])
        record.huid = str(row.get("huid") or record.huid)
        for name in ("price_per_hour", "spent_usd"):
            if isinstance(row.get(name), (int, float)):
                setattr(record, name, float(row[name]))

    def first_exec(self, record: PodRecord, command: str) -> Execution:
        """The first command on a new pod, repeated until its SSH answers (RUNNING can come
        before sshd); a pod that never answers is removed."""
        give_up = time.monotonic() + self.cfg.lium.ready_timeout_seconds
        while True:
            ran = self.lium.exec(record.ref, command, timeout=120)
            if not ran.error and ran.exit_code != 255:  # 255: ssh's own failure, not the command's
                return ran
            if time.monotonic() > give_up:
                self.remove(record, "it never answered over SSH", has_worker=False)
                raise LiumError(f"pod {record.label} did not answer `lium exec` within "
                                f"{self.cfg.lium.ready_timeout_seconds:g} s: {ran.error}")
            time.sleep(self.cfg.lium.poll_interval_seconds)

    # -- watching and removing -------------------------------------------------------------

    def live(self, run: dict | None = None) -> list[PodRecord]:
        """Pods of this stack that Lium still shows live, found by id; the others are removed
        (dead or dying ones with `lium rm`: some still bill) or marked removed (gone)."""
        if self.dry_run:
            return self.not_removed()
        self.listing = self.lium.pods()
        shown = {row["id"]: row for row in self.listing}
        alive = []
        now = time.monotonic()
        for record in self.not_removed():
            if not record.id:  # launch-stack stopped during its `up`: the pod may exist all the same
                row = next((row for row in shown.values() if self.may_be_ours(record, row)), None)
                if row is None:
                    if utc_now() - record.created_at > self.cfg.lium.up_timeout_seconds + self.cfg.lium.rent_lookup_seconds:
                        record.state = "removed"
                        self.state.save()
                    continue
                self.note_pod(record, row)
            row = shown.get(record.id)
            if row is None:
                record.state = "removed"
                self.state.save()
                stack_say(f"pod {record.label} is gone (preempted, expired or removed); {self.spend_line()}")
                self.notify("pod_lost", f"pod {record.label} is gone (preempted, expired or removed)", pod=record.name)
                continue
            self.note_pod(record, row)
            status = str(row.get("status") or "").upper()
            if status in POD_DEAD_STATUSES:
                self.remove(record, f"Lium reports it {status}")
                self.notify("pod_lost", f"pod {record.label} is {status}", pod=record.name)
            elif status in POD_LIVE_STATUSES:
                self.unknown_status_since.pop(record.id, None)
                alive.append(record)
            else:
                since = self.unknown_status_since.setdefault(record.id, now)
                grace = self.cfg.relay.no_lease_grace_seconds
                if since == now:
                    stack_say(f"pod {record.label} has status {status or '(none)'}, unknown to relay.py: counted as "
                             f"live for {grace:g} s, then removed")
                if now - since > grace:
                    self.remove(record, f"its status {status or '(none)'} lasted {grace:g} s")
                else:
                    alive.append(record)
        self.state.save()
        return alive

    def keep_only_node0(self, unit: PodRecord, run: dict) -> None:
        """Of a unit kept for the last checkpoint on its disk, what holds it (a pod: all of it)."""

    def give_up_on(self, record: PodRecord, why: str) -> None:
        """Remove a pod whose worker cannot work; EveryPodWouldFail when its log says the next would not either."""
        self.check_for_a_failure_every_pod_meets(record, self.remove(record, why))

    def remove_all(self, why: str) -> list[str]:
        """Remove every pod not removed yet (`down`): the names of those it tried."""
        self.live()  # finds the id of a pod whose `up` was cut short, and the spend of each
        removed = []
        for record in self.not_removed():
            self.remove(record, why)
            removed.append(record.name)
        return removed

    def keep_worker_log(self, record: PodRecord) -> list[str]:
        """The last lines of the pod's worker log, kept in a file of its own beside the stack
        state (the pod's disk goes with the pod): `{state folder}/pods/{pod}.worker.log`."""
        if self.dry_run or not record.id:
            return []
        ran = self.lium.exec(record.ref, f"tail -n {WORKER_LOG_TAIL_LINES} {shlex.quote(self.cfg.worker.remote_log_path)}",
                             timeout=60)
        if ran.error or ran.exit_code != 0:
            return []
        folder = os.path.join(os.path.dirname(os.path.abspath(self.cfg.relay.state_path)), "pods")
        os.makedirs(folder, exist_ok=True)
        atomic_write(os.path.join(folder, f"{record.name}.worker.log"), ran.stdout.encode(), durable=False)
        return ran.stdout.splitlines()

    def remove(self, record: PodRecord, why: str, has_worker: bool = True) -> list[str]:
        """Remove a pod, after keeping the end of its worker log (returned); its last lines go
        to the run's events."""
        tail = self.keep_worker_log(record) if has_worker else []
        if tail:
            self.commander.tell_the_run(f"pod {record.name} removed ({why}); its worker log ended: " + " | ".join(tail[-3:]))
        self.remove_pod_only(record, why)
        return tail

    def remove_pod_only(self, record: PodRecord, why: str) -> None:
        if not record.id:  # its `up` never said which pod it rented, and `lium ps` shows none of it
            record.state = "removed"
            self.state.save()
            stack_say(f"WARNING: pod {record.name} was being rented when launch-stack stopped and is not in `lium ps`; "
                     f"if it shows up there later, remove it: lium rm <its id> -y")
            return
        try:
            spent = self.lium.remove(record.ref)
        except LiumError as exc:
            stack_say(f"WARNING: could not remove pod {record.label} ({exc}); remove it by hand: lium rm {record.id} -y")
            return
        if spent is not None:
            record.spent_usd = max(record.spent_usd, spent)
        record.state = "removed"
        self.state.save()
        stack_say(f"pod {record.label} removed: {why} (it cost ${record.spent_usd:.2f}; {self.spend_line()})")

    def silence_seconds(self) -> float:
        """Six missed asks of a standby (at least 10 s, and three of our own polls)."""
        return max(10.0, 6 * standby_poll_seconds(self.cfg.commander.lease_seconds),
                   3 * self.cfg.lium.poll_interval_seconds)

    def silent(self, run: dict, alive: list[PodRecord]) -> list[PodRecord]:
        """Pods whose worker neither holds the run nor asked the commander for it lately.

        A standing-by worker asks every few seconds, so silence for `silence_seconds` means
        it exited or cannot reach the commander.  No judgement until the commander has
        watched that long (it forgets standbys on a restart), nor on a worker started less
        than that ago (adopted pods count from this supervisor's start).
        """
        silence = self.silence_seconds()
        if run.get("standby_window_sec", 0) < silence:
            return []
        heard = {s["worker_id"] for s in run.get("standbys", []) if s["seen_sec_ago"] < silence}
        now = time.monotonic()
        return [unit for unit in alive if self.worker_of(unit) != run.get("holder") and self.worker_of(unit) not in heard
                and now - self.worker_started.get(self.worker_of(unit), self.started) > silence]

    @staticmethod
    def worker_of(unit: Any) -> str:
        """The id of the worker that asks the commander for the run on this unit's behalf."""
        return unit.name

    def sole_keeper(self, run: dict) -> str | None:
        """The pod whose removal would lose the run's last checkpoint: neither the Hub nor a
        Lium volume (which outlives its pod) holds it."""
        last = run.get("latest_checkpoint") or {}
        if not last or (run.get("hub") or {}).get("iteration") == last["iteration"]:
            return None
        sealer = last.get("worker_id")
        return None if any(p.name == sealer and p.has_volume for p in self.state.pods) else sealer

    # -- the worker on a pod ---------------------------------------------------------------

    def pod_run_config(self, record: PodRecord) -> bytes:
        run = dataclasses.asdict(self.cfg.run)
        run.update(worker_id=record.name, relay_shared_secret="")  # the secret travels in relay.env only
        run.update(self.node_fields(record), setup=self.cfg.worker.setup or self.cfg.run.setup)
        # (and so do run.env's ${NAME} values: the trainer inherits the worker's environment)
        run["env"] = {key: value for key, value in run["env"].items() if env_reference(value) is None}
        if self.cfg.commander.tls_ca_file:  # uploaded beside the run config (deploy_worker)
            run["commander_ca_file"] = COMMANDER_CA_FILENAME
        return json.dumps(run, indent=1).encode()

    def node_fields(self, record: PodRecord) -> dict:
        """The run config's fields that say where this pod stands in a multi-node run (none here)."""
        return {}

    def pod_secrets(self) -> bytes:
        values = env_from_here(self.cfg.worker.env)
        values.update({key: value for key, value in env_from_here(self.cfg.run.env).items()
                       if env_reference(self.cfg.run.env[key])})
        if self.cfg.secret:
            values["RELAY_SHARED_SECRET"] = self.cfg.secret
        if self.cfg.run.hf_repo and os.environ.get("HF_TOKEN"):
            values["HF_TOKEN"] = os.environ["HF_TOKEN"]
        return "".join(f"{k}={shlex.quote(v)}\n" for k, v in sorted(values.items())).encode()

    def upload(self, record: PodRecord, files: dict[str, tuple[bytes, int]]) -> str:
        """Copy files (remote path -> content, mode) to the pod in ONE `lium scp` (each is an SSH
        connection, seconds on a real pod): a tar through a 0600 local file, since the secrets
        ride in it (never on a command line).  The remote path of the tar, to unpack and delete."""
        remote = f".relay-upload-{record.name}.tar"
        if self.dry_run:
            print(f"would run: lium scp {record.ref} <generated tar of {', '.join(files)}, mode 0600> {remote}", flush=True)
            return remote
        with tempfile.TemporaryDirectory(prefix="relay-upload-") as folder:
            path = os.path.join(folder, "upload.tar")
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle, \
                    tarfile.open(fileobj=handle, mode="w") as tar:
                for name, (data, mode) in files.items():
                    member = tarfile.TarInfo(name)
                    member.size, member.mode, member.mtime = len(data), mode, int(time.time())
                    tar.addfile(member, io.BytesIO(data))
            self.lium.scp(record.ref, path, remote)
        return remote

    def deploy_worker(self, record: PodRecord) -> dict:
        """Upload relay.py (unless the pod has the same), the run config and secrets; start the worker."""
        worker = self.cfg.worker
        q = shlex.quote
        env_path = os.path.join(os.path.dirname(worker.remote_config_path), "relay.env")
        folders = {os.path.dirname(p) or "." for p in (worker.remote_config_path, worker.remote_log_path,
                                                       worker.remote_pid_path)} | {worker.remote_workdir}
        code_files = ["relay.py", "launch_sft.sh", "launch_rl.sh", "slime_flags.txt"]
        local_hashes = {name: sha256_file(os.path.join(HERE, name)) for name in code_files}
        in_image = [os.path.join(worker.image_relay_dir, f) for f in code_files]
        remote_code = [os.path.join(worker.remote_workdir, f) for f in code_files]
        # One exec makes the folders and hashes what is there (each `lium exec` is a second or two).
        have = self.first_exec(record, f"mkdir -p {' '.join(q(f) for f in sorted(folders))} && "
                                       f"{{ sha256sum {' '.join(q(p) for p in in_image + remote_code)} 2>/dev/null; true; }}")
        if have.exit_code != 0:
            raise LiumError(f"lium exec on {record.label} failed (exit {have.exit_code}): {have.stderr.strip()[-300:]}")
        remote_hashes = {path.strip(): digest for digest, path in
                         (line.split(None, 1) for line in have.stdout.splitlines() if " " in line)}
        if all(remote_hashes.get(p) == local_hashes[f] for p, f in zip(in_image, code_files, strict=True)):
            stack_say(f"the image on {record.label} has this relay.py ({worker.image_relay_dir}): nothing to upload")
            remote_code = in_image
        files = {}
        for name, remote in zip(code_files, remote_code, strict=True):
            if remote_hashes.get(remote) != local_hashes[name]:
                with open(os.path.join(HERE, name), "rb") as handle:
                    files[remote] = (handle.read(), 0o755)
        files[worker.remote_config_path] = (self.pod_run_config(record), 0o600)
        if self.cfg.commander.tls_ca_file:
            with open(self.cfg.commander.tls_ca_file, "rb") as handle:
                files[os.path.join(os.path.dirname(worker.remote_config_path), COMMANDER_CA_FILENAME)] = (handle.read(), 0o644)
        files[env_path] = (self.pod_secrets(), 0o600)
        bundle = self.upload(record, files)
        command = worker.command or (f"{worker.remote_python_bin} {q(remote_code[0])} worker "
                                     f"{q(worker.remote_config_path)}")
        # Only the worker goes to the background, with every descriptor redirected: `lium exec`
        # (an SSH session) returns at once, and $! is the worker's own pid, printed only when it
        # is still alive a second later (a bad config kills it at once).
        start = (f"tar -xPf {q(bundle)} && rm -f {q(bundle)} && chmod 600 {q(worker.remote_config_path)} {q(env_path)} "
                 f"&& {{ set -a && . {q(env_path)} && set +a; }} || exit 1; nohup setsid {command} "
                 f">> {q(worker.remote_log_path)} 2>&1 < /dev/null & echo $! > {q(worker.remote_pid_path)}; "
                 f"sleep 1; kill -0 $! && echo $!")
        started = self.lium.exec(record.ref, start)
        self.worker_started[record.name] = time.monotonic()
        running = started.exit_code == 0 and started.stdout.strip().isdigit()
        pid = int(started.stdout.strip()) if running else None
        if running:
            stack_say(f"worker started on {record.label} (pid {pid}, log {worker.remote_log_path})")
        elif not self.dry_run:
            stack_say(f"WARNING: the worker on {record.label} is not running ({started.error or 'it exited'})")
            self.check_for_a_failure_every_pod_meets(record, self.keep_worker_log(record))
        return self.worker_summary(pid, running)

    def check_for_a_failure_every_pod_meets(self, record: PodRecord, tail: list[str]) -> None:
        """Stop (EveryPodWouldFail) when the worker's log shows a reason the next pod would meet
        too; the pod is removed first (it cannot work), its log kept."""
        reason = failure_every_pod_meets(tail)
        if not reason:
            return
        if record.state != "removed":
            self.remove_pod_only(record, "its worker cannot work here")
        kept = os.path.join(os.path.dirname(self.cfg.relay.state_path) or ".", "pods", f"{record.name}.worker.log")
        message = (f"the worker on pod {record.name} failed for a reason every pod would meet: {reason}; no other pod "
                   f"is rented (fix it, then run `relay.py launch-stack {self.cfg.path}` again; the end of its log: {kept})")
        self.commander.tell_the_run(message)
        self.notify("worker_failed", message, pod=record.name, reason=reason, log_tail=tail[-10:])
        raise EveryPodWouldFail(message)

    def worker_summary(self, pid: int | None, running: bool | None) -> dict:
        worker = self.cfg.worker
        return {"pid": pid, "running": running, "remote_log_path": worker.remote_log_path,
                "remote_pid_path": worker.remote_pid_path, "remote_config_path": worker.remote_config_path}


# -- the rented clusters: a fleet of whole multi-node units --------------------------------


class ClusterFleet(PodFleet):
    """The Lium clusters rented for a multi-node run (lium.nodes > 1): the PodFleet contract
    with a cluster as the unit.  One cluster at a time (no standby: it would double an N-node
    bill).  What Lium's clusters imply (../shared/notes/lium.md, "Clusters"):
      - no `--budget`: relay.budget_usd is enforced here, from the members' spend in `lium ps`,
        by removing the cluster once the run's spend reaches it;
      - a dead member cannot be replaced (the overlay is set at rent time), and slime has no
        fault tolerance for a lost rank: a cluster with any member gone or dead is lost whole;
        its node 0 alone is kept while it holds the only copy of the run's last sealed
        checkpoint (its worker sends it to the Hub first thing: section 8), then removed;
      - after a failed rent, its cluster is looked up in `clusters ps` by the attempt's unique
        name: one whose answer alone was lost (`cluster_rent_uncertain`, ...) is adopted once
        whole; one left half-made (a member failed, not ready in time) is removed, never used.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.units_wanted, self.unit_word = 1, "cluster"

    def rented(self) -> list[ClusterRecord]:  # type: ignore[override]
        return self.state.clusters

    def not_removed(self) -> list[ClusterRecord]:  # type: ignore[override]
        return [cluster for cluster in self.state.clusters if cluster.state != "removed"]

    def spent_usd(self) -> float:
        return round(sum(cluster.spent_usd for cluster in self.state.clusters), 2)

    def left_line(self) -> str:
        names = ", ".join(c.name for c in self.not_removed()) or "none"
        return (f"clusters left as they are: {names} (`relay.py launch-stack {self.cfg.path} --supervise` adopts them, "
                f"`relay.py down {self.cfg.path}` removes them); {self.spend_line()} so far")

    @staticmethod
    def worker_of(unit: Any) -> str:
        return unit.members[0].name if unit.members else f"{unit.name}-node0"

    def silent(self, run: dict, alive: list) -> list:
        """Clusters with a node whose worker is unheard: neither in the epoch (holder or member)
        nor asking (a node waiting to join asks as a standby does).  One dead worker stalls the
        whole cluster, so the cluster goes."""
        silence = self.silence_seconds()
        if run.get("standby_window_sec", 0) < silence:
            return []
        heard = {s["worker_id"] for s in run.get("standbys", []) if s["seen_sec_ago"] < silence}
        heard |= {m["worker_id"] for m in run.get("members", [])} | {run.get("holder")}
        now = time.monotonic()
        return [unit for unit in alive if any(m.name not in heard for m in unit.members)
                and now - max(self.worker_started.get(m.name, self.started) for m in unit.members) > silence]

    def summary(self, record: Any, worker: dict | None) -> dict:
        return {"cluster": {"name": record.name, "id": record.id or None, "nodes": record.nodes,
                            "price_per_hour": round(record.price_per_hour, 2),
                            "members": [{"name": m.name, "id": m.id, "node_rank": m.node_rank, "overlay_ip": m.overlay_ip}
                                        for m in record.members]},
                "worker": worker or self.worker_summary(None, None)}

    def node_fields(self, record: PodRecord) -> dict:
        cluster = next(c for c in self.state.clusters if record in c.members)
        master = next((m.overlay_ip for m in cluster.members if m.node_rank == 0), "")
        return {"nodes": cluster.nodes, "node_rank": record.node_rank, "node_ip": record.overlay_ip,
                "master_addr": master, "group": cluster.name}

    # -- renting ---------------------------------------------------------------------------

    def rent_and_deploy(self) -> tuple[ClusterRecord, dict]:  # type: ignore[override]
        """A cluster with a worker on every member (node 0's summary returned)."""
        cluster = self.create_cluster()
        workers = [self.deploy_worker(member) for member in cluster.members]
        return cluster, workers[0]

    def create_cluster(self) -> ClusterRecord:
        lium = self.cfg.lium
        budget = self.budget_left()
        if budget is not None and budget < 0.01:
            raise BudgetReached(f"the run's {self.spend_line()} has reached relay.budget_usd: no new cluster")
        self.state.attempts += 1
        name = f"{lium.pod_name or 'relay-' + self.cfg.run.run_id}-{self.state.attempts}"
        record = ClusterRecord(name, utc_now(), nodes=lium.nodes,
                               foreign_ids=[row["id"] for row in self.lium.clusters() if row.get("name") == name])
        self.state.clusters.append(record)
        self.state.save()  # before `clusters up`: whatever happens next, it can be found and removed
        stack_say(f"creating cluster {name}: {lium.nodes} nodes of {lium.gpu_count}x{lium.gpu}"
                  f"{f' on fabric {lium.fabric}' if lium.fabric else ''}"
                  f"{f' (${budget:.2f} of relay.budget_usd left)' if budget is not None else ''}")
        try:
            self.note_cluster(record, self.lium.cluster_up(lium, name, lium.nodes, lium.fabric, lium.template_id))
        except LiumError as exc:
            self.refuse_unpaid(record, exc)
            if not self.settle_failed_rent(record, exc):
                raise
        record.state = "active"
        self.state.save()
        stack_say(f"cluster {record.label} is rented (${record.price_per_hour:.2f}/h): "
                  + ", ".join(f"node {m.node_rank} {m.huid or m.id} at {m.overlay_ip}" for m in record.members))
        return record

    def settle_failed_rent(self, record: ClusterRecord, exc: LiumError) -> bool:
        """After a failed `clusters up`, the cluster it may have left billing is found (its id in
        the error, or its unique name in `clusters ps`).  A rent whose answer alone was lost is
        adopted once every member runs (True); any other is removed: a cluster is never used
        half-made."""
        if exc.code not in CLUSTER_RENT_BILLING:
            record.state = "removed"  # nothing was rented
            self.state.save()
            return False
        record.id = str(exc.data.get("cluster_id") or "")
        unanswered = exc.code in ("cluster_rent_uncertain", "cluster_rented_not_listed")
        stack_say(f"{exc}; looking for cluster {record.name} in `lium clusters ps` for "
                  f"{self.cfg.lium.rent_lookup_seconds:g} s")
        give_up = time.monotonic() + self.cfg.lium.rent_lookup_seconds
        while time.monotonic() < give_up:
            row = next((row for row in self.lium.clusters() if self.may_be_ours(record, row)
                        and (not record.id or row["id"] == record.id)), None)
            if row is not None:
                record.id = str(row["id"])
                running = [p for p in row.get("pods") or [] if str(p.get("status") or "").upper() == "RUNNING"]
                if not unanswered or len(running) == record.nodes:
                    break
            time.sleep(self.cfg.lium.poll_interval_seconds)
        else:
            row = None
        self.state.save()
        if unanswered and row is not None:
            self.note_cluster(record, row)
            stack_say(f"the rent went through after all: cluster {record.label} is ours, using it")
            return True
        stack_say(f"`lium clusters up` failed after renting ({exc.code}): removing cluster {record.label}")
        self.remove_cluster_only(record, f"its rent did not complete ({exc.code})")
        return False

    @staticmethod
    def may_be_ours(record: Any, row: dict) -> bool:
        """A cluster of `record`'s rent: its unique name, and not one that bore the name before."""
        return row.get("name") == record.name and row.get("id") not in record.foreign_ids

    def note_cluster(self, record: ClusterRecord, document: dict) -> None:
        """What `clusters up`/`clusters ps` say of our cluster: its id and members, by node rank."""
        if self.dry_run:
            record.members = [PodRecord(f"{record.name}-node{k}", utc_now(), "active", node_rank=k)
                              for k in range(record.nodes)]
            return
        record.id = str(document["id"])
        known = {member.id: member for member in record.members}
        members = []
        for row in sorted(document.get("pods") or [], key=lambda row: int(row.get("node_rank") or 0)):
            rank = int(row.get("node_rank") or 0)
            member = known.get(str(row["id"])) or PodRecord(f"{record.name}-node{rank}", utc_now(), "active",
                                                            id=str(row["id"]), node_rank=rank)
            member.huid = str(row.get("huid") or member.huid)
            member.overlay_ip = str(row.get("overlay_ip") or member.overlay_ip)
            if isinstance(row.get("price_per_hour"), (int, float)):
                member.price_per_hour = float(row["price_per_hour"])
            members.append(member)
        record.members = members

    # -- watching --------------------------------------------------------------------------

    def live(self, run: dict | None = None) -> list[ClusterRecord]:  # type: ignore[override]
        """The clusters whose every member Lium shows live.  A cluster with a member gone or dead
        is lost whole (removed, or reduced to its node 0 while that holds the only copy of the
        last checkpoint); one past relay.budget_usd is removed."""
        if self.dry_run:
            return self.not_removed()
        rows = {row["id"]: row for row in self.lium.pods()}
        alive = []
        for record in self.not_removed():
            if not record.id:  # launch-stack stopped during its `up`: the cluster may exist all the same
                row = next((row for row in self.lium.clusters() if self.may_be_ours(record, row)), None)
                if row is None:
                    if utc_now() - record.created_at > self.cfg.lium.up_timeout_seconds + self.cfg.lium.rent_lookup_seconds:
                        record.state = "removed"
                    continue
                self.note_cluster(record, row)
            lost, node0_lost = [], False
            for member in record.members:
                row = rows.get(member.id)
                if row is not None and isinstance(row.get("spent_usd"), (int, float)):
                    member.spent_usd = float(row["spent_usd"])
                status = str((row or {}).get("status") or "GONE").upper()
                if member.state != "removed" and (row is None or status in POD_DEAD_STATUSES):
                    lost.append(f"node {member.node_rank} ({member.huid or member.id}) {status.lower()}")
                    node0_lost = node0_lost or member.node_rank == 0
            if record.state == "keeping":
                if run is not None and self.sole_keeper(run) != record.name:
                    self.remove(record, "the Hub has the last checkpoint now")
                continue
            if lost:
                why = f"cluster {record.label} lost {', '.join(lost)}"
                stack_say(f"{why}; {self.spend_line()}")
                self.notify("pod_lost", why, pod=record.name)
                self.remove_lost(record, why, None if node0_lost else run)  # a lost node 0 keeps nothing
                continue
            budget = self.cfg.relay.budget_usd
            if budget and self.spent_usd() >= budget:
                self.remove(record, f"the run's {self.spend_line()} reached relay.budget_usd")
                continue
            alive.append(record)
        self.state.save()
        return alive

    def remove_lost(self, record: ClusterRecord, why: str, run: dict | None) -> None:
        """A lost cluster goes, but for its node 0 while that holds the only copy of the run's last
        sealed checkpoint: the other members go now, node 0 once the Hub has it."""
        if run is None or self.sole_keeper(run) != record.name:
            self.remove(record, why)
        else:
            self.keep_only_node0(record, run)

    def keep_only_node0(self, record: Any, run: dict) -> None:
        """The cluster reduced to its node 0, whose disk holds the run's last checkpoint: the
        other members go now (they bill, and hold nothing node 0 lacks)."""
        for member in record.members[1:]:
            self.keep_worker_log(member)
            with contextlib.suppress(LiumError):
                self.lium.remove(member.ref)
                member.state = "removed"
        record.state = "keeping"
        self.state.save()
        stack_say(f"node 0 of cluster {record.label} kept: checkpoint {run['latest_checkpoint']['iteration']} is only "
                  "on its disk until its worker has sent it to the Hub")

    def sole_keeper(self, run: dict) -> str | None:
        """The cluster whose node 0 sealed the run's last checkpoint, while the Hub lacks it."""
        last = run.get("latest_checkpoint") or {}
        if not last or (run.get("hub") or {}).get("iteration") == last["iteration"]:
            return None
        return next((c.name for c in self.state.clusters if c.members and c.members[0].name == last.get("worker_id")),
                    None)

    # -- removing --------------------------------------------------------------------------

    def remove(self, record: Any, why: str, has_worker: bool = True) -> list[str]:  # type: ignore[override]
        """Remove the whole cluster (`clusters rm`), after keeping every member's worker log; the
        lines returned are node 0's and those of any member that says why it could not work."""
        tails = [self.keep_worker_log(member) for member in record.members if member.state != "removed"] \
            if has_worker else []
        tail = next((t for t in tails if failure_every_pod_meets(t)), tails[0] if tails else [])
        if tail:
            self.commander.tell_the_run(f"cluster {record.name} removed ({why}); a worker log ended: "
                                        + " | ".join(tail[-3:]))
        self.remove_cluster_only(record, why)
        return tail

    def remove_cluster_only(self, record: ClusterRecord, why: str) -> None:
        if not record.id:
            record.state = "removed"
            self.state.save()
            stack_say(f"WARNING: cluster {record.name} was being rented when launch-stack stopped and is not in "
                      "`lium clusters ps`; if it shows up there later, remove it: lium clusters rm <its id> -y")
            return
        try:
            self.lium.cluster_remove(record.id)
        except LiumError as exc:
            stack_say(f"WARNING: could not remove cluster {record.label} ({exc}); remove it by hand: "
                      f"lium clusters rm {record.id} -y")
            return
        record.state = "removed"
        for member in record.members:
            member.state = "removed"
        self.state.save()
        stack_say(f"cluster {record.label} removed: {why} (it cost ${record.spent_usd:.2f}; {self.spend_line()})")

    def give_up_on(self, record: Any, why: str) -> None:
        tail = self.remove(record, why)
        if failure_every_pod_meets(tail):
            self.stop_for(record, tail)

    def check_for_a_failure_every_pod_meets(self, record: PodRecord, tail: list[str]) -> None:
        """A member's worker that exited at its start: for a reason every cluster would meet, the
        whole cluster goes (a member alone cannot be replaced) and nothing more is rented."""
        if failure_every_pod_meets(tail):
            cluster = next(c for c in self.state.clusters if record in c.members)
            self.remove_cluster_only(cluster, f"the worker on {record.name} cannot work here")
            self.stop_for(cluster, tail)

    def stop_for(self, cluster: ClusterRecord, tail: list[str]) -> None:
        reason = failure_every_pod_meets(tail)
        message = (f"a worker on cluster {cluster.name} failed for a reason every cluster would meet: {reason}; no "
                   f"other cluster is rented (fix it, then run `relay.py launch-stack {self.cfg.path}` again)")
        self.commander.tell_the_run(message)
        self.notify("worker_failed", message, pod=cluster.name, reason=reason, log_tail=tail[-10:])
        raise EveryPodWouldFail(message)


# -- the supervising loop ----------------------------------------------------------------


class Supervisor:
    """launch-stack for one stack.yaml: its commander (a LocalCommander) and the units rented
    for the run (a fleet), launched once and, with --supervise, kept by one loop until the run
    ends; `down` stops and removes them all."""

    def __init__(self, cfg: StackConfig, dry_run: bool = False) -> None:
        self.cfg, self.dry_run = cfg, dry_run
        self.lium = Lium(dry_run)
        self.state = StackState(cfg.relay.state_path, cfg.run.run_id, persist=not dry_run)
        self._lock: Any = None  # the supervisor's lock file, held while this process supervises
        # The supervisor's own events (pod lost or replaced, max_pods reached, run finished).
        self.notifier = Notifier("" if dry_run else check_notify_url(cfg.notify_url, "RELAY_NOTIFY_URL"), "launch-stack")
        self.commander = LocalCommander(cfg, self.state, dry_run, self.notify)
        fleet = ClusterFleet if cfg.lium.nodes > 1 else PodFleet
        self.fleet = fleet(cfg, self.state, self.lium, dry_run, self.commander, self.notify)

    # -- the supervisor process ------------------------------------------------------------

    def supervisor_file(self, suffix: str) -> str:
        """supervisor.pid / .log / .lock, beside the stack state."""
        return os.path.join(os.path.dirname(os.path.abspath(self.cfg.relay.state_path)), f"supervisor.{suffix}")

    def become_the_supervisor(self) -> None:
        """One supervisor per stack (two would rent for one run): a lock held for the process's
        life; the pid file holds the pid alone, its start time goes to the stack state."""
        os.makedirs(os.path.dirname(self.supervisor_file("lock")), exist_ok=True)
        self._lock = open(self.supervisor_file("lock"), "a")  # noqa: SIM115 (held for the process's life)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            running = recorded_pid(self.supervisor_file("pid"), self.state.supervisor)
            raise UserError(f"a supervisor of {self.cfg.path} already runs (pid {running}): `relay.py down "
                            f"{self.cfg.path}` stops it") from None
        self.state.supervisor = {"pid": os.getpid(), "start_ticks": process_start_ticks(os.getpid())}
        self.state.save()
        atomic_write(self.supervisor_file("pid"), f"{os.getpid()}\n".encode())
        # `down` (and systemd) stop it with SIGTERM: the way out Ctrl-C takes (pods left as they are)
        signal.signal(signal.SIGTERM, signal.default_int_handler)

    def supervisor_pid(self) -> int | None:
        return recorded_pid(self.supervisor_file("pid"), self.state.supervisor)

    def stop_supervisor(self) -> bool:
        pid = self.supervisor_pid()
        if pid is None:
            return False
        stop_process(pid, signal.SIGTERM, 30)
        stack_say(f"supervisor stopped (pid {pid})")
        self.state.load()  # what it rented meanwhile is in the state file it kept writing
        return True

    def detach(self) -> int:
        """`--supervise --detach`: the supervisor in the background, in a session of its own
        (closing the terminal does not end it), logging to supervisor.log."""
        argv = [sys.executable, os.path.join(HERE, "relay.py"), "launch-stack", self.cfg.path, "--supervise", "--preflight-done"]
        os.makedirs(os.path.dirname(self.supervisor_file("log")), exist_ok=True)
        with open(self.supervisor_file("log"), "ab") as log_file:
            os.chmod(self.supervisor_file("log"), 0o600)
            child = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        give_up = time.monotonic() + 30
        while child.poll() is None and time.monotonic() < give_up:
            if recorded_pid(self.supervisor_file("pid"), StackState(self.cfg.relay.state_path, self.cfg.run.run_id,
                                                                     persist=True).supervisor) == child.pid:
                print(f"supervisor started in the background (pid {child.pid}, log {self.supervisor_file('log')}); "
                      f"`relay.py status --run {self.cfg.run.run_id}` shows it, `relay.py down {self.cfg.path}` stops it "
                      "and removes the pods", flush=True)
                return 0
            time.sleep(0.1)
        with open(self.supervisor_file("log"), encoding="utf-8", errors="replace") as log_file:
            last = (log_file.read().strip().splitlines() or ["(empty log)"])[-1]
        raise UserError(f"the background supervisor did not start: {last} (log {self.supervisor_file('log')})")

    # -- launch, supervise, down -----------------------------------------------------------

    def preflight(self) -> int:
        """The checks before anything starts: in a dry run each result (on stdout, with the plan),
        else each failure (stderr).  How many failed; a field's first problem is its only one
        (a placeholder template id is not found by Lium either)."""
        failed: dict[str, Check] = {}
        checks = preflight(self.cfg, self.lium)
        for check in checks:
            if check.problem:
                failed.setdefault(check.what, check)
        for check in checks:
            if self.dry_run and (not check.problem or failed[check.what] is check):
                print(check.line(), flush=True)
            elif check.problem and failed[check.what] is check:
                print(check.line(), file=sys.stderr, flush=True)
        return len(failed)

    def launch(self, supervising: bool = False) -> dict:
        """The commander and a first unit; a rent that failed (nothing left billing) is, when
        supervising, the loop's to try again."""
        commander = self.commander.ensure()
        self.commander.check_public_url()
        alive = self.fleet.live()
        if alive:
            stack_say(f"{alive[-1].label} of this stack is already running: not renting another")
            unit, worker = alive[-1], None
        else:
            try:
                unit, worker = self.fleet.rent_and_deploy()
            except LiumError as exc:
                if not supervising:
                    raise
                stack_say(f"{exc}; the supervisor tries again")
                return {"commander": commander, "spent_usd": self.fleet.spent_usd()}
        return {"commander": commander, **self.fleet.summary(unit, worker), "spent_usd": self.fleet.spent_usd()}

    def supervise(self) -> int:
        """Keep a working pod (and a standby, if asked) on the run until it is COMPLETED or
        FAILED, then clean up."""
        relay, fleet = self.cfg.relay, self.fleet
        poll = self.cfg.lium.poll_interval_seconds
        stack_say(f"supervising run {self.cfg.run.run_id}: up to {relay.max_pods} pods, a new pod after "
                  f"{relay.no_lease_grace_seconds:g} s without a live lease"
                  f"{', one hot standby' if relay.hot_standby else ''} (Ctrl-C stops supervising, pods stay)")
        if not self.cfg.lium.volume and not self.cfg.run.hf_repo:
            stack_say("WARNING: neither lium.volume nor run.hf_repo is set: a replacement pod cannot see this pod's "
                      "checkpoints and starts the run over from step 0")
        reported_epoch = 0
        budget_said = False
        waiting_since = time.monotonic()
        try:
            while True:
                run = self.commander.run_record()
                if run is None:  # without the commander nothing can be judged: wait, touch nothing
                    self.commander.revive()
                    waiting_since = time.monotonic()  # no worker could take the lease meanwhile
                    time.sleep(poll)
                    continue
                reported_epoch = self.report_handoffs(run.get("leases", []), reported_epoch)
                self.report_spend(run)
                if run.get("status") in ("COMPLETED", "FAILED"):
                    return self.finish(run["status"], run)
                if run.get("status") == "CANCELLED":  # rent nothing more; its holder seals and uploads first
                    if not run.get("holder"):
                        return self.finish("CANCELLED", run)
                    time.sleep(poll)
                    continue
                if run.get("holder"):
                    waiting_since = time.monotonic()
                alive = fleet.live(run)
                if alive and time.monotonic() - waiting_since > relay.no_lease_grace_seconds:
                    for unit in alive:
                        fleet.give_up_on(unit, f"no live lease for {relay.no_lease_grace_seconds:g} s: its worker "
                                               "cannot work")
                    alive = []
                for unit in fleet.silent(run, alive):
                    fleet.give_up_on(unit, f"its worker has not asked for the lease in {fleet.silence_seconds():g} s: "
                                           f"it exited or cannot reach {self.cfg.run.commander_url}")
                    alive.remove(unit)
                if not alive and fleet.attempts >= relay.max_pods:
                    stack_say(f"max_pods ({relay.max_pods}) reached and no pod is left ({fleet.spend_line()}): giving up "
                              f"on run {self.cfg.run.run_id} at step {run.get('step', 0)}; raise relay.max_pods and run "
                              f"`relay.py launch-stack {self.cfg.path} --supervise` again to go on")
                    self.notify("max_pods_reached", f"max_pods ({relay.max_pods}) reached and no pod is left: "
                                f"supervision of run {self.cfg.run.run_id} stopped at step {run.get('step', 0)}",
                                max_pods=relay.max_pods, step=run.get("step", 0))
                    return 1
                if len(alive) < fleet.units_wanted and fleet.attempts < relay.max_pods:
                    try:
                        unit, _ = fleet.rent_and_deploy()
                        replaced = any(rented.state == "removed" for rented in fleet.rented())
                        self.notify("pod_replaced" if replaced else "pod_added",
                                    f"pod {unit.label} started for run {self.cfg.run.run_id} "
                                    f"({len(alive) + 1} of {fleet.units_wanted} wanted, attempt {fleet.attempts} of "
                                    f"{relay.max_pods})", pod=unit.name, attempt=fleet.attempts)
                    except BudgetReached as exc:
                        if not alive:
                            stack_say(f"stopped by the budget: {exc}; run {self.cfg.run.run_id} is left at step "
                                      f"{run.get('step', 0)} with no pod; raise relay.budget_usd and run "
                                      f"`relay.py launch-stack {self.cfg.path} --supervise` again to go on")
                            self.notify("budget_reached", f"stopped by the budget: {exc}; supervision of run "
                                        f"{self.cfg.run.run_id} stopped at step {run.get('step', 0)}",
                                        spent_usd=fleet.spent_usd(), step=run.get("step", 0))
                            return 1
                        if not budget_said:
                            stack_say(f"{exc}: the pods left go on, no standby or replacement is rented")
                            budget_said = True
                    except LiumError as exc:
                        stack_say(f"{exc}; trying again in {poll:g} s")
                    if not alive:  # the new pod gets a whole grace to take the lease
                        waiting_since = time.monotonic()
                time.sleep(poll)
        except KeyboardInterrupt:
            return self.interrupted()
        finally:
            self.notifier.flush(NOTIFY_TIMEOUT_SECONDS)

    def interrupted(self) -> int:
        stack_say(f"stopped supervising; {self.fleet.left_line()}")
        if self.state.supervisor.get("pid") == os.getpid():  # status: no supervisor any more
            self.report_spend(self.commander.run_record() or {}, supervising=False)
        return 130

    def notify(self, event: str, text: str, **fields: Any) -> None:
        """The supervisor's own events, to the same receiver as the commander's (notify_url)."""
        self.notifier.notify(event, f"relay launch-stack: {text}", self.cfg.run.run_id, **fields)

    def report_spend(self, run: dict, supervising: bool = True) -> None:
        """Tell the commander the run's GPU spend when it changed (status and the page show it),
        and, while supervising, at least every 3 polls: the supervisor's heartbeat."""
        spend = {"run_id": self.cfg.run.run_id, "spent_usd": self.fleet.spent_usd(), "budget_usd": self.cfg.relay.budget_usd,
                 "pods": len(self.fleet.rented()), "supervisor_pid": os.getpid() if supervising else 0}
        last = run.get("gpu_spend") or {}
        fresh = utc_now() - last.get("at", 0) < 3 * self.cfg.lium.poll_interval_seconds or not supervising
        if not run or (fresh and all(last.get(k) == spend[k] for k in ("spent_usd", "budget_usd", "pods", "supervisor_pid"))):
            return
        with contextlib.suppress(CommanderUnreachable):
            self.commander.client.post("/api/runs/spend", spend, timeout=5)

    def report_handoffs(self, leases: list[dict], reported_epoch: int) -> int:
        """Log each lease granted since `reported_epoch`, from the commander's history (a poll
        can miss a short lease; the history cannot)."""
        previous = ""
        for lease in leases:
            if lease["epoch"] > reported_epoch:
                moved = f"handed off from {previous} to {lease['worker_id']}" if previous else f"taken by {lease['worker_id']}"
                stack_say(f"lease {moved} at step {lease['start_step']} (epoch {lease['epoch']})")
                reported_epoch = lease["epoch"]
            previous = lease["worker_id"]
        return reported_epoch

    def finish(self, status: str, run: dict) -> int:
        final = run.get("final_model") or {}
        stack_say(f"run {self.cfg.run.run_id} {status} at step {run.get('step')}"
                  + (f"; final model {final['repo']}@{final['revision']}" if final else ""))
        live = self.fleet.live(run) if self.cfg.relay.remove_pods_at_end else []
        if self.cfg.relay.remove_pods_at_end:
            keep = self.fleet.sole_keeper(run)
            for unit in live:
                if unit.name == keep:
                    self.fleet.keep_only_node0(unit, run)
                    stack_say(f"pod {keep} kept: checkpoint {run['latest_checkpoint']['iteration']} is only on its own "
                              f"disk ({self.cfg.run.l1_root}), on no volume and not on the Hub; copy it off "
                              f"(`lium scp -d`), then `relay.py down {self.cfg.path}` removes the pod")
                    continue
                self.fleet.remove(unit, f"the run is {status}")
        removed = [unit.name for unit in live if unit.state == "removed"]
        self.notify("run_finished", f"run {self.cfg.run.run_id} {status} at step {run.get('step')}; pods removed: "
                    f"{', '.join(removed) or 'none'}", status=status, step=run.get("step"), pods_removed=removed)
        self.report_spend(run, supervising=False)
        stack_say(f"run {self.cfg.run.run_id} {status}: {self.fleet.spend_line()} on {len(self.fleet.rented())} {self.fleet.unit_word}(s)")
        return 1 if status == "FAILED" else 0

    def down(self) -> dict:
        supervisor_stopped = self.stop_supervisor()  # first: it would rent a new pod for each one removed
        return {"supervisor_stopped": supervisor_stopped, "removed_pods": self.fleet.remove_all("relay.py down"),
                "commander_stopped": self.commander.stop(), "spent_usd": self.fleet.spent_usd()}


def run_launch_stack(path: str, supervise: bool, dry_run: bool, detach: bool = False, preflight_done: bool = False) -> int:
    if detach and (not supervise or dry_run):
        raise UserError("--detach goes with --supervise (and not --dry-run): it runs the supervisor in the background")
    supervisor = Supervisor(load_stack_config(path), dry_run)
    failed = 0 if preflight_done else supervisor.preflight()  # (a detached supervisor's parent made the checks)
    if failed and not dry_run:
        raise UserError(f"{failed} preflight check(s) failed (above): nothing was started or rented")
    if detach:
        return supervisor.detach()
    if supervise and not dry_run:
        supervisor.become_the_supervisor()
    try:
        summary = supervisor.launch(supervising=supervise and not dry_run)
        print(json.dumps(summary, indent=2), flush=True)
        if dry_run:
            return 2 if failed else 0
        return supervisor.supervise() if supervise else 0
    except (LiumError, BudgetReached, EveryPodWouldFail) as exc:
        stack_say(str(exc))
        if supervisor.fleet.not_removed():  # e.g. the worker's setup failed on a rented pod: it bills until told
            stack_say(supervisor.fleet.left_line())
        if isinstance(exc, EveryPodWouldFail):
            supervisor.notifier.flush(NOTIFY_TIMEOUT_SECONDS)
            return 2
        return 1
    except KeyboardInterrupt:  # Ctrl-C while a pod is being rented or set up
        return supervisor.interrupted()


def run_down(path: str) -> int:
    supervisor = Supervisor(load_stack_config(path))
    try:
        print(json.dumps(supervisor.down(), indent=2))
    except LiumError as exc:
        stack_say(str(exc))
        return 1
    return 0


###############################################################################
# 10. Status and demo #########################################################
###############################################################################


def age_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def step_text(run: dict) -> str:
    return f"{run['step']}/{run['total_steps']}" if run.get("total_steps") else str(run["step"])


def elapsed_seconds(run: dict, now: float) -> float:
    """Since the run was created; an ended run's until it ended."""
    end = (run.get("updated_at") or now) if run["status"] in ENDED_STATUSES else now
    return end - run["created_at"]


def run_rows(runs: list[dict]) -> list[list[str]]:
    rows = [["RUN", "STATUS", "HOLDER", "EPOCH", "STEP", "ELAPSED", "GPU SPEND", "SUPERVISOR", "CHECKPOINT",
             "HUB REVISION", "LEASE"]]
    now = utc_now()
    for run in runs:
        ckpt = run.get("latest_checkpoint") or {}
        hub = run.get("hub") or {}
        spend = run.get("gpu_spend") or {}
        lease = "-"
        if run.get("holder"):
            lease = f"age {age_text(run.get('lease_age_sec'))}, expires in {age_text(run.get('lease_expires_in_sec'))}"
        supervisor = "-"
        if spend.get("supervisor_pid"):
            supervisor = f"heard {age_text(now - spend['at'])} ago"
        rows.append([run["run_id"], run["status"], run.get("holder") or "-", str(run["epoch"]), step_text(run),
                     age_text(elapsed_seconds(run, now)), f"${spend['spent_usd']:.2f}" if spend else "-", supervisor,
                     str(ckpt.get("iteration", "-")), (hub.get("revision") or "-")[:12], lease])
    return rows


def standbys_text(run: dict) -> str:
    """Workers standing by for the run, as the commander last heard from them."""
    return ", ".join(f"{s['worker_id']} ({age_text(s['seen_sec_ago'])} ago)" for s in run.get("standbys", [])) or "-"


def spend_text(spend: dict) -> str:
    """launch-stack's last report of the run's GPU spend."""
    budget = f" of a ${spend['budget_usd']:.2f} budget" if spend.get("budget_usd") else ""
    return f"${spend['spent_usd']:.2f}{budget} on {spend['pods']} pod(s), Lium's estimate"


SUPERVISOR_SILENT_SECONDS = 300  # a supervisor reports at least every 3 polls (10 s by default)


def supervisor_text(spend: dict | None, now: float) -> str:
    """Whether a `launch-stack --supervise` looks after the run, from its last report."""
    if not spend:
        return "none has reported (launch-stack --supervise reports here)"
    if not spend.get("supervisor_pid"):
        return f"none: the last one stopped {age_text(now - spend['at'])} ago"
    heard = now - spend["at"]
    gone = f": not heard for over {SUPERVISOR_SILENT_SECONDS // 60} minutes, is it still running?" \
        if heard > SUPERVISOR_SILENT_SECONDS else ""
    return f"pid {spend['supervisor_pid']}, last heard {age_text(heard)} ago{gone}"


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def format_run_detail(run: dict) -> str:
    lines = [format_table(run_rows([run])), f"standing by: {standbys_text(run)}"]
    if run.get("nodes", 1) > 1:
        joined = ", ".join(f"{m['worker_id']} (node {m['node_rank']})" for m in run.get("members", [])) or "none yet"
        fenced = ", ".join(p["worker_id"] for p in run.get("fenced", []))
        lines.append(f"nodes: {run['nodes']} of cluster {run.get('group') or '?'}; joined: {joined}"
                     + (f"; the last epoch's {fenced} may still run: no grant until they stop or expire" if fenced else ""))
    lines += ["", "leases:"]
    for lease in run.get("leases", []):
        end = iso(lease["ended_at"]) or "now"
        lines.append(f"  epoch {lease['epoch']:>3}  {lease['worker_id']:<24} {iso(lease['started_at'])} -> {end:<20} "
                     f"steps {lease['start_step']}->{lease['end_step'] if lease['ended_at'] else run['step']}  "
                     f"{lease['why'] or 'holding'}")
    hub = run.get("hub") or {}
    if hub:
        lines.append(f"hub: checkpoint {hub['iteration']} at {hub['repo']}@{hub['revision']}")
    if run.get("sync_error"):
        lines.append(f"hub sync failing: {run['sync_error']}")
    if run.get("gpu_spend"):
        lines.append(f"GPU spend: {spend_text(run['gpu_spend'])}")
    lines.append(f"supervisor: {supervisor_text(run.get('gpu_spend'), utc_now())}")
    final = run.get("final_model")
    ended = (run.get("leases") or [{}])[-1].get("why") or ""
    if final:
        lines.append(final_model_text(final["repo"], final["revision"]))
    elif run["status"] == "COMPLETED" and "NOT on the Hub" in ended:  # the worker's words on its release
        lines.append(f"no final model on the Hub: {ended}")
    lines.append("recent events:")
    lines += [f"  {iso(e['at'])}  {e['msg']}" for e in run.get("events", [])[-15:]]
    if run.get("log_tail"):
        lines.append("last trainer lines:")
        lines += [f"  {line}" for line in run["log_tail"][-10:]]
    return "\n".join(lines)


STATUS_COLOURS = {"RUNNING": "#1a7f37", "COMPLETED": "#0969da", "FAILED": "#cf222e", "PREEMPTED": "#bc4c00",
                  "PENDING": "#6e7781"}
LEASE_END_COLOURS = {"completed": "#0969da", "failed": "#cf222e", "preempted": "#bc4c00", "expired": "#bc4c00",
                     "reacquired": "#8250df", "": "#1a7f37"}
PAGE_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;padding:12px;background:#f6f8fa;color:#1f2328}
h1{font-size:20px;margin:0 0 8px}
#runs{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,460px),1fr));gap:12px}
.run{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:12px;min-width:0}
.run h2{font-size:17px;margin:0 0 6px;overflow-wrap:anywhere}
.badge{color:#fff;border-radius:10px;padding:1px 8px;font-size:12px;margin-left:6px;vertical-align:middle}
dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 10px;margin:6px 0}
dt{color:#656d76}dd{margin:0;overflow-wrap:anywhere}
.error{color:#cf222e}
svg{width:100%;height:auto;background:#fafbfc;border:1px solid #eaeef2;border-radius:4px}
pre{background:#0d1117;color:#e6edf3;padding:8px;border-radius:6px;overflow-x:auto;font-size:12px;max-height:220px}
ul{padding-left:18px;margin:4px 0}li{overflow-wrap:anywhere}
h3{font-size:13px;margin:10px 0 4px;color:#656d76;text-transform:uppercase;letter-spacing:.04em}
"""
PAGE_SCRIPT = """
const showNewest = () => document.querySelectorAll('pre').forEach(p => { p.scrollTop = p.scrollHeight; });
showNewest();
setInterval(async () => {
  try {
    const answer = await fetch(location.href, {credentials: 'same-origin', cache: 'no-store'});
    if (!answer.ok) return;
    const page = new DOMParser().parseFromString(await answer.text(), 'text/html');
    document.getElementById('runs').replaceWith(page.getElementById('runs'));
    document.getElementById('updated').replaceWith(page.getElementById('updated'));
    document.body.dataset.refreshes = Number(document.body.dataset.refreshes || 0) + 1;
    showNewest();
  } catch (e) { /* the commander is restarting: keep the last picture */ }
}, 3000);
"""


def steps_per_hour(run: dict) -> float | None:
    """Progress rate over the current (or last) lease."""
    if not run["leases"]:
        return None
    lease = run["leases"][-1]
    seconds = (lease["ended_at"] or utc_now()) - lease["started_at"]
    steps = (lease["end_step"] if lease["ended_at"] else run["step"]) - lease["start_step"]
    return steps / seconds * 3600 if seconds > 0 else None


def lease_timeline_svg(run: dict, now: float) -> str:
    """The run's leases as horizontal bars on one time axis, newest at the bottom."""
    leases = run["leases"][-12:]
    if not leases:
        return "<p>no lease yet</p>"
    begin = leases[0]["started_at"]
    span = max(1.0, max(lease["ended_at"] or now for lease in leases) - begin)
    row, label_width, width = 22, 120, 600
    bars = []
    for n, lease in enumerate(leases):
        end = lease["ended_at"] or now
        x = label_width + (lease["started_at"] - begin) / span * (width - label_width - 4)
        w = max(2.0, (end - lease["started_at"]) / span * (width - label_width - 4))
        why = lease["why"].split(":")[0]
        colour = LEASE_END_COLOURS.get(why, "#6e7781")
        steps = f"{lease['start_step']}→{lease['end_step'] if lease['ended_at'] else run['step']}"
        tip = (f"epoch {lease['epoch']} · {lease['worker_id']} · {iso(lease['started_at'])} → "
               f"{iso(lease['ended_at']) or 'now'} · steps {steps} · {lease['why'] or 'holding'}")
        y = 4 + n * row
        bars.append(f"<g class='lease'><title>{html.escape(tip)}</title>"
                    f"<text x='4' y='{y + 14}' font-size='11'>e{lease['epoch']} {html.escape(lease['worker_id'][:14])}</text>"
                    f"<rect x='{x:.1f}' y='{y}' width='{w:.1f}' height='{row - 6}' rx='3' fill='{colour}'/>"
                    f"<text x='{x + 4:.1f}' y='{y + 13}' font-size='10' fill='#fff'>{html.escape(steps)}</text></g>")
    height = 8 + len(leases) * row
    return (f"<svg class='timeline' viewBox='0 0 {width} {height}' role='img' aria-label='lease timeline'>"
            f"{''.join(bars)}</svg>")


def loss_curve_svg(points: list) -> str:
    if len(points) < 2:
        return "<p>no loss reported yet</p>"
    points = thin_points(points, 300)
    steps, losses = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(steps), max(steps), min(losses), max(losses)
    width, height, pad = 600, 160, 30
    def x(v: float) -> float:
        return pad + (v - x0) / ((x1 - x0) or 1) * (width - pad - 6)
    def y(v: float) -> float:
        return 6 + (y1 - v) / ((y1 - y0) or 1) * (height - pad)
    path = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in zip(steps, losses, strict=True))
    return (f"<svg class='loss' viewBox='0 0 {width} {height}' role='img' aria-label='loss curve'>"
            f"<polyline fill='none' stroke='#0969da' stroke-width='1.5' points='{path}'/>"
            f"<text x='2' y='12' font-size='10'>{y1:.4g}</text><text x='2' y='{height - pad + 6}' font-size='10'>{y0:.4g}</text>"
            f"<text x='{pad}' y='{height - 4}' font-size='10'>step {x0}</text>"
            f"<text x='{width - 70}' y='{height - 4}' font-size='10'>step {x1}</text></svg>")


def render_run_card(run: dict, now: float) -> str:
    esc = html.escape
    ckpt = run.get("latest_checkpoint") or {}
    hub = run.get("hub") or {}
    rate = steps_per_hour(run)
    facts = [("holder", run["holder"] or "-"), ("standing by", standbys_text(run)), ("epoch", run["epoch"]),
             ("step", step_text(run)), ("elapsed", age_text(elapsed_seconds(run, utc_now()))),
             ("steps/hour", f"{rate:.0f}" if rate is not None else "-"),
             ("loss", f"{run['loss']:.4g}" if run.get("loss") is not None else "-")]
    if run["holder"]:
        facts += [("lease", f"age {age_text(run['lease_age_sec'])}, expires in {age_text(run['lease_expires_in_sec'])}"),
                  ("worker phase", run.get("worker_phase") or "-")]
    facts.append(("checkpoint", f"{ckpt['iteration']} ({age_text(now - ckpt['at'])} ago)" if ckpt else "-"))
    facts.append(("hub", f"{hub['repo']}@{hub['revision'][:12]} · checkpoint {hub['iteration']} "
                          f"({age_text(now - hub['at'])} ago)" if hub else "-"))
    if run.get("gpu_spend"):
        facts.append(("GPU spend", spend_text(run["gpu_spend"])))
    facts.append(("supervisor", supervisor_text(run.get("gpu_spend"), now)))
    rows = "".join(f"<dt>{esc(k)}</dt><dd>{esc(str(v))}</dd>" for k, v in facts)
    if run.get("sync_error"):
        rows += f"<dt>hub sync</dt><dd class='error'>failing: {esc(run['sync_error'])}</dd>"
    colour = STATUS_COLOURS.get(run["status"], "#6e7781")
    lines = "\n".join(run.get("log_tail", [])[-20:])
    events = "".join(f"<li>{esc(iso(e['at']))} {esc(e['msg'])}</li>" for e in reversed(run.get("events", [])[-10:]))
    return (f"<section class='run' id='run-{esc(run['run_id'])}'>"
            f"<h2>{esc(run['run_id'])}<span class='badge status' style='background:{colour}'>{esc(run['status'])}</span>"
            f" <small>{esc(run['mode'])}</small></h2><dl>{rows}</dl>"
            f"<h3>leases</h3>{lease_timeline_svg(run, now)}"
            f"<h3>loss</h3>{loss_curve_svg(run.get('losses', []))}"
            f"<h3>trainer output</h3><pre>{esc(lines) or '(nothing yet)'}</pre>"
            f"<h3>events</h3><ul>{events}</ul></section>")


def render_status_page(view: dict) -> str:
    """The page at GET /: every run, self-contained (no external assets), every string escaped.

    It refreshes by fetching itself (the browser resends its Basic credentials) and swapping
    the runs in place: the page never holds the secret, so it cannot sign API requests.
    """
    now = utc_now()
    cards = "".join(render_run_card(run, now) for run in view["runs"]) or "<p>no runs yet</p>"
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width,initial-scale=1'>"
            f"<title>relay-trainer</title><style>{PAGE_STYLE}</style></head><body>"
            f"<h1>relay-trainer <small>{VERSION}</small></h1>"
            f"<p id='updated'>{len(view['runs'])} runs · lease {view['lease_seconds']:g} s · updated {iso(now)}</p>"
            f"<div id='runs'>{cards}</div><script>{PAGE_SCRIPT}</script></body></html>")


DEFAULT_COMMANDER_URL = "http://127.0.0.1:8080"


def commander_url_of(value: str | None) -> str:
    """--commander-url, else RELAY_COMMANDER_URL, else the local default; `host:port` means http://."""
    url = (value or os.environ.get("RELAY_COMMANDER_URL") or DEFAULT_COMMANDER_URL).strip()
    if "://" not in url:
        url = f"http://{url}"
    parts = urllib.parse.urlsplit(url)
    try:
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError:
        parts = parts._replace(netloc="")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"--commander-url {value or url!r} is not a commander URL: give http://HOST:PORT (or HOST:PORT)")
    return url


READING_SECRETS = ("RELAY_VIEWER_SECRET", "RELAY_SHARED_SECRET")  # reading needs no more than the viewer secret


@dataclass
class Reader:
    """What `status`, `logs`, `cancel` and `retry` ask with: the client, and which secret it
    signs with (named in errors)."""

    client: CommanderClient
    secret_name: str
    secret_names: tuple[str, ...]  # the ones it may use, the first set wins


def reader_from_args(args: argparse.Namespace, secret_names: tuple[str, ...] = READING_SECRETS) -> Reader:
    name = next((n for n in secret_names if os.environ.get(n)), "")
    url = commander_url_of(args.commander_url)
    if args.ca_file and not url.startswith("https://"):
        raise UserError(f"--ca-file is for an https:// --commander-url, not {url}")
    return Reader(CommanderClient(url, os.environ.get(name, "") if name else "", timeout=10, ca_file=args.ca_file),
                  name, secret_names)


def fetch_json(reader: Reader, path: str, expect: str, payload: dict | None = None) -> dict:
    """GET (or with a payload, POST) a commander document that has the key `expect`; any other
    answer is one line saying what to do: the secret to set, or that the URL is not a relay
    commander at all."""
    client = reader.client
    try:
        try:
            reply = client.get(path) if payload is None else client.post(path, payload)
            if reply.status == 200 and expect in reply.body:
                return reply.body
        except CommanderUnsigned as exc:  # a commander refusing our secret cannot sign with it: read to say why
            reply = exc.reply
        try:
            health = client.get("/api/health", timeout=5)  # asks no secret: is it a commander at all?
        except CommanderUnsigned as exc:
            health = exc.reply
    except CommanderUnreachable as exc:
        raise UserError(str(exc)) from None
    if not is_relay_commander(health):
        raise UserError(f"{client.base_url} is not a relay commander (it answered {path} with HTTP {reply.status}): "
                        "check --commander-url or RELAY_COMMANDER_URL")
    error = reply.body.get("error", "")
    if reply.status == 401 and not reader.secret_name:
        names = " or ".join(f"{n} (reading only)" if n == "RELAY_VIEWER_SECRET" else n for n in reader.secret_names)
        raise UserError(f"the commander at {client.base_url} needs a secret: export {names}, as the commander has it")
    if reply.status == 401:
        raise UserError(f"the commander at {client.base_url} refuses {reader.secret_name} ({error}): export the "
                        f"{reader.secret_name} the commander was started with")
    raise UserError(f"{client.base_url}{path}: HTTP {reply.status} {error}".rstrip())


def run_cancel(args: argparse.Namespace) -> int:
    """End a run: its holder stops gracefully, seals, uploads and hands it back; nobody takes over."""
    reader = reader_from_args(args, ("RELAY_SHARED_SECRET",))  # a change: the viewer secret may not
    run_id = checked_run_id(args.run_id, "RUN")
    answer = fetch_json(reader, "/api/runs/cancel", "status", {"run_id": run_id})
    holder = answer.get("holder")
    print(f"run {run_id} CANCELLED" + (f": {holder} stops its trainer, seals and uploads its checkpoint, and hands "
                                       "the run back (a supervising launch-stack then removes the pods)" if holder else ""))
    return 0


def run_retry(args: argparse.Namespace) -> int:
    """A FAILED or CANCELLED run back to PENDING: the next worker resumes from its latest checkpoint."""
    reader = reader_from_args(args, ("RELAY_SHARED_SECRET",))
    run_id = checked_run_id(args.run_id, "RUN")
    fetch_json(reader, "/api/runs/retry", "status", {"run_id": run_id})
    print(f"run {run_id} is PENDING again: the next worker to ask resumes it from its latest checkpoint "
          "(start one, or `relay.py launch-stack STACK --supervise`)")
    return 0


def checked_run_id(run_id: str, what: str) -> str:
    if not RUN_ID_RE.match(run_id):
        raise UserError(f"{what} {run_id!r} is not a valid run id")
    return run_id


def status_text(reader: Reader, args: argparse.Namespace) -> str:
    if args.run:
        run = fetch_json(reader, f"/api/runs/{checked_run_id(args.run, '--run')}", "run_id")
        return json.dumps(run, indent=2) if args.json else format_run_detail(run)
    view = fetch_json(reader, "/api/runs", "runs")
    if args.json:
        return json.dumps(view, indent=2)
    return format_table(run_rows(view["runs"])) if view["runs"] else f"no runs yet on {reader.client.base_url}"


def run_status(args: argparse.Namespace) -> int:
    reader = reader_from_args(args)
    if not args.watch:
        print(status_text(reader, args))
        return 0
    try:
        while True:
            text = status_text(reader, args)
            print(f"\033[H\033[2J{text}\n\n{reader.client.base_url} · {time.strftime('%H:%M:%S')} · Ctrl-C to stop",
                  flush=True)
            time.sleep(2)
    except KeyboardInterrupt:
        return 0


def run_logs(args: argparse.Namespace) -> int:
    """Print the trainer output the commander holds for a run; --follow keeps printing."""
    reader = reader_from_args(args)
    path = f"/api/runs/{checked_run_id(args.run_id, 'RUN')}/logs"
    if args.lines is not None and args.lines < 0:
        raise UserError(f"-n {args.lines}: give a number of lines, 0 or more")
    after, first_page = 0, True
    try:
        while True:
            page = fetch_json(reader, f"{path}?after={after}", "lines")
            if first_page and args.lines is not None:  # -n N: the last N lines only, then (--follow) what comes
                page["lines"], page["dropped"] = page["lines"][len(page["lines"]) - args.lines:] if args.lines else [], 0
            first_page = False
            if page["dropped"]:
                print(f"[... {page['dropped']} older lines are no longer kept by the commander ...]")
            for item in page["lines"]:
                print(item["line"])
            sys.stdout.flush()
            after = page["next"]
            # A cancelled run's holder still sends its last lines while it seals and uploads.
            if not args.follow or (page["status"] in ENDED_STATUSES and not page["holder"]):
                return 0
            time.sleep(1.0)
    except KeyboardInterrupt:
        return 0


class Demo:
    """`relay.py demo`: a commander, two workers, a SIGKILL, a handoff, and the proof."""

    RUN_ID = "demo"
    LEASE_SECONDS = 3
    MOCK_ENV = {"MOCK_MAX_STEPS": "40", "MOCK_STEP_SECONDS": "0.1", "MOCK_SAVE_EVERY": "5"}

    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.work = tempfile.mkdtemp(prefix="relay-demo-")
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ, **self.MOCK_ENV)
        for name in ("RELAY_SHARED_SECRET", "RELAY_VIEWER_SECRET", "RELAY_NOTIFY_URL"):  # a self-contained demo
            self.env.pop(name, None)
        self.seen_events = 0
        self.client: CommanderClient | None = None

    def say(self, message: str) -> None:
        print(f"[demo +{time.monotonic() - self.started:5.1f}s] {message}", flush=True)

    def spawn(self, name: str, *args: str) -> subprocess.Popen:
        logfile = open(os.path.join(self.work, f"{name}.log"), "wb")  # noqa: SIM115 (closed with the demo)
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "relay.py"), *args], stdout=logfile,
                                stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def wait_for(self, what: str, condition: Callable[[], Any], timeout: float = 30.0) -> Any:
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            value = condition()
            self.print_new_events()
            if value:
                return value
            time.sleep(0.1)
        raise UserError(f"demo: timed out waiting for {what}; logs are in {self.work}")

    def run_record(self) -> dict:
        if self.client is None:  # the commander has not said where it listens yet
            return {}
        try:
            reply = self.client.get(f"/api/runs/{self.RUN_ID}", timeout=2)
        except CommanderUnreachable:
            return {}
        return reply.body if reply.status == 200 else {}

    def print_new_events(self) -> None:
        events = self.run_record().get("events", [])
        for event in events[self.seen_events:]:
            self.say(f"commander: {event['msg']}")
        self.seen_events = max(self.seen_events, len(events))

    def commander_url(self) -> str:
        with contextlib.suppress(OSError), open(os.path.join(self.work, "commander.log"), encoding="utf-8") as log_file:
            match = re.search(r"listening on (http://\S+)", log_file.read())
            return match.group(1) if match else ""
        return ""

    def write_worker_config(self, worker_id: str) -> str:
        path = os.path.join(self.work, f"{worker_id}.yaml")
        config = {"commander_url": self.client.base_url, "run_id": self.RUN_ID, "worker_id": worker_id,
                  "mode": "sft", "l1_root": os.path.join(self.work, "volume"), "keep_last_checkpoints": 2,
                  "stop_grace_seconds": 2}
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=1)  # JSON is YAML: no PyYAML needed for the demo
        return path

    def run(self) -> int:
        self.started = time.monotonic()
        try:
            return self._run()
        finally:
            for proc in self.procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            if self.keep:
                print(f"demo files kept in {self.work}")
            else:
                shutil.rmtree(self.work, ignore_errors=True)

    def _run(self) -> int:
        max_steps = int(self.MOCK_ENV["MOCK_MAX_STEPS"])
        self.say(f"work folder {self.work}; mock trainer: {max_steps} steps, a checkpoint every "
                 f"{self.MOCK_ENV['MOCK_SAVE_EVERY']}")
        self.spawn("commander", "serve", "--port", "0", "--lease-seconds", str(self.LEASE_SECONDS),
                   "--state-path", os.path.join(self.work, "commander_state.json"))
        url = self.wait_for("the commander to listen", self.commander_url, 15)
        self.client = CommanderClient(url)
        self.say(f"commander up at {url}, lease {self.LEASE_SECONDS} s")
        worker_a = self.spawn("worker-a", "worker", self.write_worker_config("worker-a"))
        self.wait_for("worker-a to hold the lease", lambda: self.run_record().get("holder") == "worker-a")
        self.spawn("worker-b", "worker", self.write_worker_config("worker-b"))
        self.say("worker-b started as a hot standby")
        self.wait_for("worker-a to seal a checkpoint and pass step 17",
                      lambda: (self.run_record().get("latest_checkpoint") or {}).get("iteration", 0) >= 10
                      and self.run_record().get("step", 0) >= 17)
        step_at_kill = self.run_record().get("step")
        os.kill(worker_a.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        self.say(f"SIGKILL -> worker-a (pid {worker_a.pid}) at step {step_at_kill}; its trainer is still running")
        self.wait_for("worker-a's watchdog to kill its trainer",
                      lambda: not processes_with_env("RELAY_WORKER_ID=worker-a"), 10)
        self.say(f"worker-a's watchdog killed its trainer {time.monotonic() - killed_at:.1f}s after the SIGKILL")
        self.wait_for("worker-b to take over", lambda: self.run_record().get("holder") == "worker-b",
                      self.LEASE_SECONDS * 3)
        self.say(f"worker-b took over {time.monotonic() - killed_at:.1f}s after the kill (lease {self.LEASE_SECONDS} s)")
        record = self.wait_for("the run to complete", lambda: self.run_record().get("status") == "COMPLETED"
                               and self.run_record(), 60)
        self.say(f"run COMPLETED at step {record['step']}")
        return self.prove(record, max_steps)

    def prove(self, record: dict, max_steps: int) -> int:
        print("\nhandoff timeline:")
        for lease in record["leases"]:
            print(f"  epoch {lease['epoch']}  {lease['worker_id']:<9} steps {lease['start_step']:>3} -> "
                  f"{lease['end_step']:<3} {lease['ended_at'] - lease['started_at']:5.1f}s  ended: {lease['why']}")
        reference = os.path.join(self.work, "reference")
        env = dict(self.env, RELAY_CKPT_DIR=reference, MOCK_STEP_SECONDS="0")
        subprocess.run([sys.executable, os.path.join(HERE, "relay.py"), "mock-trainer"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        final = iteration_dirname(max_steps) + "/model.json"
        relayed = sha256_file(os.path.join(self.work, "volume", "runs", self.RUN_ID, "ckpt", final))
        uninterrupted = sha256_file(os.path.join(reference, final))
        print(f"\nrelayed run        {final}  sha256 {relayed}")
        print(f"uninterrupted run  {final}  sha256 {uninterrupted}")
        if relayed != uninterrupted:
            print("MISMATCH: the relayed result differs from an uninterrupted run")
            return 1
        print("identical: the relayed run equals an uninterrupted run, byte for byte")
        return 0


###############################################################################
# 11. Mock trainer ############################################################
###############################################################################
#
# Honest and deterministic: SGD on a synthetic linear regression whose batch for step k is
# drawn from random.Random(k) alone, so a run resumed from any checkpoint computes exactly
# what an uninterrupted run computes.  Its whole state is iter_XXXXXXX/model.json; floats
# survive JSON exactly (repr round-trips), which makes resumption bit-exact.

MOCK_DIM, MOCK_BATCH, MOCK_LR = 8, 16, 0.05


def mock_sgd_step(weights: list[float], step: int) -> tuple[list[float], float]:
    rng = random.Random(step)
    target = [math.sin(i + 1) for i in range(MOCK_DIM)]
    grad, loss = [0.0] * MOCK_DIM, 0.0
    for _ in range(MOCK_BATCH):
        x = [rng.uniform(-1.0, 1.0) for _ in range(MOCK_DIM)]
        y = sum(t * xi for t, xi in zip(target, x, strict=True)) + rng.gauss(0.0, 0.01)
        err = sum(w * xi for w, xi in zip(weights, x, strict=True)) - y
        loss += err * err / MOCK_BATCH
        grad = [g + 2.0 * err * xi / MOCK_BATCH for g, xi in zip(grad, x, strict=True)]
    return [w - MOCK_LR * g for w, g in zip(weights, grad, strict=True)], loss


def mock_env_number(name: str, default: str, kind: type) -> Any:
    raw = os.environ.get(name, default)
    try:
        value = kind(raw)
    except ValueError:
        raise UserError(f"{name}={raw!r} must be a {'whole ' if kind is int else ''}number") from None
    if value < 0 or (kind is int and name != "MOCK_MAX_STEPS" and value < 1):
        raise UserError(f"{name}={raw!r} is out of range")
    return value


def mock_trainer_main() -> int:
    ckpt = os.environ.get("RELAY_CKPT_DIR") or os.path.abspath("mock_ckpt")
    max_steps = mock_env_number("MOCK_MAX_STEPS", "100", int)
    step_seconds = mock_env_number("MOCK_STEP_SECONDS", "0.05", float)
    save_every = mock_env_number("MOCK_SAVE_EVERY", "10", int)
    pattern = os.environ.get("RELAY_ROLLOUT_PATTERN", "")
    state = {"step": 0, "weights": [0.0] * MOCK_DIM, "loss": None}
    tracker = CheckpointDir.__new__(CheckpointDir)
    tracker.path = ckpt
    resume = tracker.tracker_iteration()
    if resume is not None:
        with open(os.path.join(ckpt, iteration_dirname(resume), "model.json"), encoding="utf-8") as handle:
            state = json.load(handle)
        print(f"mock-trainer: resumed from iteration {resume} in {ckpt}", flush=True)
    else:
        print(f"mock-trainer: cold start, {max_steps} steps, checkpoints in {ckpt}", flush=True)
    while state["step"] < max_steps:
        time.sleep(step_seconds)
        step = state["step"] + 1
        weights, loss = mock_sgd_step(state["weights"], step)
        state = {"step": step, "weights": weights, "loss": loss}
        if pattern:
            samples = [{"prompt": f"q{step}.{i}", "reward": round(math.cos(step + i), 6)} for i in range(4)]
            target = pattern.format(rollout_id=str(step))
            os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
            atomic_write(target, dumps({"rollout_id": step, "samples": samples}), mode=0o644, durable=False)
        print(f"step {step}/{max_steps} loss {loss:.6f}", flush=True)
        if step % save_every == 0 or step == max_steps:
            mock_save(ckpt, state)
    return 0


def mock_save(ckpt: str, state: dict) -> None:
    """Megatron's order: the iteration folder, then the tracker, then the data position."""
    iteration = state["step"]
    folder = os.path.join(ckpt, iteration_dirname(iteration))
    os.makedirs(folder, exist_ok=True)
    atomic_write(os.path.join(folder, "model.json"), (json.dumps(state, indent=1, sort_keys=True) + "\n").encode(),
                 mode=0o644)
    atomic_write(os.path.join(ckpt, TRACKER_FILE), f"{iteration}\n".encode(), mode=0o644)
    os.makedirs(os.path.join(ckpt, "rollout"), exist_ok=True)
    atomic_write(os.path.join(ckpt, dataset_state_relpath(iteration)),
                 dumps({"consumed_samples": iteration * MOCK_BATCH}), mode=0o644)


###############################################################################
# 12. Command line ############################################################
###############################################################################


def cmd_serve(args: argparse.Namespace) -> int:
    secret = os.environ.get("RELAY_SHARED_SECRET", "")
    if args.shared_secret:
        log("commander", "warning: --shared-secret is visible in `ps`; prefer the RELAY_SHARED_SECRET variable")
        secret = args.shared_secret
    notify_url = os.environ.get("RELAY_NOTIFY_URL", "")
    if args.notify_url:
        log("commander", "warning: --notify-url is visible in `ps`; prefer the RELAY_NOTIFY_URL variable")
        notify_url = args.notify_url
    return serve(args.host, args.port, args.state_path, secret, args.lease_seconds, args.insecure,
                 args.max_failed_leases, os.environ.get("RELAY_VIEWER_SECRET", ""), args.tls_cert, args.tls_key,
                 notify_url, args.notify_no_holder_seconds)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"relay-trainer {VERSION}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the commander (lease and run records over HTTP)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="0 picks a free port (printed at start)")
    p.add_argument("--state-path", default="./commander_state.json")
    p.add_argument("--shared-secret", default="", help="prefer the RELAY_SHARED_SECRET variable (not visible in ps)")
    p.add_argument("--lease-seconds", type=float, default=60.0, help="lease TTL, 2 or more (default 60)")
    p.add_argument("--max-failed-leases", type=int, default=3,
                   help="consecutive leases ending FAILED without progress before the run is FAILED (default 3)")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback address without a secret")
    p.add_argument("--tls-cert", default="", metavar="FILE", help="serve HTTPS with this PEM certificate (chain)")
    p.add_argument("--tls-key", default="", metavar="FILE", help="the certificate's PEM private key")
    p.add_argument("--notify-url", default="", help="webhook for events; prefer RELAY_NOTIFY_URL (not visible in ps)")
    p.add_argument("--notify-no-holder-seconds", type=float, default=NOTIFY_NO_HOLDER_SECONDS,
                   help="notify when a run has had no holder this long (default 600)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="relay one run on this machine (run.yaml)")
    p.add_argument("config", metavar="RUN_YAML")
    p.set_defaults(func=lambda a: run_worker(a.config))

    p = sub.add_parser("status", help="show the commander's runs")
    p.add_argument("--commander-url", default=None, help=f"default: RELAY_COMMANDER_URL, else {DEFAULT_COMMANDER_URL}")
    p.add_argument("--run", default="", help="one run in detail: its lease timeline and events")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--watch", action="store_true", help="refresh every 2 s until Ctrl-C")
    p.add_argument("--ca-file", default="", help="CA that signed an https:// commander's certificate")
    p.set_defaults(func=run_status)

    p = sub.add_parser("logs", help="the trainer output the commander holds for a run (no SSH needed)")
    p.add_argument("run_id", metavar="RUN")
    p.add_argument("--commander-url", default=None, help=f"default: RELAY_COMMANDER_URL, else {DEFAULT_COMMANDER_URL}")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new lines until the run ends")
    p.add_argument("-n", "--lines", type=int, default=None, metavar="N", help="only the last N lines (then, with -f, new ones)")
    p.add_argument("--ca-file", default="", help="CA that signed an https:// commander's certificate")
    p.set_defaults(func=run_logs)

    for name, func, words in (("cancel", run_cancel, "end a run: its holder stops gracefully, seals, uploads, hands it "
                                                     "back; nobody takes over"),
                              ("retry", run_retry, "a FAILED or CANCELLED run back to PENDING, resumed from its latest "
                                                   "checkpoint")):
        p = sub.add_parser(name, help=words)
        p.add_argument("run_id", metavar="RUN")
        p.add_argument("--commander-url", default=None, help=f"default: RELAY_COMMANDER_URL, else {DEFAULT_COMMANDER_URL}")
        p.add_argument("--ca-file", default="", help="CA that signed an https:// commander's certificate")
        p.set_defaults(func=func)

    p = sub.add_parser("launch-stack", help="start the commander and a Lium pod with a worker (stack.yaml)")
    p.add_argument("stack", metavar="STACK_YAML")
    p.add_argument("--supervise", action="store_true", help="stay and replace dead pods until the run ends")
    p.add_argument("--dry-run", action="store_true", help="print every check's result and every command, run none")
    p.add_argument("--detach", action="store_true", help="with --supervise: supervise in the background (supervisor.log, "
                                                         "supervisor.pid beside the stack state); `down` stops it")
    p.add_argument("--preflight-done", action="store_true", help=argparse.SUPPRESS)  # the detached supervisor's own
    p.set_defaults(func=lambda a: run_launch_stack(a.stack, a.supervise, a.dry_run, a.detach, a.preflight_done))

    p = sub.add_parser("down", help="remove the stack's pods and stop the commander it started")
    p.add_argument("stack", metavar="STACK_YAML")
    p.set_defaults(func=lambda a: run_down(a.stack))

    p = sub.add_parser("demo", help="the whole relay on this machine in under a minute")
    p.add_argument("--keep", action="store_true", help="keep the demo's folder (logs, checkpoints)")
    p.set_defaults(func=lambda a: Demo(a.keep).run())

    p = sub.add_parser("mock-trainer", help="the default deterministic trainer that launch_*.sh start")
    p.set_defaults(func=lambda a: mock_trainer_main())

    p = sub.add_parser("stop-ray-job", help="slime's stop step, run by launch_*.sh on a stop (RELAY_RAY_JOB_ID)")
    p.set_defaults(func=lambda a: stop_ray_job())

    p = sub.add_parser("wait-for-nodes", help="$RELAY_WAIT_FOR_NODES: node 0's slime command waits for every "
                                              "node's GPUs in Ray")
    p.add_argument("--every", type=float, default=30.0, help="seconds between the lines that say it waits")
    p.set_defaults(func=lambda a: wait_for_nodes(a.every))

    p = sub.add_parser("watchdog", help=argparse.SUPPRESS)  # a replacement watchdog; commands on stdin
    p.set_defaults(func=lambda a: watchdog_loop(sys.stdin.fileno()))
    # internal: started by the worker, not by people; keep it out of the help listing
    sub._choices_actions = [a for a in sub._choices_actions if a.dest != "watchdog"]
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"relay: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
