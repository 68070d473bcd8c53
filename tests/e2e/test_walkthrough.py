"""The seed's walkthrough on kind: its four connectivity checks, a pod without a rule, and
`kubectl get externalservices` at a glance (the checks of ``k8s-ext-connector lab``).

| check                                      | expected    |
| my-pod1 -> my-externalservice:8000         | sourceIP 1  |
| my-pod2 -> my-externalservice:8000         | sourceIP 2  |
| other-pod -> my-externalservice:8000       | refused     |
| server -> sourceIP 1:80 (my-service1)      | my-pod1     |
| server -> sourceIP 2:80 (my-service2)      | my-pod2     |
| another address -> sourceIP 1:80           | refused     |

Each check polls with a deadline until it holds (the data path settles after READY), and
its failure names what it last saw.
"""

from __future__ import annotations

import pytest

from tests.e2e.harness import (
    CHECK_TIMEOUT,
    CONNECTOR_NAMESPACE,
    ES_NAME,
    ES_NAMESPACE,
    ES_PLURAL,
    OTHER_POD,
    SERVICE_PORT,
    SOURCE_PODS,
    TARGET_PORT,
    SeedPod,
    has_sidecar,
    table_rows,
    until_seen,
)
from tests.e2e.walkthrough import Walkthrough

# The first test also brings the whole scenario up (image build, cluster, chart).
pytestmark = pytest.mark.timeout(3600)

POD_IDS = [pod.name for pod in SOURCE_PODS]


def test_kubectl_get_externalservices_shows_ready(walkthrough: Walkthrough) -> None:
    out = walkthrough.kind.kubectl("get", ES_PLURAL, "-n", ES_NAMESPACE)
    rows = {row.get("NAME"): row for row in table_rows(out)}
    assert ES_NAME in rows, out
    row = rows[ES_NAME]
    assert row.get("TARGET") == walkthrough.target_ip, out
    assert row.get("SOURCES") == "2", out
    assert row.get("READY") == "2/2", out


@pytest.mark.parametrize("pod", SOURCE_PODS, ids=POD_IDS)
def test_pod_reaches_the_server_with_its_source_ip(walkthrough: Walkthrough, pod: SeedPod) -> None:
    expected = walkthrough.source_ip(pod)
    what = f"{pod.name} -> {ES_NAME}.{CONNECTOR_NAMESPACE}:{TARGET_PORT}"
    try:
        until_seen(lambda: walkthrough.egress(pod), expected, CHECK_TIMEOUT, what)
    except AssertionError as error:
        raise AssertionError(f"{error} {walkthrough.explain(str(error))}".rstrip()) from None
    # The seed's `tail /tmp/access.log` on the external server.
    assert expected in walkthrough.server_clients()


def test_pod_without_a_rule_is_refused(walkthrough: Walkthrough) -> None:
    stored = walkthrough.kind.get("pod", OTHER_POD.name, OTHER_POD.namespace)
    assert stored is not None
    assert not has_sidecar(stored), "the webhook injected a pod that no source selects"
    what = f"{OTHER_POD.name} -> {ES_NAME}.{CONNECTOR_NAMESPACE}:{TARGET_PORT}"
    until_seen(lambda: walkthrough.egress(OTHER_POD, count=1), "refused", CHECK_TIMEOUT, what)


@pytest.mark.parametrize("pod", SOURCE_PODS, ids=POD_IDS)
def test_server_reaches_the_source_service_through_its_source_ip(
    walkthrough: Walkthrough, pod: SeedPod
) -> None:
    address = walkthrough.source_ip(pod)
    what = f"server -> {address}:{SERVICE_PORT} ({pod.service})"
    until_seen(
        lambda: walkthrough.call_in(walkthrough.kind.server, address, SERVICE_PORT),
        pod.name,
        CHECK_TIMEOUT,
        what,
    )


def test_another_address_is_refused_at_the_source_ip(walkthrough: Walkthrough) -> None:
    address = walkthrough.source_ips[0]
    what = f"stranger (not targetIP) -> {address}:{SERVICE_PORT}"
    until_seen(
        lambda: walkthrough.call_in(walkthrough.kind.stranger, address, SERVICE_PORT),
        "refused",
        CHECK_TIMEOUT,
        what,
    )


def test_the_server_only_ever_saw_the_source_ips(walkthrough: Walkthrough) -> None:
    """Never a node's address: every connection that reached the external server (these and
    the earlier checks') came from a source IP."""
    for pod in SOURCE_PODS:
        walkthrough.egress(pod)
    clients = walkthrough.server_clients()
    assert clients, "the external server logged no connection at all"
    unexpected = clients - set(walkthrough.source_ips)
    assert not unexpected, (
        f"the server saw {sorted(unexpected)} besides the source IPs"
        f" {list(walkthrough.source_ips)}. {walkthrough.explain(','.join(unexpected))}"
    )
