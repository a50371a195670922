"""Marks every test that talks to the local Hub server (`-m hub`): .ci/hub_compat runs them again
under another huggingface_hub release."""

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "hub" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.hub)
