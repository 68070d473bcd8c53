"""The gateway's Lease (``gateway/statuslease.py``) against a real API server, with the
gateway's own ServiceAccount token under the chart's Role: written at once when the report
changes, renewed, failures logged once and retried without ending anything, released at
stop, and nothing asked of the API that the gateway's Role does not grant (the server's
audit log says what it asked). The whole gateway process writing it:
tests/netns/test_gateway_incluster.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from k8s_ext_connector.core.gateway_status import UNSERVED_ANNOTATION, gateway_lease_name
from k8s_ext_connector.core.kube import KubeClient, load_credentials
from k8s_ext_connector.gateway.statuslease import StatusLease
from k8s_ext_connector.operator import rbac
from k8s_ext_connector_testbed.controlplane import ControlPlane
from tests.controlplane import chartcluster as realcluster
from tests.controlplane.chartcluster import (  # noqa: F401
    CONNECTOR_NAMESPACE,
    control_plane,
)
from tests.polling import wait_for_async

pytestmark = [pytest.mark.kube, pytest.mark.timeout(120)]
NAMESPACE = CONNECTOR_NAMESPACE
NODE = "gw1"
LOGGER = "k8s_ext_connector.gateway.statuslease"
BINDING = "rolebinding/k8s-ext-connector-gateway"


def _lease(cp: ControlPlane) -> dict[str, Any] | None:
    path = f"/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases/{gateway_lease_name(NODE)}"
    status, body = cp.api("GET", path)
    return body if status == 200 else None


def _unserved(cp: ControlPlane) -> dict[str, str] | None:
    lease = _lease(cp)
    if lease is None:
        return None
    result: dict[str, str] = json.loads(lease["metadata"]["annotations"][UNSERVED_ANNOTATION])
    return result


def test_lease_is_written_at_once_renewed_retried_and_released(
    control_plane: ControlPlane,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    cp = control_plane
    kubeconfig = realcluster.kubeconfig(cp, "gateway")
    # Installed out of order: the gateway runs before its RoleBinding exists. Every write
    # is refused (403); the gateway goes on and retries.
    binding = cp.kubectl("get", BINDING, "-n", NAMESPACE, "-o", "yaml").stdout
    cp.kubectl("delete", BINDING, "-n", NAMESPACE)

    def connect() -> KubeClient:
        return KubeClient(load_credentials(str(kubeconfig)))

    async def body() -> None:
        lease = StatusLease(connect, NAMESPACE, NODE, interval=0.2)
        runner = asyncio.create_task(lease.run())
        lease.report({})
        await asyncio.sleep(1.0)  # about five failed attempts (backoff up to the interval)
        assert not runner.done()
        assert _lease(cp) is None
        cp.kubectl("apply", "-f", "-", input_text=binding)
        await wait_for_async(lambda: _unserved(cp) == {}, what="the Lease written")
        first = _lease(cp)
        assert first is not None
        assert first["spec"]["holderIdentity"] == NODE
        assert first["spec"]["leaseDurationSeconds"] == 1  # three renewals of 0.2 s, rounded up
        await wait_for_async(
            lambda: (_lease(cp) or {})["spec"]["renewTime"] != first["spec"]["renewTime"],
            what="a renewal",
        )
        runner.cancel()
        await lease.release()
        released = _lease(cp)
        assert released is not None
        assert "holderIdentity" not in released["spec"]
        assert _unserved(cp) == {}
        await lease.close()

        # A restarted gateway takes it again (one more transition) and writes a change at
        # once: here the renewal interval is a minute, the change shows within seconds.
        lease = StatusLease(connect, NAMESPACE, NODE, interval=60.0)
        runner = asyncio.create_task(lease.run())
        await wait_for_async(
            lambda: (_lease(cp) or {})["spec"].get("holderIdentity") == NODE,
            what="the Lease taken again",
        )
        assert (_lease(cp) or {})["spec"]["leaseTransitions"] == 1
        lease.report({"203.0.113.9": "cannot listen on 203.0.113.9:2022: address in use"})
        await wait_for_async(
            lambda: _unserved(cp)
            == {"203.0.113.9": "cannot listen on 203.0.113.9:2022: address in use"},
            timeout=5,
            what="the change written at once",
        )
        lease.report({})
        await wait_for_async(lambda: _unserved(cp) == {}, timeout=5, what="cleared")
        runner.cancel()
        await lease.release()
        await lease.close()

    with caplog.at_level(logging.INFO, logger=LOGGER):
        asyncio.run(body())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # the failure said once, not per attempt
    assert warnings[0].startswith(f"cannot write Lease {gateway_lease_name(NODE)} in namespace")
    assert "403" in warnings[0], warnings[0]

    # Exactly the gateway's Role: create, get and update of Leases in the connector
    # namespace, of its own node's Lease (the server's record of what the token asked).
    recorded = realcluster.calls(cp, "gateway")
    assert {c.code for c in recorded} >= {403}  # the refusals before the binding
    allowed = [c for c in recorded if c.code != 403]
    assert {(c.resource, c.namespace) for c in recorded} == {("leases", NAMESPACE)}
    assert {c.name for c in recorded if c.verb != "create"} == {gateway_lease_name(NODE)}
    assert realcluster.used(allowed) <= realcluster.granted(*rbac.GATEWAY_NAMESPACE_RULES)
    assert {c.verb for c in allowed} == {"create", "get", "update"}
