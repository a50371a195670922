"""Marks every test that talks to the local Hub server (`-m hub`), and every one that drives the
real lium CLI (`-m lium`): .ci/hub_compat runs the Hub tests again under another huggingface_hub
release (those not about lium).  Orders the tests so that pytest-xdist's workers finish
together (the suite's time budget is 5 minutes on 2 cores)."""

import pytest

FAST_TEST_SECONDS = 3.0  # what an unmarked test is expected to take


def expected_seconds(item: pytest.Item) -> float:
    marker = item.get_closest_marker("slow")
    return float(marker.args[0]) if marker and marker.args else FAST_TEST_SECONDS


def balanced_for_worksteal(items: list[pytest.Item], workers: int) -> list[pytest.Item]:
    """The worksteal scheduler hands worker i the i-th of `workers` contiguous shares of the
    collection and later steals from the END of the longest queue.  So: deal the tests, longest
    first, each to the share with the least expected work that still has room (shares as long
    as the scheduler cuts them), and keep each share longest first: a slow test never waits at
    the end of a queue, and what is stolen is short."""
    sizes, remaining = [], len(items)
    for i in range(workers):
        sizes.append(remaining // (workers - i))
        remaining -= sizes[-1]
    shares: list[list[pytest.Item]] = [[] for _ in sizes]
    work = [0.0] * workers
    for item in sorted(items, key=expected_seconds, reverse=True):  # stable: file order among equals
        share = min((i for i in range(workers) if len(shares[i]) < sizes[i]), key=lambda i: work[i])
        shares[share].append(item)
        work[share] += expected_seconds(item)
    return [item for share in shares for item in share]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for fixture in ("hub", "lium"):
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(getattr(pytest.mark, fixture))
    workerinput = getattr(config, "workerinput", None)  # set in an xdist worker, which collects
    if workerinput and config.getoption("dist", "no") == "worksteal" and workerinput["workercount"] > 1:
        items[:] = balanced_for_worksteal(items, workerinput["workercount"])
