"""The seed's example ExternalService, moved to TEST-NET addresses, planned for the lab.

The configs come from the real planner, exactly as the operator will produce them; only
the cluster facts (ClusterIPs, which Services exist) are stated here instead of observed.
By default the source Services have no ClusterIP (egress only); ``INGRESS_SERVICES`` gives
them the ClusterIPs the lab emulates and port 80, as the seed's ``kubectl expose`` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from k8s_ext_connector.certs.ssh import KeyPair, generate_key_pair
from k8s_ext_connector.core.api import ExternalService, ExternalServiceSpec, ServiceRef
from k8s_ext_connector.core.planner import (
    ClusterFacts,
    KeyMaterial,
    Plan,
    SourceServiceFacts,
    plan,
)
from k8s_ext_connector.lab.topology import (
    EXTERNAL_SERVER_IP,
    POD_CIDR,
    POD_HTTP_PORT,
    SERVICE_IP,
    SOURCE_IPS,
    SOURCE_SERVICE_IPS,
)

SERVICE1 = ServiceRef("ns1", "my-service1")
SERVICE2 = ServiceRef("ns2", "my-service2")
EXTERNAL_SERVICE = ServiceRef("external-services", "my-externalservice")
EGRESS_ONLY = {SERVICE1: SourceServiceFacts(None), SERVICE2: SourceServiceFacts(None)}
INGRESS_SERVICES = {
    SERVICE1: SourceServiceFacts(SOURCE_SERVICE_IPS[0], (POD_HTTP_PORT,)),
    SERVICE2: SourceServiceFacts(SOURCE_SERVICE_IPS[1], (POD_HTTP_PORT,)),
}


def seed_spec(ports: tuple[tuple[int, int], ...] = ((8000, 8000),)) -> ExternalServiceSpec:
    return ExternalServiceSpec.from_dict(
        {
            "targetIP": EXTERNAL_SERVER_IP,
            "sources": [
                {
                    "service": {"namespace": SERVICE1.namespace, "name": SERVICE1.name},
                    "sourceIP": SOURCE_IPS[0],
                },
                {
                    "service": {"namespace": SERVICE2.namespace, "name": SERVICE2.name},
                    "sourceIP": SOURCE_IPS[1],
                },
            ],
            "ports": [{"protocol": "TCP", "port": p, "targetPort": t} for p, t in ports],
        }
    )


@dataclass(frozen=True)
class ScenarioKeys:
    clients: dict[ServiceRef, KeyPair]

    @staticmethod
    def generate() -> ScenarioKeys:
        return ScenarioKeys({SERVICE1: generate_key_pair(), SERVICE2: generate_key_pair()})


def plan_seed(
    keys: ScenarioKeys,
    host_key: KeyPair,
    ports: tuple[tuple[int, int], ...] = ((8000, 8000),),
    source_services: Mapping[ServiceRef, SourceServiceFacts] = EGRESS_ONLY,
) -> Plan:
    es = ExternalService(EXTERNAL_SERVICE.namespace, EXTERNAL_SERVICE.name, seed_spec(ports))
    facts = ClusterFacts(
        connector_ips={EXTERNAL_SERVICE: SERVICE_IP}, source_services=source_services
    )
    material = KeyMaterial(
        client_keys={ref: pair.public_openssh for ref, pair in keys.clients.items()},
        gateway_host_keys={ip: host_key.public_openssh for ip in SOURCE_IPS},
    )
    result = plan([es], facts, material)
    if result.problems:
        raise ValueError(f"seed scenario does not plan: {dict(result.problems)}")
    # What the operator adds from the Nodes: SSH from the pod network only.
    return replace(result, gateway=replace(result.gateway, ssh_allow_from=(POD_CIDR,)))
