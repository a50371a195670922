#!/usr/bin/env python3
"""A stand-in for slime's train.py (and train_async.py) as they run on a REAL Ray cluster, CPU only.

Follows THUDM/slime main (August 2026, 624b824): train.py, train_async.py,
slime/ray/placement_group.py (placement, then RolloutManager.load(start - 1)),
slime/ray/rollout.py (RolloutManager: a sequential Ray actor holding the data source),
slime/rollout/data_source.py (sample_offset, saved in place by torch.save),
slime/utils/arguments.py (cold start), slime/backends/megatron_utils/{actor,model}.py and
slime/observability/{logging_utils,train_metric_utils}.py (log lines), Megatron's checkpoint
layout and --async-save order.  Launched the way slime's scripts launch train.py:
`ray start --head`, then `ray job submit --runtime-env-json ... -- python3 fake_slime_ray.py ARGS`.

  - placement as slime's: a placement group of actor-num-nodes x actor-num-gpus-per-node GPU
    bundles, waited for forever while Ray has fewer GPUs (saying so every
    --fake-placement-log-seconds; slime: 30 s); once placed, a request for more GPUs than the
    pod has (`nvidia-smi -L`: Ray advertised GPUs that are not there) fails as CUDA does;
  - a `RolloutManager` actor (sequential, as slime's) owns the data position: `generate(N)`
    takes the next global batch, `save(N)` writes rollout/global_dataset_state_dict_N.pt in
    place, `load(start - 1)` reads it back at a resume (missing: from batch 0, as slime does);
  - train.py's loop: generate(N), train, save; --fake-train-async is train_async.py's loop,
    which queues generate(N + 1) BEFORE save(N) on that same actor, so the data position
    saved at N has already consumed batch N + 1;
  - the driver creates a `MegatronTrainRayActor`, whose log lines reach the job's output with
    both prefixes, Ray's `(MegatronTrainRayActor pid=N) ` and logging's
    `[time] train_metric_utils.py:135 - `: `rollout N: {...}`, then
    rollout_batch_size * n_samples_per_prompt / global_batch_size train steps `step K: {...}`;
  - the actor starts an SGLang-like child process that renames itself with setproctitle
    (which hides its environment) and writes a heartbeat file next to the checkpoints;
  - cold start as slime's arguments.py: no tracker in --load and no --ref-load is an
    assertion error; no tracker and --ref-load starts at rollout 0 from the base weights;
    tracker `release` starts at rollout 1; tracker N resumes from iter_N at N + 1;
  - the "model" is a SHA-256 chain over the batches trained on, from the base weights, and
    each checkpoint keeps the list of those batches (iter_N/trained_batches.json): a relayed
    run ends with exactly the weights of an uninterrupted one only if it trained on every
    batch once, in order;
  - saves every --save-interval rollouts and at the last one: iter_N/ (below), the tracker,
    then the dataset state of N; with --async-save the tracker of N is written only when the
    next save starts (or at the end), after the dataset state of N.

On N nodes (--actor-num-nodes N > 1), as slime @624b824 and Megatron-LM @d98e8a6 do it:
  - placement (slime/ray/placement_group.py `_create_placement_group`, `sort_key`): one group
    of N x g GPU bundles, waited for as above; each bundle's node IP is asked from inside the
    bundle and the bundles are sorted by node IP (numerically), so rank 0 runs on node 0 (the
    head: its IP sorts first);
  - one `MegatronTrainRayActor` per bundle (slime/ray/actor_group.py `_allocate_gpus_for_actor`:
    rank r in the r-th sorted bundle; slime asks 0.4 CPU, the stand-in 0: this machine has 2
    cores); rank 0 logs the metrics; the first rank of each node starts that node's SGLang-like
    child.  With one node a single actor stands for the pod's ranks, as before (one disk: one
    shard file stands for them all);
  - the checkpoint, torch_dist with its fully parallel save (megatron/core/dist_checkpointing,
    megatron/training/checkpointing.py `save_checkpoint`): every rank writes its own shard
    iter_N/__{rank}_0.distcp on ITS node's disk; rank 0 also writes .metadata (the list of
    shards), common.pt (the weights), metadata.json (Megatron's backend config) and
    trained_batches.json; the tracker is written by rank 0 only after every rank's save
    returned (Megatron's barrier before the tracker);
  - the RolloutManager runs wherever Ray puts it (slime gives it 1 CPU, no placement) and
    writes the dataset state on ITS node; --fake-rollout-manager-on-last-node pins it to the
    last node, so a test sees that state land on a member;
  - load (megatron/training/checkpointing.py `load_checkpoint` -> `read_metadata`, and torch's
    FileSystemReader): every rank reads the tracker in its own node's folder and then
    .metadata, common.pt and EVERY rank's shard of that iteration (a rank's tensors may sit
    in other ranks' files): without a shared filesystem every node needs the complete
    checkpoint.  A node without it fails the job at once with torch's
    `CheckpointException ranks:dict_keys([r]) ... FileNotFoundError ...` (a tracker naming
    another iteration fails the same way; Megatron would take the maximum iteration across
    ranks and then miss the files).  A shard holds a digest of the weights chain and its rank,
    so a stale shard, from another iteration or run, fails the load too.
  - which folder: slime passes one --save/--load path to every rank, which on a real cluster
    is each node's own disk.  On one machine the nodes' folders must differ, so a process
    uses its node's RELAY_CKPT_DIR where set, else the path it was given: Ray starts worker
    processes with the environment of their node's `ray start` (raylet), plus the job's
    runtime_env, so an actor sees its own node's RELAY_CKPT_DIR (checked with Ray 2.60: an
    actor in a bundle on the member sees the member's `ray start` variables, not the head's).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
import time

import ray
from ray.util.placement_group import PlacementGroup, placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

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


def next_weights(weights: str, batch: int) -> str:
    return hashlib.sha256(f"{weights}:{batch}".encode()).hexdigest()


def base_weights(ref_load: str) -> str:
    return hashlib.sha256(f"base weights of {os.path.basename(ref_load.rstrip('/'))}".encode()).hexdigest()


def shard_digest(weights: str, rank: int) -> str:
    """What rank `rank`'s shard of a checkpoint of `weights` holds: a shard of another
    iteration or run does not match."""
    return hashlib.sha256(f"{weights}:shard of rank {rank}".encode()).hexdigest()


def node_folder(path: str) -> str:
    """The checkpoint folder on this process's node (the docstring says why)."""
    return os.environ.get("RELAY_CKPT_DIR") or path


def gpus_on_this_pod() -> int:
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return sum(line.startswith("GPU ") for line in listing.stdout.splitlines()) if listing.returncode == 0 else 0


@ray.remote(num_cpus=1)
class RolloutManager:
    """slime's RolloutManager with its data source: one global batch per rollout."""

    def __init__(self, load: str, save: str) -> None:
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, force=True)
        self.load_dir, self.save_dir, self.sample_offset = node_folder(load), node_folder(save), 0

    def load(self, rollout: int) -> None:
        path = os.path.join(self.load_dir, "rollout", f"global_dataset_state_dict_{rollout}.pt")
        if not os.path.exists(path):
            log("data_source.py:146", f"Checkpoint {path} does not exist.")
            return
        with open(path) as handle:
            self.sample_offset = json.load(handle)["sample_offset"]
        log("data_source.py:150", f"load metadata from {path}")

    def generate(self, rollout: int) -> int:
        batch, self.sample_offset = self.sample_offset, self.sample_offset + 1
        return batch

    def save(self, rollout: int) -> None:
        os.makedirs(os.path.join(self.save_dir, "rollout"), exist_ok=True)
        with open(os.path.join(self.save_dir, "rollout", f"global_dataset_state_dict_{rollout}.pt"), "w") as handle:
            json.dump({"sample_offset": self.sample_offset}, handle)  # in place, as torch.save writes it
        log("data_source.py:118", f"wrote dataset state {rollout} at {time.time():.3f}")


@ray.remote(num_cpus=0)
class MegatronTrainRayActor:
    """One training rank (with one node: the pod's ranks together)."""

    def __init__(self, rank: int, save: str, steps_per_rollout: int, step_seconds: float, gpus_per_node: int,
                 starts_engine: bool) -> None:
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, force=True)
        if gpus_per_node > gpus_on_this_pod():  # Ray placed bundles for GPUs this pod does not have
            raise RuntimeError("CUDA error: invalid device ordinal")
        self.rank, self.save_dir = rank, node_folder(save)
        self.steps, self.step_seconds = steps_per_rollout, step_seconds
        if starts_engine:
            heartbeat = os.path.join(self.save_dir, "..", f"sglang-heartbeat-{os.getpid()}")
            self.engine = subprocess.Popen([sys.executable, "-c", SGLANG_CHILD, heartbeat])

    def node(self) -> tuple[str, str]:
        return ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id()

    def load(self, iteration: int, weights: str) -> None:
        """Megatron's load on this rank: its node's tracker, then the whole of iter_N."""
        def fail(problem: str) -> RuntimeError:
            return RuntimeError(f"CheckpointException ranks:dict_keys([{self.rank}]): {problem}")

        tracker = os.path.join(self.save_dir, TRACKER)
        found = open(tracker).read().strip() if os.path.exists(tracker) else None
        if found != str(iteration):
            raise fail(f"rank {self.rank} on {ray.util.get_node_ip_address()} finds iteration {found} in {tracker}, "
                       f"rank 0 loads {iteration}: every node needs the complete checkpoint")
        folder = os.path.join(self.save_dir, f"iter_{iteration:07d}")
        for name in (".metadata", "common.pt"):
            if not os.path.exists(os.path.join(folder, name)):
                raise fail(f"FileNotFoundError: [Errno 2] No such file or directory: '{os.path.join(folder, name)}'")
        with open(os.path.join(folder, ".metadata")) as handle:
            shards = json.load(handle)["shards"]
        for rank, name in enumerate(shards):
            path = os.path.join(folder, name)
            if not os.path.exists(path):
                raise fail(f"FileNotFoundError: [Errno 2] No such file or directory: '{path}'")
            if open(path).read() != shard_digest(weights, rank) or open(os.path.join(folder, "common.pt")).read() != weights:
                raise fail(f"{path} is a shard of another checkpoint than iteration {iteration} of this run")

    def train(self, rollout: int, weights: str, batch: int) -> str:
        if self.rank == 0:
            log("train_metric_utils.py:135",
                f"rollout {rollout}: {{'rollout/raw_reward': {0.1 * rollout:.3f}, 'rollout/step': {rollout}, "
                f"'rollout/batch': {batch}}}")
        for step in range(rollout * self.steps, (rollout + 1) * self.steps):
            time.sleep(self.step_seconds)
            if self.rank == 0:
                log("model.py:918", f"step {step}: {{'train/loss': {1.0 / (rollout + 1):.4f}, 'train/grad_norm': 1.0, "
                                    f"'train/step': {step}}}")
        return next_weights(weights, batch)

    def save(self, rollout: int, weights: str, batches: list[int], world_size: int) -> None:
        folder = os.path.join(self.save_dir, f"iter_{rollout:07d}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"__{self.rank}_0.distcp"), "w") as handle:
            handle.write(shard_digest(weights, self.rank))
        if self.rank != 0:
            return
        written = {"common.pt": weights, "trained_batches.json": json.dumps(batches),
                   ".metadata": json.dumps({"shards": [f"__{rank}_0.distcp" for rank in range(world_size)]}),
                   "metadata.json": json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                "common_backend": "torch", "common_backend_version": 1})}
        for name, text in written.items():
            with open(os.path.join(folder, name), "w") as handle:
                handle.write(text)

    def finalize(self, rollout: int) -> None:
        with open(os.path.join(self.save_dir, TRACKER + ".tmp"), "w") as handle:
            handle.write(str(rollout))
        os.replace(os.path.join(self.save_dir, TRACKER + ".tmp"), os.path.join(self.save_dir, TRACKER))
        log("checkpointing.py:541", f"successfully saved checkpoint from iteration {rollout} to {self.save_dir}")


def start_point(args: argparse.Namespace) -> tuple[int, str, list[int]]:
    """slime's cold start and resume rules: the first rollout, the weights it starts from and
    the batches those weights were trained on."""
    tracker = os.path.join(args.load, TRACKER)
    text = open(tracker).read().strip() if os.path.exists(tracker) else ""
    if not text:
        assert args.ref_load is not None, f"args.load {args.load} has no checkpoint and --ref-load is not set"
        return 0, base_weights(args.ref_load), []
    if text == "release":
        return 1, base_weights(os.path.join(args.load, "release")), []
    folder = os.path.join(args.load, f"iter_{int(text):07d}")
    with open(os.path.join(folder, "common.pt")) as weights, open(os.path.join(folder, "trained_batches.json")) as batches:
        return int(text) + 1, weights.read(), json.load(batches)


def place(gpus: int, log_every: float) -> PlacementGroup:
    """slime's create_placement_groups: wait, for ever, until Ray has the GPUs."""
    group = placement_group([{"GPU": 1, "CPU": 0}] * gpus)
    waited = 0.0
    while not group.wait(timeout_seconds=log_every):
        waited += log_every
        have = ray.cluster_resources().get("GPU", 0)
        log("placement_group.py:64", f"Waiting for placement group of {gpus} GPUs (elapsed {waited:.0f}s): "
                                     f"{have:.0f} GPUs registered with Ray, {ray.available_resources().get('GPU', 0):.0f} "
                                     "available.")
    return group


@ray.remote(num_cpus=0)
def node_ip() -> str:
    """slime's InfoActor: the IP of the node a bundle was placed on."""
    return ray.util.get_node_ip_address()


def start_ranks(args: argparse.Namespace) -> list[ray.actor.ActorHandle]:
    """The training ranks (slime's RayTrainGroup): one actor per sorted bundle on N nodes, one
    actor for the pod's ranks on one node."""
    gpus_per_node, nodes = args.actor_num_gpus_per_node, args.actor_num_nodes
    group = place(nodes * gpus_per_node, args.fake_placement_log_seconds)
    steps = args.rollout_batch_size * args.n_samples_per_prompt // args.global_batch_size
    if nodes == 1:
        return [MegatronTrainRayActor.remote(0, args.save, steps, args.fake_step_seconds, gpus_per_node, True)]
    ips = ray.get([node_ip.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group, index)).remote()
                   for index in range(len(group.bundle_specs))])
    bundles = sorted(range(len(ips)), key=lambda index: ([int(part) for part in ips[index].split(".")], index))
    return [MegatronTrainRayActor.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group, bundle)).remote(
                rank, args.save, steps, args.fake_step_seconds, gpus_per_node, rank % gpus_per_node == 0)
            for rank, bundle in enumerate(bundles)]


def main() -> int:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, force=True)
    parser = argparse.ArgumentParser()
    parser.add_argument("--load", required=True)
    parser.add_argument("--save", required=True)
    parser.add_argument("--ref-load")
    parser.add_argument("--num-rollout", type=int, required=True)
    parser.add_argument("--save-interval", type=int)
    parser.add_argument("--async-save", action="store_true")
    parser.add_argument("--actor-num-nodes", type=int, default=1)
    parser.add_argument("--actor-num-gpus-per-node", type=int, default=8)
    parser.add_argument("--rollout-batch-size", type=int, default=8)
    parser.add_argument("--n-samples-per-prompt", type=int, default=1)
    parser.add_argument("--global-batch-size", type=int, default=2)
    parser.add_argument("--fake-step-seconds", type=float, default=0.05)
    parser.add_argument("--fake-placement-log-seconds", type=float, default=30)
    parser.add_argument("--fake-train-async", action="store_true", help="train_async.py's loop")
    parser.add_argument("--fake-rollout-manager-on-last-node", action="store_true",
                        help="pin the RolloutManager (and the dataset state it writes) to the last node")
    args, _ = parser.parse_known_args()  # model, optimizer, SGLang arguments: not simulated
    start, weights, batches = start_point(args)
    log("train.py:21", f"starting at rollout {start} of {args.num_rollout} (WANDB_RUN_ID={os.environ.get('WANDB_RUN_ID')})")
    ray.init()
    ranks = start_ranks(args)
    where = {}
    if args.fake_rollout_manager_on_last_node:
        where["scheduling_strategy"] = NodeAffinitySchedulingStrategy(ray.get(ranks[-1].node.remote())[1], soft=False)
    manager = RolloutManager.options(**where).remote(args.load, args.save)
    if batches:  # resumed from iter_N (not a cold start, not `release`): every rank loads it
        ray.get([rank.load.remote(start - 1, weights) for rank in ranks])
    ray.get(manager.load.remote(start - 1))
    pending = None  # --async-save: the save whose tracker is not written yet
    prefetched = manager.generate.remote(start) if args.fake_train_async and start < args.num_rollout else None
    for rollout in range(start, args.num_rollout):
        if args.fake_train_async:  # train_async.py: take the prefetched batch, queue the next one at once
            batch = ray.get(prefetched)
            if rollout + 1 < args.num_rollout:
                prefetched = manager.generate.remote(rollout + 1)
        else:
            batch = ray.get(manager.generate.remote(rollout))
        weights = ray.get([rank.train.remote(rollout, weights, batch) for rank in ranks])[0]
        batches = [*batches, batch]
        if args.save_interval and ((rollout + 1) % args.save_interval == 0 or rollout == args.num_rollout - 1):
            if pending is not None:
                ray.get(ranks[0].finalize.remote(pending))
            # Megatron's barrier: the tracker only after every rank's save returned
            ray.get([rank.save.remote(rollout, weights, batches, len(ranks)) for rank in ranks])
            if not args.async_save:
                ray.get(ranks[0].finalize.remote(rollout))
            pending = rollout if args.async_save else None
            ray.get(manager.save.remote(rollout))
    if pending is not None:
        ray.get(ranks[0].finalize.remote(pending))
    return 0


if __name__ == "__main__":
    sys.exit(main())
