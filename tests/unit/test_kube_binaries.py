"""Where the upstream binaries come from: the build script and the harness agree on the
release, and ``KUBEBUILDER_ASSETS`` (envtest's convention) is used as it is, never built."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from k8s_ext_connector_testbed import binaries

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "kube-binaries.sh"
NO_GO_PATH = "/usr/bin:/bin"  # the script fails if it tries to build: `go` is not here


def _assets(tmp_path: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        path = tmp_path / name
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    return tmp_path


def _script(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": NO_GO_PATH, "HOME": os.environ.get("HOME", "/root"), **env},
        check=False,
    )


def test_script_and_harness_pin_the_same_release() -> None:
    text = SCRIPT.read_text()
    assert re.search(r"^KUBE_VERSION=(\S+)$", text, re.M)[1] == binaries.KUBE_VERSION  # type: ignore[index]
    assert re.search(r"^ETCD_VERSION=(\S+)$", text, re.M)[1] == binaries.ETCD_VERSION  # type: ignore[index]
    listed = re.search(r"^BINARIES=\((.*)\)$", text, re.M)[1].split()  # type: ignore[index]
    assert tuple(listed) == binaries.BINARIES


def test_kubebuilder_assets_is_used_and_nothing_is_built(tmp_path: Path) -> None:
    assets = _assets(tmp_path, binaries.BINARIES)
    result = _script(KUBEBUILDER_ASSETS=str(assets))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(assets)
    assert "building" not in result.stderr


def test_kubebuilder_assets_lacking_a_binary_fails_naming_it(tmp_path: Path) -> None:
    envtest_set = ("etcd", "kube-apiserver", "kubectl")  # what setup-envtest downloads
    result = _script(KUBEBUILDER_ASSETS=str(_assets(tmp_path, envtest_set)))
    assert result.returncode == 1
    assert "lacks kube-controller-manager kube-scheduler" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_without_go_the_build_fails_in_one_line(tmp_path: Path) -> None:
    result = _script(KUBE_ASSETS_ROOT=str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
    assert "need Go" in result.stderr
    assert not list(tmp_path.iterdir())


def test_harness_finds_assets_and_names_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(binaries.ASSETS_ENV, str(_assets(tmp_path, binaries.BINARIES[:-1])))
    with pytest.raises(binaries.MissingBinaries, match=r"KUBEBUILDER_ASSETS=.*: kubectl; run"):
        binaries.find()
    _assets(tmp_path, ("kubectl",))
    assert binaries.find().kube_apiserver == tmp_path / "kube-apiserver"


def test_default_directory_follows_envtest_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(binaries.ASSETS_ENV, raising=False)
    directory = binaries.assets_dir()
    assert directory.parent == REPO / ".tools" / "kubebuilder-envtest" / "k8s"
    assert directory.name.startswith(binaries.KUBE_VERSION.removeprefix("v") + "-linux-")
    stamped = _script("--dir", KUBE_ASSETS_ROOT=str(REPO / ".tools" / "kubebuilder-envtest"))
    assert stamped.stdout.strip() == str(directory)
