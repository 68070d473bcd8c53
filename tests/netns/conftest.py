"""Fixtures for the namespace tier: the seed scenario on a fresh lab per test."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from k8s_ext_connector.core.planner import Plan
from k8s_ext_connector.lab.scenario import SERVICE1, SERVICE2, ScenarioKeys, plan_seed
from k8s_ext_connector.lab.topology import Lab


@dataclass
class SeedLab:
    lab: Lab
    keys: ScenarioKeys
    plan: Plan

    def replan(self, ports: tuple[tuple[int, int], ...]) -> Plan:
        self.plan = plan_seed(self.keys, self.lab.host_key, ports)
        return self.plan


@pytest.fixture
def seed_lab() -> Iterator[SeedLab]:
    """External server, gateway, my-pod1/my-pod2 with sidecars, other-pod without one."""
    with Lab.create(["my-pod1", "my-pod2", "other-pod"]) as lab:
        lab.start_external_server()
        keys = ScenarioKeys.generate()
        planned = plan_seed(keys, lab.host_key)
        lab.start_gateway(planned.gateway)
        lab.start_sidecar("my-pod1", planned.sidecars[SERVICE1], keys.clients[SERVICE1])
        lab.start_sidecar("my-pod2", planned.sidecars[SERVICE2], keys.clients[SERVICE2])
        yield SeedLab(lab, keys, planned)
