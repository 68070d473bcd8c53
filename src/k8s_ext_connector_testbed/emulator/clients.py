"""How the lab and the tests talk to an API server as a user would: kubectl."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path


def run_kubectl(
    kubeconfig: Path,
    args: Sequence[str],
    stdin: str | None = None,
    cache_dir: Path | None = None,
    kubectl: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """One kubectl command against ``kubeconfig``; a per-run ``cache_dir`` keeps discovery
    from a previous emulator (another port, other CRDs) out of the answer."""
    argv = [kubectl or shutil.which("kubectl") or "kubectl", "--kubeconfig", str(kubeconfig)]
    if cache_dir is not None:
        argv += ["--cache-dir", str(cache_dir)]
    return subprocess.run(
        [*argv, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )
