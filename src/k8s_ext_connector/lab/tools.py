"""The programs the lab runs, checked before it starts anything.

A missing one would otherwise show up late and indirectly (an agent crash-looping on a
missing iptables-nft-restore, a namespace that was never made); checking first gives one
line naming what to install. The list is what the lab itself executes: ``ip`` for the
namespaces, the nft backend of iptables for the lab's and the agents' rules (empty lab
namespaces make the agents pick nft), ``setpriv`` to tie the operator's life to the lab's,
and the pinned Kubernetes binaries ``make install`` builds (``scripts/kube-binaries.sh``:
etcd, kube-apiserver, kube-controller-manager, kube-scheduler, and the kubectl the user
types). OpenSSH and ``nft`` are not used by the lab (the gateway
is asyncssh; the tests and the benchmark need them, and ``make install`` installs them).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass

from k8s_ext_connector_testbed.binaries import BINARIES

# Builds the pinned Kubernetes release from source the first time (minutes; README.md).
KUBE_BUILD = "make install"


@dataclass(frozen=True)
class Tool:
    command: str
    install: str  # what to run to get it


LAB_TOOLS = (
    Tool("ip", "apt-get install iproute2"),
    Tool("iptables-nft-restore", "apt-get install iptables"),
    Tool("iptables-nft-save", "apt-get install iptables"),
    Tool("setpriv", "apt-get install util-linux"),
    *(Tool(name, KUBE_BUILD) for name in BINARIES),
)


def missing_tools(
    tools: tuple[Tool, ...], found: Callable[[str], bool] = lambda c: shutil.which(c) is not None
) -> list[Tool]:
    return [tool for tool in tools if not found(tool.command)]


def missing_message(missing: list[Tool]) -> str | None:
    """One line: each missing command and how to get it, installs grouped; None if none."""
    if not missing:
        return None
    installs: dict[str, list[str]] = {}
    for tool in missing:
        installs.setdefault(tool.install, []).append(tool.command)
    return "missing " + "; ".join(
        f"{', '.join(commands)} (`{install}`)" for install, commands in installs.items()
    )
