"""Test tiers: ``tests/unit`` (pure, no privileges) and ``tests/netns`` (root: real network
namespaces, iptables, SSH and TCP).

Root tests skip with a loud reason where root is truly absent. CI sets
``EXTCONN_REQUIRE_ROOT=1``: there a missing privilege is an error, never a silent skip.
"""

from __future__ import annotations

import os

import pytest

ROOT_REASON = (
    "NOT RUN: needs root to create network namespaces, veth pairs and iptables "
    "rules; run `sudo make test` (CI runs these as root)"
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    if os.environ.get("EXTCONN_REQUIRE_ROOT") == "1":
        raise pytest.UsageError("EXTCONN_REQUIRE_ROOT=1 but not running as root: " + ROOT_REASON)
    for item in items:
        if "root" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=ROOT_REASON))
