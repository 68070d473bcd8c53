"""``k8s-ext-connector lab`` on a machine missing a tool: one line naming what to install,
before anything is started (no namespace, no process)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any, NoReturn

import pytest

from k8s_ext_connector import cli
from k8s_ext_connector.lab import main as lab_main
from k8s_ext_connector.lab.tools import LAB_TOOLS, missing_message, missing_tools


def _forbidden(*args: Any, **kwargs: Any) -> NoReturn:
    raise AssertionError(f"the lab started something before its tool check: {args!r}")


def test_nothing_missing_says_nothing() -> None:
    assert missing_tools(LAB_TOOLS, lambda command: True) == []
    assert missing_message([]) is None


def test_missing_tools_grouped_by_what_installs_them() -> None:
    absent = {"iptables-nft-restore", "iptables-nft-save", "kubectl"}
    message = missing_message(missing_tools(LAB_TOOLS, lambda c: c not in absent))
    assert message == (
        "missing iptables-nft-restore, iptables-nft-save (`apt-get install iptables`);"
        " kubectl (`make install`)"
    )


def test_the_kubernetes_binaries_are_looked_for_in_the_pinned_build(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The lab runs the control plane `make install` built: an empty assets directory names
    all five binaries and the command that builds them, even with a kubectl on PATH."""
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(tmp_path))
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: f"/usr/bin/{name}")
    monkeypatch.setattr(subprocess, "run", _forbidden)
    monkeypatch.setattr(subprocess, "Popen", _forbidden)
    monkeypatch.setattr(lab_main, "LabSession", _forbidden)
    assert cli.main(["lab"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "k8s-ext-connector lab: error: missing etcd, kube-apiserver, kube-controller-manager,"
        " kube-scheduler, kubectl (`make install`); nothing was started"
    ]


@pytest.mark.parametrize("command", ["up", None])
def test_lab_exits_at_once_with_one_line(
    command: str | None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "ip" else "/x")
    monkeypatch.setattr(subprocess, "run", _forbidden)
    monkeypatch.setattr(subprocess, "Popen", _forbidden)
    monkeypatch.setattr(lab_main, "LabSession", _forbidden)
    assert cli.main(["lab", *([command] if command else [])]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "k8s-ext-connector lab: error: missing ip (`apt-get install iproute2`); nothing was started"
    ]
