"""The image carries the product only (.dockerignore leaves k8s_ext_connector_testbed out):
every component's subcommand must still start there; only `lab` says it is unavailable."""

from __future__ import annotations

import subprocess
import sys

# The testbed made unimportable, as in the image, before the CLI is loaded.
_PROBE = """
import sys
sys.modules["k8s_ext_connector_testbed"] = None
from k8s_ext_connector.cli import build_parser, main
parser = build_parser()
for argv in (["sidecar", "--config", "c", "--ssh-key", "k"],
             ["gateway", "--config", "c", "--host-key", "k"], ["operator"], ["rbac", "gateway"]):
    parser.parse_args(argv)
print("parsed")
sys.exit(main(["lab"]))
"""


def test_components_start_without_the_testbed_and_lab_says_why_not() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60, check=False
    )
    assert "parsed" in result.stdout, result.stderr
    assert result.returncode == 1, result.stderr
    assert "k8s-ext-connector lab: not available here" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
