"""Only an administrator can make a node a gateway (issue 18, item 2).

A kubelet may label its own Node with anything NodeRestriction does not forbid; a gateway
label it could set would let a compromised node attract source IPs and tunnelled traffic.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from k8s_ext_connector.core.api import (
    GATEWAY_NODE_LABEL,
    SELF_ASSIGNABLE_GATEWAY_LABEL,
    node_may_set_label,
)
from k8s_ext_connector.operator.desired import OperatorSettings
from k8s_ext_connector.operator.main import warn_if_nodes_may_self_label

CHART = Path(__file__).resolve().parents[2] / "charts" / "k8s-ext-connector"


@pytest.mark.parametrize(
    ("key", "kubelet_may_set"),
    [
        ("node-restriction.kubernetes.io/ext-connector-gateway", False),
        ("ext-connector.submariner.io/gateway", True),
        ("example.com/egress", True),
        ("egress", True),
        ("node.kubernetes.io/egress", True),  # a prefix NodeRestriction leaves to kubelets
        ("kubelet.kubernetes.io/egress", True),
        ("kubernetes.io/hostname", True),
        ("topology.kubernetes.io/zone", True),
        ("kubernetes.io/egress", False),
        ("egress.k8s.io/gateway", False),
    ],
)
def test_which_labels_a_kubelet_may_set_on_its_node(key: str, kubelet_may_set: bool) -> None:
    assert node_may_set_label(key) is kubelet_may_set


def test_the_default_gateway_label_is_one_no_kubelet_may_set() -> None:
    assert not node_may_set_label(GATEWAY_NODE_LABEL[0])
    assert OperatorSettings().gateway_label == GATEWAY_NODE_LABEL
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["gatewayNodeLabel"] == "=".join(GATEWAY_NODE_LABEL)


def test_the_prototypes_label_is_accepted_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        warn_if_nodes_may_self_label(GATEWAY_NODE_LABEL)
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        warn_if_nodes_may_self_label(SELF_ASSIGNABLE_GATEWAY_LABEL)
    (record,) = caplog.records
    assert "ext-connector.submariner.io/gateway=true" in record.getMessage()
    assert "make itself a gateway" in record.getMessage()
