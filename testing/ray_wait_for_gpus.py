#!/usr/bin/env python3
"""What a multi-node launch command runs on node 0 between `ray start --head` and `ray job
submit`: wait until Ray reports every node's GPUs, saying how many it has while it waits.

slime itself would wait too, inside its placement group, but it says so only every 30 s
(slime/ray/placement_group.py) and only once the job runs; waiting before the submit makes
"the members have not joined" a line of its own.  It prints when the count changes and every
--log-seconds, through Ray's own client (`ray.cluster_resources`, as slime's message does).
"""

from __future__ import annotations

import argparse
import time

import ray


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True, help="the head's GCS, IP:PORT")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus", type=int, required=True, help="GPUs in all (nodes x GPUs per node)")
    parser.add_argument("--log-seconds", type=float, default=30)
    args = parser.parse_args()
    ray.init(address=args.address, logging_level="warning")
    said, said_at = None, 0.0
    while True:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        nodes = sum(node["Alive"] for node in ray.nodes())
        if gpus >= args.gpus and nodes >= args.nodes:
            print(f"Ray reports {gpus} GPUs on {nodes} nodes", flush=True)
            return 0
        if (gpus, nodes) != said or time.monotonic() - said_at >= args.log_seconds:
            print(f"waiting for Ray to report {args.gpus} GPUs on {args.nodes} nodes: {gpus} GPUs on {nodes} nodes "
                  "so far", flush=True)
            said, said_at = (gpus, nodes), time.monotonic()
        time.sleep(0.5)


if __name__ == "__main__":
    raise SystemExit(main())
