"""Rendering the chart with the real helm binary (scripts/install.sh provides it)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).parents[2]
CHART = ROOT / "charts" / "k8s-ext-connector"
RELEASE_NAMESPACE = "k8s-ext-connector"


def helm_binary() -> str:
    found = shutil.which("helm") or str(ROOT / ".tools" / "bin" / "helm")
    assert Path(found).exists(), "helm missing: run scripts/install.sh (make install)"
    return found


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [helm_binary(), *args], capture_output=True, text=True, timeout=60, check=False
    )
    if check:
        assert result.returncode == 0, f"helm {' '.join(args)}:\n{result.stderr}"
    return result


def set_args(values: dict[str, str]) -> list[str]:
    flags: list[str] = []
    for key, value in values.items():
        flags += ["--set-json" if value[:1] in "[{" else "--set", f"{key}={value}"]
    return flags


def render(
    values: dict[str, str] | None = None, *, kube_version: str | None = None
) -> list[dict[str, Any]]:
    """Every document `helm template --include-crds` renders, parsed."""
    args = ["template", "ext-connector", str(CHART), "-n", RELEASE_NAMESPACE, "--include-crds"]
    if kube_version:
        args += ["--kube-version", kube_version]
    out = helm(*args, *set_args(values or {})).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def minimum_kube_version() -> str:
    """The lowest version Chart.yaml's kubeVersion admits (">=1.29.0-0" → "1.29.0")."""
    constraint = str(yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"])
    return constraint.removeprefix(">=").strip().split("-")[0]
