"""The CRD on the real API server: every case the operator refuses is refused at apply,
with the message the cel-python tier expects (tests/unit/test_crd.py ``REFUSED``), and
what the operator accepts is accepted (issue 10, part 4: "verified on the real API server").

Objects are sent with ``dryRun=All``: the server runs defaulting, pruning, schema and CEL
validation and stores nothing, so every case sees the same empty namespace.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from k8s_ext_connector_testbed.controlplane import ControlPlane
from tests.unit.samples import SEED_MANIFEST
from tests.unit.test_crd import CRD_PATH, REFUSED, _with

pytestmark = [pytest.mark.kube]
PATH = "/apis/submariner.io/v1alpha1/namespaces/default/externalservices?dryRun=All"


@pytest.fixture(scope="module")
def server(control_plane: ControlPlane) -> ControlPlane:
    control_plane.kubectl("apply", "-f", str(CRD_PATH))
    control_plane.kubectl(
        "wait", "--for=condition=Established", "crd/externalservices.submariner.io", "--timeout=60s"
    )
    return control_plane


def _create(server: ControlPlane, obj: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    return server.api("POST", PATH, obj)


@pytest.mark.parametrize(("path", "value", "message", "reason"), REFUSED)
def test_the_server_refuses_what_the_operator_refuses(
    server: ControlPlane, path: tuple[Any, ...], value: Any, message: str, reason: str
) -> None:
    status, body = _create(server, _with(path, value))
    assert status == 422, body
    causes = [c.get("message", "") for c in body.get("details", {}).get("causes", [])]
    text = body.get("message", "") + " " + " ".join(causes)
    # The server prefixes the field path: ".spec.targetIP: targetIP ..." in cel-python's
    # form is "spec.targetIP: Invalid value: ...: targetIP ..." there.
    words = message.split(": ", 1)[-1]
    assert words in text, text


@pytest.mark.parametrize(
    "address", ["192.168.122.10", "1.2.3.4", "10.0.0.0", "172.16.0.1", "203.0.113.200"]
)
def test_the_server_accepts_what_the_operator_accepts(server: ControlPlane, address: str) -> None:
    status, body = _create(server, _with(("spec", "targetIP"), address))
    assert status == 201, body


def test_the_seed_applies_unchanged_and_target_port_is_not_defaulted(server: ControlPlane) -> None:
    """targetPort's description says the server leaves it empty (the operator uses port)."""
    seed = yaml.safe_load(SEED_MANIFEST)
    without_target_port = copy.deepcopy(seed)
    del without_target_port["spec"]["ports"][0]["targetPort"]
    status, body = _create(server, without_target_port)
    assert status == 201, body
    assert "targetPort" not in body["spec"]["ports"][0]
    assert body["spec"]["ports"][0]["protocol"] == "TCP"
