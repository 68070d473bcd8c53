"""The kind e2e tier (`make e2e`): the project's image in a kind cluster, the Helm chart, and
the seed's walkthrough proved by connections (tests/e2e/walkthrough.py).

Never collected unless ``EXTCONN_E2E=1`` (which `make e2e` sets): the default ``pytest`` run,
CI's on machines without Docker, does not see these tests at all. With ``EXTCONN_E2E=1``
and no usable Docker daemon, kind, helm or kubectl, the session FAILS before any test runs
(exit 4, every missing piece named): a run without Docker must never look green.

Environment:
- ``EXTCONN_E2E=1``: collect and run this tier.
- ``EXTCONN_E2E_KEEP=1``: leave the cluster and the containers up at the end (it prints how
  to reach and delete them).
- ``EXTCONN_E2E_NODE_IMAGE``: kind node image (default: the pinned kind release's own).
- ``EXTCONN_E2E_ARTIFACTS=DIR``: on the first failure, write the diagnostics and
  `kind export logs` there (the workflow uploads it).

Everything here imports the harness lazily, so the default run only reads this file.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.e2e.harness import Say
    from tests.e2e.walkthrough import Walkthrough

ENABLED = os.environ.get("EXTCONN_E2E") == "1"
E2E_DIR = Path(__file__).resolve().parent

if not ENABLED:
    collect_ignore_glob = ["*"]


def _in_e2e(item: pytest.Item) -> bool:
    return Path(item.path).resolve().is_relative_to(E2E_DIR)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not ENABLED or not any(_in_e2e(item) for item in items):
        return
    from tests.e2e.harness import preflight

    _, problems = preflight()
    if problems:
        raise pytest.UsageError(
            "EXTCONN_E2E=1 but the kind e2e suite CANNOT RUN here, so it FAILS"
            " (it never skips):\n"
            + "\n".join(f"  - {problem}" for problem in problems)
            + "\nIt needs a reachable Docker daemon, kind, helm and kubectl: run `make e2e`"
            " on a machine with Docker (CI: .github/workflows/e2e.yaml)."
        )


def _say(config: pytest.Config) -> Say:
    """Progress lines on the terminal as they happen, through pytest's output capture."""
    capture = config.pluginmanager.getplugin("capturemanager")

    def say(text: str) -> None:
        line = f"[e2e] {text}\n"
        try:
            if capture is not None:
                with capture.global_and_fixture_disabled():
                    sys.stderr.write(line)
                    sys.stderr.flush()
                return
        except Exception:  # after pytest's teardown (clean-up at exit): plain stderr
            pass
        sys.stderr.write(line)
        sys.stderr.flush()

    return say


@pytest.fixture(scope="session")
def walkthrough(
    pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Walkthrough]:
    """The seed's walkthrough, brought up once for the session and removed at its end, also
    when bring-up or a test fails (unless EXTCONN_E2E_KEEP=1)."""
    from tests.e2e.harness import Cleanup, Kind, preflight
    from tests.e2e.walkthrough import STATE, bring_up

    tools, problems = preflight()
    if tools is None:
        pytest.fail("kind e2e prerequisites missing: " + "; ".join(problems))
    say = _say(pytestconfig)
    keep = os.environ.get("EXTCONN_E2E_KEEP") == "1"
    kind = Kind(
        tools=tools,
        name=f"extconn-e2e-{uuid.uuid4().hex[:6]}",
        workdir=tmp_path_factory.mktemp("e2e"),
        say=say,
    )
    cleanup = Cleanup(say)
    try:
        try:
            walk = bring_up(kind, cleanup)
        except (Exception, pytest.fail.Exception):  # also pytest-timeout's; not Ctrl-C
            text = STATE.diagnose()  # while the cluster is still there
            if text:
                say("bring-up FAILED; diagnostics:\n" + text)
            raise
        yield walk
    finally:
        STATE.live = None
        if keep:
            cleanup.cancel()
            say(
                f"EXTCONN_E2E_KEEP=1: left up. kubectl --kubeconfig {kind.kubeconfig} get"
                f" externalservices -A; remove with `kind delete cluster --name {kind.name}`"
                f" and `docker rm -f {kind.server} {kind.stranger}`"
            )
        else:
            cleanup.run()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failing e2e test carries kubectl get/describe/logs of our components."""
    report = yield
    if ENABLED and report.failed and report.when in ("setup", "call") and _in_e2e(item):
        from tests.e2e.walkthrough import STATE

        text = STATE.diagnose()
        if text:
            report.sections.append(("e2e diagnostics", text))
    return report
