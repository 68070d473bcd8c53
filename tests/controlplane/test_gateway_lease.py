"""The gateway's Lease (``gateway/statuslease.py``) against the API emulator, without root:
written at once when the report changes, renewed, failures logged once and retried without
ending anything, released at stop, and nothing asked of the API that the gateway's Role
does not grant. The whole gateway process writing it: tests/netns/test_gateway_incluster.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from k8s_ext_connector.core.gateway_status import UNSERVED_ANNOTATION, gateway_lease_name
from k8s_ext_connector.core.kube import KubeClient, load_credentials
from k8s_ext_connector.emulator import ApiServer
from k8s_ext_connector.gateway.statuslease import StatusLease
from k8s_ext_connector.operator import rbac
from tests.polling import wait_for_async

pytestmark = pytest.mark.timeout(60)
NAMESPACE = "external-services"
NODE = "gw1"
LOGGER = "k8s_ext_connector.gateway.statuslease"


def _lease(api: ApiServer) -> dict[str, Any] | None:
    return api.get_object(
        "coordination.k8s.io", "v1", "leases", NAMESPACE, gateway_lease_name(NODE)
    )


def _unserved(api: ApiServer) -> dict[str, str] | None:
    lease = _lease(api)
    if lease is None:
        return None
    result: dict[str, str] = json.loads(lease["metadata"]["annotations"][UNSERVED_ANNOTATION])
    return result


def test_lease_is_written_at_once_renewed_retried_and_released(
    apiserver: ApiServer, kubeconfig: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def connect() -> KubeClient:
        return KubeClient(load_credentials(str(kubeconfig)))

    async def body() -> None:
        # No connector namespace yet: every write fails; the gateway goes on and retries.
        lease = StatusLease(connect, NAMESPACE, NODE, interval=0.2)
        runner = asyncio.create_task(lease.run())
        lease.report({})
        await asyncio.sleep(1.0)  # about five failed attempts (backoff up to the interval)
        assert not runner.done()
        assert _lease(apiserver) is None
        apiserver.create_object(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
        )
        await wait_for_async(lambda: _unserved(apiserver) == {}, what="the Lease written")
        first = _lease(apiserver)
        assert first is not None
        assert first["spec"]["holderIdentity"] == NODE
        assert first["spec"]["leaseDurationSeconds"] == 1  # three renewals of 0.2 s, rounded up
        await wait_for_async(
            lambda: (_lease(apiserver) or {})["spec"]["renewTime"] != first["spec"]["renewTime"],
            what="a renewal",
        )
        runner.cancel()
        await lease.release()
        released = _lease(apiserver)
        assert released is not None
        assert "holderIdentity" not in released["spec"]
        assert _unserved(apiserver) == {}
        await lease.close()

        # A restarted gateway takes it again (one more transition) and writes a change at
        # once: here the renewal interval is a minute, the change shows within seconds.
        lease = StatusLease(connect, NAMESPACE, NODE, interval=60.0)
        runner = asyncio.create_task(lease.run())
        await wait_for_async(
            lambda: (_lease(apiserver) or {})["spec"].get("holderIdentity") == NODE,
            what="the Lease taken again",
        )
        assert (_lease(apiserver) or {})["spec"]["leaseTransitions"] == 1
        lease.report({"203.0.113.9": "cannot listen on 203.0.113.9:2022: address in use"})
        await wait_for_async(
            lambda: (
                _unserved(apiserver)
                == {"203.0.113.9": "cannot listen on 203.0.113.9:2022: address in use"}
            ),
            timeout=5,
            what="the change written at once",
        )
        lease.report({})
        await wait_for_async(lambda: _unserved(apiserver) == {}, timeout=5, what="cleared")
        runner.cancel()
        await lease.release()
        await lease.close()

    with caplog.at_level(logging.INFO, logger=LOGGER):
        asyncio.run(body())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # the failure said once, not per attempt
    assert warnings[0].startswith(f"cannot write Lease {gateway_lease_name(NODE)} in namespace")

    # Exactly the gateway's Role: create, get and update of Leases in the connector namespace.
    calls = [r for r in apiserver.requests if r.resource == "leases"]
    assert {r.namespace for r in calls} == {NAMESPACE}
    assert {r.name for r in calls if r.verb != "create"} == {gateway_lease_name(NODE)}
    granted = {
        (r.group, r.resource, verb) for r in rbac.GATEWAY_NAMESPACE_RULES for verb in r.verbs
    }
    used = {(r.api_group, r.resource, r.verb) for r in apiserver.requests if r.resource}
    assert used <= granted
    assert {v for _, resource, v in used if resource == "leases"} == {"create", "get", "update"}
