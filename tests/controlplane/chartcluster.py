"""The chart's RBAC and CRD on a real control plane (``k8s_ext_connector_testbed``), and each
component's own ServiceAccount credentials, for the control-plane tests that run there.

The Roles are the chart's, rendered by helm from files/rbac-rules.yaml (what a user's
``helm install`` creates), so a missing or excessive rule shows up as a real 403. The API
server keeps an audit log: ``calls`` reads what one component's ServiceAccount asked for.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from k8s_ext_connector.operator import rbac
from k8s_ext_connector_testbed.audit import AuditCall, service_account_user
from k8s_ext_connector_testbed.controlplane import ControlPlane
from tests.chart.helm import CHART, RELEASE_NAMESPACE, helm

RELEASE = "ext-connector"
CONNECTOR_NAMESPACE = "external-services"
FULLNAME = "k8s-ext-connector"
CRD = CHART / "crds" / "externalservices.submariner.io.yaml"
RBAC_TEMPLATES = ("connector-namespace", "operator-rbac", "certs-rbac", "gateway-rbac")
# The objects name-restricted rules cover, as the chart names them for this release.
TLS_SECRET = f"{FULLNAME}-webhook-tls"
CA_SECRET = f"{FULLNAME}-webhook-ca"
WEBHOOK_CONFIGURATION = FULLNAME


def chart_rbac() -> str:
    """The chart's ServiceAccounts, Roles, bindings and connector namespace, as rendered."""
    shown = [arg for t in RBAC_TEMPLATES for arg in ("-s", f"templates/{t}.yaml")]
    return helm("template", RELEASE, str(CHART), "-n", RELEASE_NAMESPACE, *shown).stdout


def install(cp: ControlPlane) -> None:
    """The release namespace, the chart's RBAC and the CRD, established."""
    cp.kubectl("create", "namespace", RELEASE_NAMESPACE)
    cp.kubectl("apply", "-f", "-", input_text=chart_rbac())
    cp.kubectl("apply", "-f", str(CRD))
    cp.kubectl(
        "wait", "--for=condition=Established", "--timeout=30s",
        "crd/externalservices.submariner.io",
    )  # fmt: skip


def service_account(component: str) -> tuple[str, str]:
    namespace = CONNECTOR_NAMESPACE if component == "gateway" else RELEASE_NAMESPACE
    return namespace, f"{FULLNAME}-{component}"


def user(component: str) -> str:
    return service_account_user(*service_account(component))


def kubeconfig(cp: ControlPlane, component: str) -> Path:
    """A token of the component's own ServiceAccount (what its pod would mount)."""
    return cp.service_account_kubeconfig(*service_account(component))


def calls(cp: ControlPlane, component: str, since: int = 0) -> list[AuditCall]:
    """What the component asked the API server for, from the audit log (its ``since``-th
    recorded call on); logged as soon as each response completes (``--audit-log-mode
    =blocking``), watches as they start."""
    return cp.audit_calls(user(component))[since:]


Grant = tuple[str, str, str]  # (group, resource, verb)


def granted(*rules: rbac.Rule) -> set[Grant]:
    return {(r.group, r.resource, verb) for r in rules for verb in r.verbs}


def used(recorded: list[AuditCall]) -> set[Grant]:
    return {(c.group, c.resource, c.verb) for c in recorded}


def wait_for_call(cp: ControlPlane, component: str, match: object, timeout: float = 10) -> None:
    """Until the audit log holds a call of the component equal to ``match`` in its tuple form
    (``(verb, resource, namespace, name)``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any((c.verb, c.resource, c.namespace, c.name) == match for c in calls(cp, component)):
            return
        time.sleep(0.05)
    raise AssertionError(f"{component} never made the call {match}")


@pytest.fixture(scope="module")
def control_plane() -> Iterator[ControlPlane]:
    """One real control plane per module with the chart's RBAC, the CRD and an audit log."""
    with ControlPlane(audit_log=True) as cp:
        install(cp)
        yield cp
