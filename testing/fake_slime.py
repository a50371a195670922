#!/usr/bin/env python3
"""A stand-in for a slime training command that reproduces the hazards slime brings.

It takes slime's checkpoint arguments (from $RELAY_SLIME_ARGS, as a real command would via
its launch script): --load DIR --save DIR [--save-debug-rollout-data PATTERN], and behaves
as slime does (notes/slime.md):
  - iteration = rollout id, 0-based; resume at tracker + 1; num_rollout is the total;
  - saves every FAKE_SAVE_INTERVAL rollouts: the iteration folder, then the tracker, then,
    FAKE_STATE_DELAY seconds later, rollout/global_dataset_state_dict_N.pt;
  - prints `rollout N: {...}` and `step N: {... 'train/loss': X}` lines;
  - FAKE_SETSID_CHILD=1: starts a child in a new session (as Ray does) that keeps writing
    a heartbeat file and would outlive a plain process-group kill;
  - FAKE_EXIT_EARLY_AT=N: exits 0 after rollout N, like `ray job submit` for a STOPPED job;
  - FAKE_CKPT_BYTES=N: each checkpoint's common.pt is N bytes (random, as weights are).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time


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
    tracker = os.path.join(save, "latest_checkpointed_iteration.txt")
    text = open(tracker).read().strip() if os.path.exists(tracker) else ""
    start = int(text) + 1 if text.isdigit() else 0  # "release": a converted base checkpoint, rollout 0 next
    if text == "release":
        print(f"fake slime: loading the base checkpoint {os.path.join(save, 'release')}", flush=True)
    print(f"fake slime: starting at rollout {start} of {num_rollout}", flush=True)
    if os.environ.get("FAKE_SETSID_CHILD") == "1":
        heartbeat = os.path.join(save, "..", f"heartbeat-{os.getpid()}")
        subprocess.Popen(["setsid", "bash", "-c", f"while true; do date +%s.%N > {shlex.quote(heartbeat)}; sleep 0.1; done"])
    for rollout in range(start, num_rollout):
        time.sleep(step_seconds)
        print(f"rollout {rollout}: {{'rollout/reward': {0.1 * rollout:.3f}}}", flush=True)
        print(f"step {rollout * 4 + 3}: {{'train/loss': {1.0 / (rollout + 1):.4f}, 'train/grad_norm': 1.0}}", flush=True)
        if pattern:
            with open(pattern.format(rollout_id=str(rollout)), "w") as handle:
                handle.write(f"rollout {rollout}\n")
        if (rollout + 1) % interval == 0 or rollout == num_rollout - 1:
            folder = os.path.join(save, f"iter_{rollout:07d}")
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "common.pt"), "wb") as handle:
                label = f"weights after rollout {rollout}\n".encode()
                handle.write(label + os.urandom(max(0, ckpt_bytes - len(label))))
            with open(tracker + ".tmp", "w") as handle:
                handle.write(str(rollout))
            os.replace(tracker + ".tmp", tracker)
            print(f"successfully saved checkpoint from iteration {rollout} to {save}", flush=True)
            time.sleep(state_delay)
            os.makedirs(os.path.join(save, "rollout"), exist_ok=True)
            with open(os.path.join(save, "rollout", f"global_dataset_state_dict_{rollout}.pt"), "w") as handle:
                handle.write(f"consumed {rollout + 1} rollouts\n")
            print(f"wrote dataset state {rollout} at {time.time():.3f}", flush=True)
        if rollout == exit_early_at:
            print("fake slime: job STOPPED", flush=True)
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
