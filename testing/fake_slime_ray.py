#!/usr/bin/env python3
"""A stand-in for slime's train.py as it runs on a REAL Ray cluster, CPU only.

Follows THUDM/slime main (August 2026): train.py, slime/utils/arguments.py (cold start),
slime/backends/megatron_utils/{actor,model}.py and slime/observability/{logging_utils,
train_metric_utils}.py (log lines), Megatron's checkpoint layout and --async-save order.
Launched the way slime's scripts launch train.py: `ray start --head`, then
`ray job submit --runtime-env-json ... -- python3 fake_slime_ray.py ARGS`.

  - the driver creates a `MegatronTrainRayActor`, whose log lines reach the job's output with
    both prefixes, Ray's `(MegatronTrainRayActor pid=N) ` and logging's
    `[time] train_metric_utils.py:135 - `: `rollout N: {...}`, then
    rollout_batch_size * n_samples_per_prompt / global_batch_size train steps `step K: {...}`;
  - the actor starts an SGLang-like child process that renames itself with setproctitle
    (which hides its environment) and writes a heartbeat file next to the checkpoints;
  - cold start as slime's arguments.py: no tracker in --load and no --ref-load is an
    assertion error; no tracker and --ref-load starts at rollout 0 from the base weights;
    tracker `release` starts at rollout 1; tracker N resumes from iter_N at N + 1;
  - the "model" is a SHA-256 chain over the rollouts from the base weights, so a relayed
    run ends with exactly the weights an uninterrupted one does;
  - saves every --save-interval rollouts and at the last one: iter_N/common.pt, the tracker,
    then rollout/global_dataset_state_dict_N.pt; with --async-save the tracker of N is
    written only when the next save starts (or at the end), after the dataset state of N.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import subprocess
import sys
import time

import ray

# slime's configure_logger prints `%(filename)s:%(lineno)d`; the stand-in names slime's files.
LOG_FORMAT = "[%(asctime)s] %(where)s - %(message)s"
TRACKER = "latest_checkpointed_iteration.txt"
SGLANG_CHILD = """
import sys, time, setproctitle
setproctitle.setproctitle("sglang::scheduler_TP0")
while True:
    with open(sys.argv[1], "w") as beat:
        beat.write(str(time.time()))
    time.sleep(0.2)
"""

logger = logging.getLogger(__name__)


def log(where: str, message: str) -> None:
    logger.info(message, extra={"where": where})


def next_weights(weights: str, rollout: int) -> str:
    return hashlib.sha256(f"{weights}:{rollout}".encode()).hexdigest()


def base_weights(ref_load: str) -> str:
    return hashlib.sha256(f"base weights of {os.path.basename(ref_load.rstrip('/'))}".encode()).hexdigest()


@ray.remote(num_cpus=1)
class MegatronTrainRayActor:
    def __init__(self, save: str, steps_per_rollout: int, step_seconds: float) -> None:
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, force=True)
        self.save_dir, self.steps, self.step_seconds = save, steps_per_rollout, step_seconds
        heartbeat = os.path.join(save, "..", f"sglang-heartbeat-{os.getpid()}")
        self.engine = subprocess.Popen([sys.executable, "-c", SGLANG_CHILD, heartbeat])

    def train(self, rollout: int, weights: str) -> str:
        log("train_metric_utils.py:135",
            f"rollout {rollout}: {{'rollout/raw_reward': {0.1 * rollout:.3f}, 'rollout/step': {rollout}}}")
        for step in range(rollout * self.steps, (rollout + 1) * self.steps):
            time.sleep(self.step_seconds)
            log("model.py:918", f"step {step}: {{'train/loss': {1.0 / (rollout + 1):.4f}, 'train/grad_norm': 1.0, "
                                f"'train/step': {step}}}")
        return next_weights(weights, rollout)

    def save(self, rollout: int, weights: str, write_tracker: bool) -> None:
        folder = os.path.join(self.save_dir, f"iter_{rollout:07d}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "common.pt"), "w") as handle:
            handle.write(weights)
        if write_tracker:
            self.finalize(rollout)

    def finalize(self, rollout: int) -> None:
        with open(os.path.join(self.save_dir, TRACKER + ".tmp"), "w") as handle:
            handle.write(str(rollout))
        os.replace(os.path.join(self.save_dir, TRACKER + ".tmp"), os.path.join(self.save_dir, TRACKER))
        log("checkpointing.py:541", f"successfully saved checkpoint from iteration {rollout} to {self.save_dir}")


def start_point(args: argparse.Namespace) -> tuple[int, str]:
    """slime's cold start and resume rules: the first rollout and the weights it starts from."""
    tracker = os.path.join(args.load, TRACKER)
    text = open(tracker).read().strip() if os.path.exists(tracker) else ""
    if not text:
        assert args.ref_load is not None, f"args.load {args.load} has no checkpoint and --ref-load is not set"
        return 0, base_weights(args.ref_load)
    if text == "release":
        return 1, base_weights(os.path.join(args.load, "release"))
    with open(os.path.join(args.load, f"iter_{int(text):07d}", "common.pt")) as handle:
        return int(text) + 1, handle.read()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, force=True)
    parser = argparse.ArgumentParser()
    parser.add_argument("--load", required=True)
    parser.add_argument("--save", required=True)
    parser.add_argument("--ref-load")
    parser.add_argument("--num-rollout", type=int, required=True)
    parser.add_argument("--save-interval", type=int)
    parser.add_argument("--async-save", action="store_true")
    parser.add_argument("--rollout-batch-size", type=int, default=8)
    parser.add_argument("--n-samples-per-prompt", type=int, default=1)
    parser.add_argument("--global-batch-size", type=int, default=2)
    parser.add_argument("--fake-step-seconds", type=float, default=0.05)
    args, _ = parser.parse_known_args()  # model, optimizer, Ray placement arguments: not simulated
    start, weights = start_point(args)
    log("train.py:21", f"starting at rollout {start} of {args.num_rollout} (WANDB_RUN_ID={os.environ.get('WANDB_RUN_ID')})")
    ray.init()
    steps = args.rollout_batch_size * args.n_samples_per_prompt // args.global_batch_size
    actor = MegatronTrainRayActor.remote(args.save, steps, args.fake_step_seconds)
    pending = None  # --async-save: the save whose tracker is not written yet
    for rollout in range(start, args.num_rollout):
        weights = ray.get(actor.train.remote(rollout, weights))
        if args.save_interval and ((rollout + 1) % args.save_interval == 0 or rollout == args.num_rollout - 1):
            if pending is not None:
                ray.get(actor.finalize.remote(pending))
            ray.get(actor.save.remote(rollout, weights, not args.async_save))
            pending = rollout if args.async_save else None
            os.makedirs(os.path.join(args.save, "rollout"), exist_ok=True)
            with open(os.path.join(args.save, "rollout", f"global_dataset_state_dict_{rollout}.pt"), "w") as handle:
                handle.write(f"consumed {rollout + 1} rollouts")
            log("data_source.py:118", f"wrote dataset state {rollout} at {time.time():.3f}")
    if pending is not None:
        ray.get(actor.finalize.remote(pending))
    return 0


if __name__ == "__main__":
    sys.exit(main())
