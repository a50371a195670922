"""Break the relay's safety rules on purpose, one at a time, and check the suite notices.

    python testing/mutants.py [NAME ...]      (all of them by default; about 3 minutes)

Each mutant is one textual change to a copy of the checkout (the checkout itself is never
touched) and the tests that must fail because of it.  A mutant whose tests still pass means
the suite no longer guards that rule: the script says which, and exits 1.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Mutant:
    name: str
    rule: str  # the promise the change breaks
    old: str  # text of relay.py, found exactly once
    new: str
    tests: str  # pytest -k expression: the tests that must fail


MUTANTS = [
    Mutant("deadline-from-reply", "the worker's deadline counts from when it SENT the renewal",
           "                self.deadline = sent + ttl - lease_margin(ttl)",
           "                self.deadline = boottime() + ttl - lease_margin(ttl)",
           "answers_held_back_past_the_margin"),
    Mutant("zero-margin", "the worker stops trusting its lease a margin before the commander's expiry",
           "    return max(0.5, 0.2 * ttl)", "    return 0.0",
           "answers_held_back_past_the_margin"),
    Mutant("watchdog-ignores-deadline", "the watchdog kills the trainer when the lease deadline passes",
           "        if tree is not None and boottime() >= deadline:", "        if tree is not None and False:",
           "frozen_worker_has_its_trainer_killed"),
    Mutant("stale-report-accepted", "a report under a stale epoch's token is refused",
           "        run = self._holder_run(run_id, token)\n        was_failing = bool(run.sync_error)",
           "        run = self._run(run_id)\n        was_failing = bool(run.sync_error)",
           "stale_lease_can_neither_renew_nor_report"),
    Mutant("fence-ignored", "a multi-node run is granted again only when every node of the last epoch stopped",
           "        if run is not None and run.fenced:  # nodes of the last epoch may still run: not yet",
           "        if False:",
           "new_epoch_waits_until_every_node"),
]


def survives(mutant: Mutant) -> bool:
    """Whether the mutant's tests pass on a copy of the checkout carrying it."""
    with tempfile.TemporaryDirectory(prefix=f"relay-mutant-{mutant.name}-") as tmp:
        copy = Path(tmp) / "checkout"
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache"))
        source = (copy / "relay.py").read_text()
        if source.count(mutant.old) != 1:
            raise SystemExit(f"mutant {mutant.name}: its text is not in relay.py exactly once; update testing/mutants.py")
        (copy / "relay.py").write_text(source.replace(mutant.old, mutant.new))
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider",
                                 "test_relay.py", "-k", mutant.tests], cwd=copy, capture_output=True, text=True)
        if result.returncode not in (0, 1):
            raise SystemExit(f"mutant {mutant.name}: pytest could not run its tests:\n{result.stdout[-2000:]}")
        return result.returncode == 0


def main(names: list[str]) -> int:
    chosen = [m for m in MUTANTS if not names or m.name in names]
    if names and len(chosen) != len(names):
        raise SystemExit(f"unknown mutant; the mutants are: {', '.join(m.name for m in MUTANTS)}")
    survived = []
    for mutant in chosen:
        alive = survives(mutant)
        print(f"{'SURVIVED' if alive else 'killed  '}  {mutant.name:<28} {mutant.rule}", flush=True)
        survived += [mutant.name] if alive else []
    print(f"{len(chosen) - len(survived)} of {len(chosen)} mutants killed by the suite")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
