#!/usr/bin/env python3
"""A stand-in for a slime training command that reproduces the hazards slime brings.

It takes slime's checkpoint arguments (from $RELAY_SLIME_ARGS, as a real command would via
its launch script): --load DIR --save DIR [--save-debug-rollout-data PATTERN], and behaves
as slime does (notes/slime.md):
  - iteration = rollout id, 0-based; resume at tracker + 1; num_rollout is the total;
  - saves every FAKE_SAVE_INTERVAL rollouts: the iteration folder, then the tracker (written
    in place, as Megatron's iter_finalize_fn does: a reader can see it empty), then,
    FAKE_STATE_DELAY seconds later, rollout/global_dataset_state_dict_N.pt;
  - its "weights" are a SHA-256 chain over the rollouts, from the checkpoint it loads: a
    resume reads iter_N/common.pt whole and refuses one whose bytes are not the ones that
    header names (a truncated or wrong restore fails as torch.load would), so a relayed run
    ends with the weights of an uninterrupted one only if every restore was exact;
  - prints slime's real lines with both prefixes, Ray's `(MegatronTrainRayActor pid=N) ` and
    logging's `[time] file.py:line - `: `rollout N: {...}`, then FAKE_STEPS_PER_ROLLOUT (4)
    train steps `step K: {... 'train/loss': X}` (K = N x steps per rollout + i) each followed
    by a PPO critic's `critic-step K: {'train/critic-value_loss': ...}`;
  - a converted base checkpoint (tracker `release`) starts at rollout 1, as slime does;
  - FAKE_ASYNC_SAVE=1: --async-save's order, the dataset-state file of N before tracker N;
  - FAKE_PLACEMENT_WAIT=1: waits for GPUs forever, saying so as slime does (every 0.2 s here);
  - FAKE_SETSID_CHILD=1: starts a child in a new session, double-forked (its parent exits),
    that renames itself with setproctitle (hiding its environment) and keeps writing a
    heartbeat file named after its pid: it would outlive a process-group kill and a tag scan;
  - FAKE_EXIT_EARLY_AT=N: exits 0 after rollout N, like `ray job submit` for a STOPPED job;
  - FAKE_CKPT_BYTES=N: each checkpoint's common.pt is N bytes (the header, then bytes drawn
    from the weights: as random as real weights, and a function of them).
"""

from __future__ import annotations

import hashlib
import os
import random
import shlex
import subprocess
import sys
import time

ACTOR = f"(MegatronTrainRayActor pid={os.getpid()}) "
RENAMED_CHILD = """
import os, sys, time, setproctitle
setproctitle.setproctitle("sglang::scheduler_TP0")  # hides this process's environment
while True:
    with open(os.path.join(sys.argv[1], f"heartbeat-{os.getpid()}"), "w") as beat:
        beat.write(str(time.time()))
    time.sleep(0.1)
"""


def log(where: str, message: str) -> None:
    """One line the way slime's logging and Ray's actor-output forwarding print it."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"{ACTOR}[{stamp}] {where} - {message}", flush=True)


BASE_WEIGHTS = hashlib.sha256(b"base weights").hexdigest()


def next_weights(weights: str, rollout: int) -> str:
    return hashlib.sha256(f"{weights}:{rollout}".encode()).hexdigest()


def weights_file(weights: str, size: int) -> bytes:
    """common.pt: a header naming the weights, then `size` bytes in all drawn from them."""
    header = f"weights {weights}\n".encode()
    return header + random.Random(weights).randbytes(max(0, size - len(header)))


def load_weights(path: str) -> str:
    with open(path, "rb") as handle:
        data = handle.read()
    weights = data.split(b"\n", 1)[0].removeprefix(b"weights ").decode(errors="replace")
    if data != weights_file(weights, len(data)) or len(weights) != 64:
        raise SystemExit(f"fake slime: {path} is corrupt (truncated or not the weights it names)")
    return weights


def main() -> int:
    args = shlex.split(os.environ["RELAY_SLIME_ARGS"])
    options = dict(zip(args[::2], args[1::2], strict=True))
    save = options["--save"]
    assert options["--load"] == save, "a relay run loads and saves in one folder"
    pattern = options.get("--save-debug-rollout-data")
    num_rollout = int(os.environ.get("FAKE_NUM_ROLLOUT", "12"))
    interval = int(os.environ.get("FAKE_SAVE_INTERVAL", "3"))
    state_delay = float(os.environ.get("FAKE_STATE_DELAY", "0"))
    step_seconds = float(os.environ.get("FAKE_STEP_SECONDS", "0.1"))
    exit_early_at = int(os.environ.get("FAKE_EXIT_EARLY_AT", "-1"))
    ckpt_bytes = int(os.environ.get("FAKE_CKPT_BYTES", "0"))
    steps_per_rollout = int(os.environ.get("FAKE_STEPS_PER_ROLLOUT", "4"))
    async_save = os.environ.get("FAKE_ASYNC_SAVE") == "1"
    tracker = os.path.join(save, "latest_checkpointed_iteration.txt")
    text = open(tracker).read().strip() if os.path.exists(tracker) else ""
    start = int(text) + 1 if text.isdigit() else 1 if text == "release" else 0
    if text == "release":
        print(f"fake slime: loading the base checkpoint {os.path.join(save, 'release')}", flush=True)
    weights = load_weights(os.path.join(save, f"iter_{int(text):07d}", "common.pt")) if text.isdigit() else BASE_WEIGHTS
    print(f"fake slime: starting at rollout {start} of {num_rollout}", flush=True)
    if os.environ.get("FAKE_SETSID_CHILD") == "1":  # setsid + double fork + setproctitle, as Ray and SGLang do
        subprocess.run(["setsid", "--fork", sys.executable, "-c", RENAMED_CHILD, os.path.join(save, "..")], check=True)
    while os.environ.get("FAKE_PLACEMENT_WAIT") == "1":
        time.sleep(0.2)
        log("placement_group.py:64", "Waiting for placement group of 8 GPUs (elapsed 30s): "
                                     "2 GPUs registered with Ray, 2 available.")
    for rollout in range(start, num_rollout):
        time.sleep(step_seconds)
        weights = next_weights(weights, rollout)
        log("train_metric_utils.py:135", f"rollout {rollout}: {{'rollout/reward': {0.1 * rollout:.3f}}}")
        for step in range(rollout * steps_per_rollout, (rollout + 1) * steps_per_rollout):
            log("model.py:918", f"step {step}: {{'train/kl_loss': 9.0, 'train/loss': {1.0 / (rollout + 1):.4f}, "
                                f"'train/grad_norm': 1.0, 'train/step': {step}}}")
            log("model.py:918", f"critic-step {step}: {{'train/critic-value_loss': 7.0}}")
        if pattern:
            with open(pattern.format(rollout_id=str(rollout)), "w") as handle:
                handle.write(f"rollout {rollout}\n")
        if (rollout + 1) % interval == 0 or rollout == num_rollout - 1:
            folder = os.path.join(save, f"iter_{rollout:07d}")
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "common.pt"), "wb") as handle:
                handle.write(weights_file(weights, ckpt_bytes))
            if async_save:
                write_dataset_state(save, rollout)
                time.sleep(state_delay)
                write_tracker(tracker, rollout, save)
            else:
                write_tracker(tracker, rollout, save)
                time.sleep(state_delay)
                write_dataset_state(save, rollout)
        if rollout == exit_early_at:
            print("fake slime: job STOPPED", flush=True)
            return 0
    return 0


def write_tracker(tracker: str, rollout: int, save: str) -> None:
    with open(tracker, "w") as handle:  # in place, as Megatron writes it
        handle.write(str(rollout))
    print(f"successfully saved checkpoint from iteration {rollout} to {save}", flush=True)


def write_dataset_state(save: str, rollout: int) -> None:
    os.makedirs(os.path.join(save, "rollout"), exist_ok=True)
    with open(os.path.join(save, "rollout", f"global_dataset_state_dict_{rollout}.pt"), "w") as handle:
        handle.write(f"consumed {rollout + 1} rollouts\n")
    print(f"wrote dataset state {rollout} at {time.time():.3f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
