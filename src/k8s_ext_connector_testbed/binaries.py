"""Where the upstream binaries are: envtest's ``KUBEBUILDER_ASSETS`` convention.

``scripts/kube-binaries.sh`` (run by ``make install``) builds them into
``.tools/kubebuilder-envtest/k8s/<version>-linux-<arch>/`` of the checkout; a set
``KUBEBUILDER_ASSETS`` wins, as it does for envtest. The versions here are the script's
(a unit test keeps the two equal).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

KUBE_VERSION = "v1.34.4"
ETCD_VERSION = "v3.6.5"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
ASSETS_ENV = "KUBEBUILDER_ASSETS"


class MissingBinaries(RuntimeError):
    pass


def checkout() -> Path:
    """The source checkout this package runs from (it is never installed from a wheel)."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "scripts" / "kube-binaries.sh").is_file():
            return parent
    raise MissingBinaries(
        f"{__file__} is not inside a k8s-ext-connector checkout (no scripts/kube-binaries.sh)"
    )


def _arch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def assets_dir() -> Path:
    override = os.environ.get(ASSETS_ENV)
    if override:
        return Path(override)
    return (
        checkout()
        / ".tools"
        / "kubebuilder-envtest"
        / "k8s"
        / f"{KUBE_VERSION.removeprefix('v')}-linux-{_arch()}"
    )


@dataclass(frozen=True)
class Binaries:
    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    kubectl: Path


def find() -> Binaries:
    """The five binaries, or one error naming the directory and what is missing."""
    directory = assets_dir()
    missing = [b for b in BINARIES if not os.access(directory / b, os.X_OK)]
    if missing:
        source = f"{ASSETS_ENV}={directory}" if os.environ.get(ASSETS_ENV) else str(directory)
        raise MissingBinaries(
            f"Kubernetes binaries missing in {source}: {', '.join(missing)}; run `make install`"
            f" (scripts/kube-binaries.sh builds Kubernetes {KUBE_VERSION} with Go)"
        )
    return Binaries(*(directory / b for b in BINARIES))
