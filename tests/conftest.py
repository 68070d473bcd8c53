"""Test tiers: ``tests/unit`` (pure, no privileges), ``tests/netns`` (root: real network
namespaces, iptables, SSH and TCP) and ``tests/kube`` (upstream Kubernetes binaries).

Root tests skip with a loud reason where root is truly absent. CI sets
``EXTCONN_REQUIRE_ROOT=1``: there a missing privilege is an error, never a silent skip.
Likewise ``kube`` tests skip loudly without the binaries (``make install`` builds them), and
CI's ``EXTCONN_REQUIRE_KUBE=1`` turns that into an error.
"""

from __future__ import annotations

import os

import pytest

from k8s_ext_connector_testbed import binaries

ROOT_REASON = (
    "NOT RUN: needs root to create network namespaces, veth pairs and iptables "
    "rules; run `sudo make test` (CI runs these as root)"
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _require_kube_binaries(items)
    if os.geteuid() == 0:
        return
    if os.environ.get("EXTCONN_REQUIRE_ROOT") == "1":
        raise pytest.UsageError("EXTCONN_REQUIRE_ROOT=1 but not running as root: " + ROOT_REASON)
    for item in items:
        if "root" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=ROOT_REASON))


def _require_kube_binaries(items: list[pytest.Item]) -> None:
    kube_items = [item for item in items if "kube" in item.keywords]
    if not kube_items:
        return
    try:
        binaries.find()
    except binaries.MissingBinaries as error:
        reason = f"NOT RUN: {error}"
        if os.environ.get("EXTCONN_REQUIRE_KUBE") == "1":
            raise pytest.UsageError(f"EXTCONN_REQUIRE_KUBE=1 but {error}") from None
        for item in kube_items:
            item.add_marker(pytest.mark.skip(reason=reason))
