"""The webhook injects only what the operator serves (issue 18, item 1).

An ExternalService the operator refuses must not inject: its pods would wait forever for
a config and key that never come, and whoever may write an ExternalService could stall
another tenant's pods. The cache applies the operator's own spec checks
(``planner.spec_problems``, with the same own-namespace setting) and honours the
operator's recorded refusal of the current generation (e.g. ``NodeAddress``, which only
the operator can judge).
"""

from __future__ import annotations

from typing import Any

import pytest

from k8s_ext_connector.core.api import ServiceRef
from k8s_ext_connector.core.planner import (
    INVALID_NAME,
    NODE_ADDRESS,
    RESERVED_ADDRESS,
    SOURCE_OUTSIDE_NAMESPACE,
)
from k8s_ext_connector.operator.snapshot import externalservice_record
from k8s_ext_connector.webhook.cache import SourceCache, injection_refusal
from tests.unit.samples import seed_spec

Obj = dict[str, Any]
VICTIM = ServiceRef("ns2", "victim-svc")


def externalservice(
    spec: Obj, name: str = "es", namespace: str = "ns3", generation: int = 1, **status: Any
) -> Obj:
    return {
        "apiVersion": "submariner.io/v1alpha1",
        "kind": "ExternalService",
        "metadata": {"name": name, "namespace": namespace, "generation": generation},
        "spec": spec,
        **({"status": status} if status else {}),
    }


def victim_spec(target: str = "203.0.113.10", source_ip: str = "203.0.113.200") -> Obj:
    return {
        "targetIP": target,
        "sources": [{"service": {"namespace": "ns2", "name": "victim-svc"}, "sourceIP": source_ip}],
        "ports": [{"protocol": "TCP", "port": 5432}],
    }


def cache_with(obj: Obj, own_namespace_sources: bool = False) -> SourceCache:
    cache = SourceCache(own_namespace_sources)
    cache.replace_services(
        [
            {
                "metadata": {"namespace": "ns2", "name": "victim-svc"},
                "spec": {"selector": {"app": "db-client"}},
            }
        ]
    )
    cache.replace_externalservices([obj])
    return cache


VICTIM_POD = {"metadata": {"namespace": "ns2", "labels": {"app": "db-client"}}}


def test_the_cross_tenant_attack_injects_nothing() -> None:
    """ns3's ExternalService names ns2's Service and targets 127.0.0.1."""
    attack = externalservice(victim_spec(target="127.0.0.1"))
    assert cache_with(attack, own_namespace_sources=True).sources_for(VICTIM_POD) == ()
    # Without own-namespace mode the loopback target alone is still refused.
    assert cache_with(attack).sources_for(VICTIM_POD) == ()


def test_a_source_in_another_namespace_is_refused_only_in_own_namespace_mode() -> None:
    other_namespace = externalservice(victim_spec())
    assert cache_with(other_namespace).sources_for(VICTIM_POD) == (VICTIM,)
    assert cache_with(other_namespace, own_namespace_sources=True).sources_for(VICTIM_POD) == ()
    same_namespace = externalservice(victim_spec(), namespace="ns2")
    assert cache_with(same_namespace, own_namespace_sources=True).sources_for(VICTIM_POD) == (
        VICTIM,
    )


@pytest.mark.parametrize(
    ("obj", "own_namespace", "reason"),
    [
        (externalservice(victim_spec()), True, SOURCE_OUTSIDE_NAMESPACE),
        (externalservice(victim_spec(target="127.0.0.1")), False, RESERVED_ADDRESS),
        (externalservice(victim_spec(target="169.254.169.254")), False, RESERVED_ADDRESS),
        (externalservice(victim_spec(source_ip="0.0.0.0")), False, RESERVED_ADDRESS),
        (externalservice(victim_spec(source_ip="224.0.0.1")), False, RESERVED_ADDRESS),
        (externalservice(victim_spec(), name="1.bad.name"), False, INVALID_NAME),
        (
            externalservice(
                victim_spec(),
                generation=3,
                observedGeneration=3,
                conditions=[
                    {
                        "type": "Accepted",
                        "status": "False",
                        "reason": NODE_ADDRESS,
                        "message": "spec.sources[0].sourceIP: 203.0.113.200 is an address of"
                        " node gw1",
                    }
                ],
            ),
            False,
            NODE_ADDRESS,
        ),
    ],
)
def test_each_refusal_reason_injects_nothing(obj: Obj, own_namespace: bool, reason: str) -> None:
    refusal = injection_refusal(externalservice_record(obj), own_namespace)
    assert reason in refusal
    assert cache_with(obj, own_namespace).sources_for(VICTIM_POD) == ()


def test_a_refusal_of_an_older_generation_does_not_block_the_new_spec() -> None:
    refused_before = externalservice(
        victim_spec(),
        generation=4,
        observedGeneration=3,
        conditions=[{"type": "Accepted", "status": "False", "reason": NODE_ADDRESS}],
    )
    assert cache_with(refused_before).sources_for(VICTIM_POD) == (VICTIM,)
    # The condition's own observedGeneration wins over the status' one.
    refused_now = externalservice(
        victim_spec(),
        generation=4,
        observedGeneration=3,
        conditions=[
            {
                "type": "Accepted",
                "status": "False",
                "reason": NODE_ADDRESS,
                "observedGeneration": 4,
            }
        ],
    )
    assert cache_with(refused_now).sources_for(VICTIM_POD) == ()


def test_acceptance_after_a_refusal_injects_again() -> None:
    spec = victim_spec()
    cache = cache_with(
        externalservice(
            spec,
            observedGeneration=1,
            conditions=[{"type": "Accepted", "status": "False", "reason": NODE_ADDRESS}],
        )
    )
    assert cache.sources_for(VICTIM_POD) == ()
    cache.put_externalservice(
        externalservice(
            spec,
            observedGeneration=1,
            conditions=[{"type": "Accepted", "status": "True", "reason": "Valid"}],
        )
    )
    assert cache.sources_for(VICTIM_POD) == (VICTIM,)


def test_the_seed_example_still_injects() -> None:
    seed = externalservice(seed_spec(), name="my-externalservice", namespace="default")
    cache = SourceCache()
    cache.replace_services(
        [
            {
                "metadata": {"namespace": "ns1", "name": "my-service1"},
                "spec": {"selector": {"a": "b"}},
            }
        ]
    )
    cache.replace_externalservices([seed])
    pod = {"metadata": {"namespace": "ns1", "labels": {"a": "b"}}}
    assert cache.sources_for(pod) == (ServiceRef("ns1", "my-service1"),)
