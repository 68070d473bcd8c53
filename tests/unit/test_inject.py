"""Golden files for ``webhook.inject``: a set of input pods and their expected output.

Cases live in ``tests/golden/inject/<case>.in.yaml`` (``sources``: the source services
selecting the pod, optional ``settings`` for ``InjectionSettings``, and ``pod``) with the
expected pod in ``<case>.out.yaml``. Add an input file to add a case; regenerate with
``REGEN_GOLDEN=1`` (see tests/golden_files.py). Each injected pod must validate strictly
against the Kubernetes schema, and injecting it again must change nothing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest
import yaml

from k8s_ext_connector.core.api import ServiceRef
from k8s_ext_connector.webhook.inject import (
    MALFORMED,
    SOURCE_ANNOTATION,
    InjectionContext,
    InjectionSettings,
    admission_patch,
    inject,
    skip_reason,
    sources_selecting,
)
from k8s_ext_connector.webhook.manifests import inject_text
from tests.golden_files import GoldenDir

GOLDEN = GoldenDir(Path(__file__).resolve().parents[1] / "golden" / "inject", ".in.yaml",
                   ".out.yaml", minimum_cases=8)
CASES = GOLDEN.cases()
KUBERNETES = "1.32.0"  # native sidecars (init restartPolicy: Always) are on by default


def _load(case: Path) -> tuple[dict[str, Any], InjectionContext]:
    data = yaml.safe_load(case.read_text())
    namespace = data["pod"]["metadata"]["namespace"]
    context = InjectionContext(
        tuple(ServiceRef(namespace, s) for s in data["sources"]),
        InjectionSettings(**data.get("settings", {})),
    )
    return data["pod"], context


@pytest.mark.parametrize("case", CASES, ids=[GOLDEN.stem(c) for c in CASES])
def test_golden(case: Path) -> None:
    pod, context = _load(case)
    GOLDEN.check(case, yaml.safe_dump(inject(pod, context), sort_keys=False))


def test_no_stale_goldens() -> None:
    GOLDEN.check_no_stale()


@pytest.mark.parametrize("case", CASES, ids=[GOLDEN.stem(c) for c in CASES])
def test_injected_pod_is_valid_and_reinjection_is_a_no_op(case: Path) -> None:
    pod, context = _load(case)
    injected = inject(pod, context)
    kubernetes_validate.validate(injected, KUBERNETES, strict=True)
    assert inject(injected, context) == injected
    assert admission_patch(injected, context) == []
    assert pod == _load(case)[0], "inject must not modify its input"


@pytest.mark.parametrize("case", CASES, ids=[GOLDEN.stem(c) for c in CASES])
def test_patch_is_the_diff(case: Path) -> None:
    pod, context = _load(case)
    patched = jsonpatch.apply_patch(pod, admission_patch(pod, context))
    assert patched == inject(pod, context)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("host-network", "hostNetwork pod: it shares the node's network namespace"),
        ("opt-out", "annotation ext-connector.submariner.io/inject=false"),
        ("not-selected", "no source service selects it"),
        ("opt-in-unnamed", "ext-connector.submariner.io/inject=true but no source service "
                           "selects it: name one with ext-connector.submariner.io/source-service"),
        ("plain", None),
    ],
)
def test_skip_reasons(case: str, reason: str | None) -> None:
    pod, context = _load(GOLDEN.path / f"{case}.in.yaml")
    assert skip_reason(pod, context) == reason


def test_sidecar_gets_only_net_admin_and_net_raw() -> None:
    pod, context = _load(GOLDEN.path / "plain.in.yaml")
    sidecar = inject(pod, context)["spec"]["initContainers"][0]
    security = sidecar["securityContext"]
    assert security["capabilities"] == {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
    assert security["privileged"] is False
    assert security["allowPrivilegeEscalation"] is False
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/ready"


def test_sources_selecting() -> None:
    services = [(ServiceRef("ns1", "a"), {"app": "x"}), (ServiceRef("ns1", "b"), {"app": "y"}),
                (ServiceRef("ns2", "c"), {"app": "x"}), (ServiceRef("ns1", "d"), {})]
    assert sources_selecting({"app": "x", "tier": "web"}, "ns1", services) == (
        ServiceRef("ns1", "a"),)


WORKLOADS = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: ns1}
spec:
  selector: {matchLabels: {app: my-service1}}
  template:
    metadata: {labels: {app: my-service1}}
    spec: {containers: [{name: app, image: app}]}
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: nightly, namespace: ns1}
spec:
  schedule: "0 1 * * *"
  jobTemplate:
    spec:
      template:
        metadata: {labels: {app: my-service1}}
        spec: {restartPolicy: Never, containers: [{name: job, image: job}]}
---
apiVersion: v1
kind: List
items:
- apiVersion: apps/v1
  kind: StatefulSet
  metadata: {name: db, namespace: ns1}
  spec:
    serviceName: db
    selector: {matchLabels: {app: my-service1}}
    template:
      metadata: {labels: {app: my-service1}}
      spec: {containers: [{name: db, image: db}]}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: untouched, namespace: ns1}
data: {a: b}
"""


def test_inject_manifests_handles_workloads_lists_and_passes_others_through() -> None:
    out = list(yaml.safe_load_all(inject_text(WORKLOADS, ["my-service1"], InjectionSettings())))
    deployment, cronjob, listing, configmap = out
    templates = [deployment["spec"]["template"],
                 cronjob["spec"]["jobTemplate"]["spec"]["template"],
                 listing["items"][0]["spec"]["template"]]
    for template in templates:
        assert template["spec"]["initContainers"][0]["name"] == "ext-connector"
        assert "namespace" not in template["metadata"]
    assert configmap == {"apiVersion": "v1", "kind": "ConfigMap",
                         "metadata": {"name": "untouched", "namespace": "ns1"},
                         "data": {"a": "b"}}
    for document in (deployment, cronjob, listing["items"][0]):
        kubernetes_validate.validate(document, KUBERNETES, strict=True)
    again = inject_text(yaml.safe_dump_all(out), ["my-service1"], InjectionSettings())
    assert list(yaml.safe_load_all(again)) == out


def _plain(**spec: Any) -> dict[str, Any]:
    pod, _ = _load(GOLDEN.path / "plain.in.yaml")
    if spec:
        pod = {**pod, "spec": {**pod["spec"], **spec}}
    return pod


MALFORMED_PODS = {
    "no spec": ({"spec": None}, "spec: None"),
    "containers null": ({"containers": None}, "spec.containers: None"),
    "volume named like ours": (
        {"volumes": [{"name": "ext-connector-config", "emptyDir": {}}]},
        "spec.volumes[0].name: ext-connector-config",
    ),
    "a container named ext-connector that is not ours": (
        {"initContainers": [{"name": "ext-connector", "image": "someone-else"}]},
        "spec.initContainers[0].name: ext-connector",
    ),
    "source-service not a Service name": (
        {"annotations": {SOURCE_ANNOTATION: "../../ns1/my-service1"}},
        f"annotation {SOURCE_ANNOTATION}: '../../ns1/my-service1'",
    ),
    "too many containers": (
        {"containers": [{"name": f"c{i}", "image": "x"} for i in range(1001)]},
        "spec.containers: 1001 items",
    ),
}


@pytest.mark.parametrize(("change", "named"), MALFORMED_PODS.values(), ids=MALFORMED_PODS.keys())
def test_malformed_pods_are_skipped_naming_the_field(change: dict[str, Any], named: str) -> None:
    """Before: each got a patch (onto a missing list, a duplicate name, or a Secret name
    built from ``../..``), or, for a foreign ext-connector container, counted as injected."""
    pod, context = _load(GOLDEN.path / "plain.in.yaml")
    if "spec" in change:
        pod = {**pod, "spec": change["spec"]}
    elif "annotations" in change:
        pod = {**pod, "metadata": {**pod["metadata"], "annotations": change["annotations"]}}
    else:
        pod = {**pod, "spec": {**pod["spec"], **change}}
    reason = skip_reason(pod, context)
    assert reason is not None
    assert reason.startswith(f"{MALFORMED}: {named}")
    assert admission_patch(pod, context) == []
    assert inject(pod, context) == pod


def test_the_patch_does_not_grow_with_the_pod() -> None:
    """Before: the patch was a diff of the pod and a deep copy of it, 1.25 s for 100,000
    containers; now its ops are written directly (checked on a pod within the limits)."""
    _, context = _load(GOLDEN.path / "plain.in.yaml")
    big = _plain(
        containers=[{"name": f"c{i}", "image": "x", "env": [{"name": "E", "value": "v"}] * 200}
                    for i in range(1000)]
    )
    started = time.perf_counter()
    patch = admission_patch(big, context)
    elapsed = time.perf_counter() - started
    assert [op["path"] for op in patch] == [
        "/spec/initContainers", "/spec/volumes", "/metadata/annotations"]
    assert jsonpatch.apply_patch(big, patch) == inject(big, context)
    assert elapsed < 0.1, elapsed
