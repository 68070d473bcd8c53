"""The Helm chart: lint, every switch renders manifests that pass strict validation against
the Kubernetes version the chart declares, RBAC equal to what the code calls, a values
schema that rejects typos, and the security properties each component is promised."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import celpy
import kubernetes_validate
import pytest
import yaml
from celpy import celtypes
from celpy.adapter import json_to_cel

from k8s_ext_connector.cli import build_parser
from k8s_ext_connector.operator import main as operator_main
from k8s_ext_connector.operator import rbac
from k8s_ext_connector.operator.desired import (
    GATEWAY_CONFIGMAP,
    KeyBook,
    OperatorSettings,
    Snapshot,
    compute,
    host_key_secret_name,
    managed_labels,
)
from k8s_ext_connector.operator.leader import LEASE_NAME
from k8s_ext_connector.operator.snapshot import externalservice_record
from tests.chart.helm import CHART, RELEASE_NAMESPACE, helm, minimum_kube_version, render
from tests.unit.samples import SEED_MANIFEST

CONNECTOR_NAMESPACE = "external-services"

# Every switch in values.yaml flipped, alone (names are test ids).
SWITCHES: dict[str, dict[str, str]] = {
    "defaults": {},
    "cert-manager": {"certManager.enabled": "true"},
    "service-monitor": {
        "metrics.serviceMonitor.enabled": "true",
        "metrics.serviceMonitor.labels.release": "prometheus",
    },
    "no-pod-annotations": {"metrics.podAnnotations": "false"},
    "no-network-policy": {"webhook.networkPolicy.enabled": "false"},
    "network-policy-from": {
        "webhook.networkPolicy.from": '[{"ipBlock": {"cidr": "198.51.100.0/24"}}]'
    },
    "no-pdbs": {
        "operator.podDisruptionBudget.enabled": "false",
        "webhook.podDisruptionBudget.enabled": "false",
    },
    "single-operator": {"operator.replicas": "1", "operator.leaderElection": "false"},
    "own-namespace-sources": {"operator.ownNamespaceSources": "true"},
    "ssh-allow-from": {"gateway.sshAllowFrom": '["10.244.0.0/16", "fd00:10:244::/56"]'},
    "single-webhook": {"webhook.replicas": "1"},
    "existing-connector-namespace": {
        "connectorNamespace.create": "false",
        "connectorNamespace.name": "egress",
    },
    "no-native-sidecar": {"sidecar.nativeSidecar": "false"},
    "manage-addresses": {"gateway.manageAddresses.interface": "eth1"},
    "fail-closed-webhook": {"webhook.failurePolicy": "Fail"},
    "pull-secrets-priority": {
        "imagePullSecrets": '[{"name": "registry"}]',
        "gateway.priorityClassName": "system-node-critical",
    },
    "scheduling": {
        "operator.nodeSelector.pool": "system",
        "webhook.tolerations": '[{"key": "dedicated", "operator": "Exists"}]',
        "webhook.affinity": '{"nodeAffinity": {}}',
    },
    "custom-labels": {
        "gatewayNodeLabel": "example.com/egress=yes",
        "webhook.namespaceLabel": "example.com/inject=on",
    },
}
CUSTOM_KINDS = {("cert-manager.io/v1", "Issuer"), ("cert-manager.io/v1", "Certificate"),
                ("monitoring.coreos.com/v1", "ServiceMonitor")}  # fmt: skip


@pytest.fixture(scope="module")
def default_render() -> list[dict[str, Any]]:
    return render()


def by_kind(documents: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in documents if d["kind"] == kind]


def one(documents: list[dict[str, Any]], kind: str, component: str) -> dict[str, Any]:
    found = [d for d in by_kind(documents, kind) if component_of(d) == component]
    assert len(found) == 1, (kind, component, len(found))
    return found[0]


def component_of(document: dict[str, Any]) -> str:
    return str(document["metadata"].get("labels", {}).get("app.kubernetes.io/component", ""))


def pod_specs(documents: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for d in documents:
        if d["kind"] in ("Deployment", "DaemonSet"):
            yield component_of(d), d["spec"]["template"]["spec"]


def test_helm_lint_strict() -> None:
    result = helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("values", SWITCHES.values(), ids=SWITCHES.keys())
def test_every_render_passes_strict_validation(values: dict[str, str]) -> None:
    """Built-in kinds rendered for and validated against the lowest Kubernetes the chart
    admits and 1.32 (objects can depend on the version, e.g. the write guard; strict: an
    unknown field fails); cert-manager and Prometheus Operator kinds have no schema in
    kubernetes-validate, so they are checked for their identifying fields only."""
    for version in (minimum_kube_version(), "1.32.0"):
        documents = render(values, kube_version=version)
        assert documents
        for document in documents:
            if (document["apiVersion"], document["kind"]) in CUSTOM_KINDS:
                assert document["metadata"]["name"], document
                assert document["spec"], document
                continue
            kubernetes_validate.validate(document, version, strict=True)


def test_chart_refuses_clusters_older_than_it_declares() -> None:
    result = helm("template", "x", str(CHART), "--kube-version", "1.28.0", check=False)
    assert result.returncode != 0
    assert "kubeVersion" in result.stderr


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"operater.replicas": "3"}, "operater"),
        ({"webhook.replica": "3"}, "replica"),
        ({"gateway.sshport": "22"}, "sshport"),
        ({"webhook.failurePolicy": "Maybe"}, "failurePolicy"),
        ({"gateway.sshPort": "70000"}, "sshPort"),
        ({"gatewayNodeLabel": "no-value"}, "gatewayNodeLabel"),
        ({"operator.logLevel": "verbose"}, "logLevel"),
        ({"image.pullPolicy": "Sometimes"}, "pullPolicy"),
    ],
)
def test_values_schema_rejects_typos_and_bad_values(values: dict[str, str], named: str) -> None:
    args = ["template", "x", str(CHART)]
    for key, value in values.items():
        args += ["--set", f"{key}={value}"]
    result = helm(*args, check=False)
    assert result.returncode != 0, values
    assert named in result.stderr, result.stderr


def test_two_operators_without_leader_election_are_refused() -> None:
    result = helm(
        "template", "x", str(CHART), "--set", "operator.leaderElection=false", check=False
    )
    assert result.returncode != 0
    assert "leaderElection" in result.stderr


def test_every_values_key_has_a_comment() -> None:
    """Kubernetes' own keys under ``resources`` are explained by their parent's comment."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    previous, missing = "", list[str]()
    parents: list[tuple[int, str]] = []
    for number, line in enumerate(lines, 1):
        match = re.match(r"^( *)([A-Za-z][A-Za-z0-9]*):", line)
        if match:
            depth = len(match.group(1))
            parents = [p for p in parents if p[0] < depth] + [(depth, match.group(2))]
            under_resources = any(name == "resources" for _, name in parents[:-1])
            if not previous.lstrip().startswith("#") and not under_resources:
                missing.append(f"{number}: {line.strip()}")
        if line.strip():
            previous = line
    assert missing == []


def test_the_crd_is_the_one_in_crds(default_render: list[dict[str, Any]]) -> None:
    (crd,) = by_kind(default_render, "CustomResourceDefinition")
    path = CHART / "crds" / "externalservices.submariner.io.yaml"
    assert crd == yaml.safe_load(path.read_text())


# RBAC: the chart's Roles are what operator/rbac.py says each component calls.


def _rules(document: dict[str, Any]) -> set[tuple[str, str, str, tuple[str, ...]]]:
    return {
        (group, resource, verb, tuple(rule.get("resourceNames", ())))
        for rule in document["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def _expected(rules: tuple[rbac.Rule, ...]) -> set[tuple[str, str, str, tuple[str, ...]]]:
    """The code's rules, names resolved as the chart names them with default values."""
    return {
        (r.group, r.resource, verb, tuple(rbac.OBJECT_NAMES[n] for n in r.names))
        for r in rules
        for verb in r.verbs
    }


@pytest.mark.parametrize("component", sorted(rbac.COMPONENTS))
def test_rendered_rbac_equals_the_code(
    default_render: list[dict[str, Any]], component: str
) -> None:
    spec = rbac.COMPONENTS[component]
    namespace = RELEASE_NAMESPACE if spec.role_namespace == "release" else CONNECTOR_NAMESPACE
    suffix = rbac.CONNECTOR_ROLE_SUFFIX
    for kind, expected, in_namespace, connector in (
        ("ClusterRole", spec.cluster_rules, None, False),
        ("Role", spec.namespace_rules, namespace, False),
        ("Role", spec.connector_rules, CONNECTOR_NAMESPACE, True),
    ):
        found = [
            d
            for d in by_kind(default_render, kind)
            if component_of(d) == component
            and d["metadata"]["name"].endswith(suffix) == connector
        ]
        if not expected:
            assert found == []
            continue
        (role,) = found
        assert _rules(role) == _expected(expected)
        assert role["metadata"].get("namespace") == in_namespace
        (binding,) = [
            d
            for d in by_kind(default_render, f"{kind}Binding")
            if component_of(d) == component and d["metadata"]["name"] == role["metadata"]["name"]
        ]
        assert binding["metadata"].get("namespace") == in_namespace
        assert binding["roleRef"]["name"] == role["metadata"]["name"]
        (subject,) = binding["subjects"]
        account = one(default_render, "ServiceAccount", component)
        assert (subject["name"], subject["namespace"]) == (
            account["metadata"]["name"],
            account["metadata"]["namespace"],
        )


def test_no_other_rbac_in_the_chart(default_render: list[dict[str, Any]]) -> None:
    roles = by_kind(default_render, "ClusterRole") + by_kind(default_render, "Role")
    assert sorted(component_of(r) for r in roles) == sorted(
        [c for c, s in rbac.COMPONENTS.items() if s.cluster_rules]
        + [c for c, s in rbac.COMPONENTS.items() if s.namespace_rules]
        + [c for c, s in rbac.COMPONENTS.items() if s.connector_rules]
    )


def test_each_workload_runs_as_its_own_service_account(
    default_render: list[dict[str, Any]],
) -> None:
    accounts = {component_of(a): a["metadata"] for a in by_kind(default_render, "ServiceAccount")}
    workloads = by_kind(default_render, "Deployment") + by_kind(default_render, "DaemonSet")
    assert sorted(component_of(w) for w in workloads) == sorted(rbac.COMPONENTS)
    for workload in workloads:
        account = accounts[component_of(workload)]
        assert workload["spec"]["template"]["spec"]["serviceAccountName"] == account["name"]
        assert workload["metadata"]["namespace"] == account["namespace"]


def test_cert_manager_replaces_the_certs_component() -> None:
    documents = render({"certManager.enabled": "true"})
    for kind in ("Deployment", "ServiceAccount", "ClusterRole", "Role"):
        assert not [d for d in by_kind(documents, kind) if component_of(d) == "certs"], kind
    webhook = one(documents, "MutatingWebhookConfiguration", "webhook")
    (certificate,) = [d for d in by_kind(documents, "Certificate") if not d["spec"].get("isCA")]
    assert webhook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == (
        f"{RELEASE_NAMESPACE}/{certificate['metadata']['name']}"
    )
    tls = next(
        v["secret"]["secretName"]
        for _, spec in pod_specs(documents)
        for v in spec.get("volumes", [])
        if v["name"] == "tls"
    )
    assert certificate["spec"]["secretName"] == tls


# What each component is promised in docs/security.md.


def test_only_the_gateway_runs_as_root_and_only_with_its_capabilities(
    default_render: list[dict[str, Any]],
) -> None:
    for component, spec in pod_specs(default_render):
        for container in spec["containers"] + spec.get("initContainers", []):
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, component
            assert security["readOnlyRootFilesystem"] is True, component
            assert security["capabilities"]["drop"] == ["ALL"], component
            assert not security.get("privileged"), component
            if component == "gateway":
                assert security["runAsUser"] == 0
                assert security["capabilities"]["add"] == [
                    "NET_ADMIN",
                    "NET_RAW",
                    "NET_BIND_SERVICE",
                ]
            else:
                assert "add" not in security["capabilities"], component
                assert spec["securityContext"]["runAsNonRoot"] is True, component
        assert spec.get("hostNetwork", False) is (component == "gateway"), component


def test_webhook_mounts_only_the_serving_pair(default_render: list[dict[str, Any]]) -> None:
    (spec,) = [s for c, s in pod_specs(default_render) if c == "webhook"]
    (tls,) = [v for v in spec["volumes"] if v["name"] == "tls"]
    assert [item["key"] for item in tls["secret"]["items"]] == ["tls.crt", "tls.key"]


def test_gateway_reads_its_own_node_config_and_key(default_render: list[dict[str, Any]]) -> None:
    daemonset = one(default_render, "DaemonSet", "gateway")
    assert daemonset["metadata"]["namespace"] == CONNECTOR_NAMESPACE
    spec = daemonset["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"node-restriction.kubernetes.io/ext-connector-gateway": "true"}
    (container,) = spec["containers"]
    args = container["args"]
    assert f"--host-key-secret={host_key_secret_name('$(NODE_NAME)')}" in args
    assert f"--namespace={CONNECTOR_NAMESPACE}" in args
    assert "--config=/etc/k8s-ext-connector/gateway/$(NODE_NAME).yaml" in args
    (config,) = [v for v in spec["volumes"] if v["name"] == "config"]
    assert config["configMap"] == {"name": GATEWAY_CONFIGMAP, "optional": True}
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in (
        container["env"]
    )


def test_operator_and_gateway_agree_on_label_port_and_namespace() -> None:
    documents = render(
        {
            "gatewayNodeLabel": "example.com/egress=yes",
            "gateway.sshPort": "2200",
            "connectorNamespace.name": "egress",
        }
    )
    (operator,) = [s for c, s in pod_specs(documents) if c == "operator"]
    args = operator["containers"][0]["args"]
    assert "--gateway-label=example.com/egress=yes" in args
    assert "--ssh-port=2200" in args
    assert "--connector-namespace=egress" in args
    daemonset = one(documents, "DaemonSet", "gateway")
    assert daemonset["metadata"]["namespace"] == "egress"
    assert daemonset["spec"]["template"]["spec"]["nodeSelector"] == {"example.com/egress": "yes"}
    ports = daemonset["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert {"name": "ssh", "containerPort": 2200, "protocol": "TCP"} in ports


def test_the_chart_keeps_no_secret_in_the_connector_namespace() -> None:
    """The gateways may GET Secrets there (their host keys): nothing else secret goes there."""
    for values in SWITCHES.values():
        documents = render(values)
        namespace = next(
            (d["metadata"]["name"] for d in by_kind(documents, "Namespace")),
            values.get("connectorNamespace.name", CONNECTOR_NAMESPACE),
        )
        assert not [
            d
            for d in documents
            if d["kind"] in ("Secret", "Certificate")
            and d["metadata"].get("namespace") == namespace
        ]


def test_image_references_are_overridable() -> None:
    documents = render(
        {
            "image.repository": "registry.example/extconn",
            "image.tag": "dev",
            "image.pullPolicy": "Never",
        }
    )
    for _, spec in pod_specs(documents):
        for container in spec["containers"]:
            assert container["image"] == "registry.example/extconn:dev"
            assert container["imagePullPolicy"] == "Never"
    (webhook,) = [s for c, s in pod_specs(documents) if c == "webhook"]
    args = webhook["containers"][0]["args"]
    assert "--image=registry.example/extconn:dev" in args
    assert "--image-pull-policy=Never" in args
    sidecar = render({"sidecar.image.repository": "other/sidecar", "sidecar.image.tag": "1"})
    (webhook,) = [s for c, s in pod_specs(sidecar) if c == "webhook"]
    assert "--image=other/sidecar:1" in webhook["containers"][0]["args"]


def test_default_image_tag_is_the_app_version(default_render: list[dict[str, Any]]) -> None:
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    images = {c["image"] for _, s in pod_specs(default_render) for c in s["containers"]}
    assert images == {f"ghcr.io/k8s-ext-connector/k8s-ext-connector:{app_version}"}


def test_standard_labels_everywhere(default_render: list[dict[str, Any]]) -> None:
    for document in default_render:
        if document["kind"] == "CustomResourceDefinition":
            continue
        labels = document["metadata"]["labels"]
        for key in ("name", "instance", "component", "version", "managed-by", "part-of"):
            assert f"app.kubernetes.io/{key}" in labels, (document["kind"], key)


def test_webhook_configuration_follows_values() -> None:
    documents = render(
        {"webhook.failurePolicy": "Fail", "webhook.namespaceLabel": "example.com/inject=on"}
    )
    (hook,) = one(documents, "MutatingWebhookConfiguration", "webhook")["webhooks"]
    assert hook["failurePolicy"] == "Fail"
    assert hook["namespaceSelector"] == {"matchLabels": {"example.com/inject": "on"}}
    service = one(documents, "Service", "webhook")["metadata"]
    assert hook["clientConfig"]["service"]["name"] == service["name"]
    assert hook["clientConfig"]["service"]["namespace"] == service["namespace"]
    assert "caBundle" not in hook["clientConfig"]  # certs sync / cainjector own it


def test_switches_add_exactly_their_objects() -> None:
    default_kinds = {d["kind"] for d in render()}
    assert {"NetworkPolicy", "PodDisruptionBudget", "Namespace"} <= default_kinds
    assert "ServiceMonitor" not in default_kinds
    assert "ServiceMonitor" in {d["kind"] for d in render(SWITCHES["service-monitor"])}
    assert "NetworkPolicy" not in {d["kind"] for d in render(SWITCHES["no-network-policy"])}
    assert "PodDisruptionBudget" not in {d["kind"] for d in render(SWITCHES["no-pdbs"])}
    single = render(SWITCHES["single-operator"])
    (operator,) = [s for c, s in pod_specs(single) if c == "operator"]
    assert "--no-leader-election" in operator["containers"][0]["args"]
    assert "Namespace" not in {
        d["kind"] for d in render(SWITCHES["existing-connector-namespace"])
    } - {"CustomResourceDefinition"}
    (gateway,) = [s for c, s in pod_specs(render(SWITCHES["manage-addresses"])) if c == "gateway"]
    assert "--manage-addresses=eth1" in gateway["containers"][0]["args"]
    (strict,) = [
        s for c, s in pod_specs(render(SWITCHES["own-namespace-sources"])) if c == "operator"
    ]
    assert "--own-namespace-sources" in strict["containers"][0]["args"]
    (allow,) = [s for c, s in pod_specs(render(SWITCHES["ssh-allow-from"])) if c == "operator"]
    assert [a for a in allow["containers"][0]["args"] if a.startswith("--ssh-allow-from")] == [
        "--ssh-allow-from=10.244.0.0/16", "--ssh-allow-from=fd00:10:244::/56"]
    (webhook,) = [s for c, s in pod_specs(render(SWITCHES["no-native-sidecar"])) if c == "webhook"]
    assert "--no-native-sidecar" in webhook["containers"][0]["args"]


@pytest.mark.parametrize("values", SWITCHES.values(), ids=SWITCHES.keys())
def test_every_container_command_is_one_the_cli_accepts(values: dict[str, str]) -> None:
    """Each rendered args list parses with the real command line (a misspelt flag or a bad
    choice fails here, not in a cluster); $(VAR) references become sample values."""
    parser = build_parser()
    for component, spec in pod_specs(render(values)):
        for container in spec["containers"]:
            args = [re.sub(r"\$\((\w+)\)", "node-1", a) for a in container["args"]]
            try:
                parsed = parser.parse_args(args)
            except SystemExit:
                pytest.fail(f"{component}: the CLI refuses {args}")
            assert args[0] == component or (component, args[0]) == ("certs", "certs")
            if component == "operator":
                operator_main.command_from(parsed)  # its own checks (label, ports)


def test_name_restricted_rules_name_what_the_components_use() -> None:
    """resourceNames must be the very objects the rendered commands touch."""
    documents = render({"fullnameOverride": "conn"})
    (certs,) = [s for c, s in pod_specs(documents) if c == "certs"]
    args = dict(a.split("=", 1) for a in certs["containers"][0]["args"] if "=" in a)
    named = {
        name
        for d in documents
        if d["kind"] in ("Role", "ClusterRole") and component_of(d) == "certs"
        for rule in d["rules"]
        for name in rule.get("resourceNames", [])
    }
    assert {args["--secret"], args["--ca-secret"], args["--webhook-config"]} <= named
    assert one(documents, "MutatingWebhookConfiguration", "webhook")["metadata"]["name"] in named
    assert rbac.OBJECT_NAMES["operator-lease"] == LEASE_NAME


OPERATOR_USER = f"system:serviceaccount:{RELEASE_NAMESPACE}:k8s-ext-connector-operator"
OURS = {"app.kubernetes.io/managed-by": "k8s-ext-connector"}


def _guard_verdict(request: dict[str, Any]) -> bool | None:
    """The write guard's decision on one admission request, evaluated with cel-python from
    the rendered policy: None when it does not apply, else whether it admits."""
    policy = next(d for d in render() if d["kind"] == "ValidatingAdmissionPolicy")
    cel = celpy.Environment()

    def holds(expression: str) -> bool:
        variables = {
            "request": json_to_cel(request),
            "object": json_to_cel(request.get("object")),
            "oldObject": json_to_cel(request.get("oldObject")),
        }
        result = cel.program(cel.compile(expression)).evaluate(variables)
        return isinstance(result, celtypes.BoolType) and bool(result)

    if not all(holds(c["expression"]) for c in policy["spec"]["matchConditions"]):
        return None
    return all(holds(v["expression"]) for v in policy["spec"]["validations"])


def _request(
    operation: str,
    new: dict[str, str] | None,
    old: dict[str, str] | None,
    user: str = "",
    resource: str = "configmaps",
) -> dict[str, Any]:
    def obj(labels: dict[str, str] | None) -> dict[str, Any] | None:
        if labels is None:
            return None
        return {"metadata": {"name": "x", "labels": labels}} if labels else {"metadata": {}}

    return {
        "operation": operation,
        "userInfo": {"username": user or OPERATOR_USER},
        "resource": {"group": "", "version": "v1", "resource": resource},
        "object": obj(new),
        "oldObject": obj(old),
    }


@pytest.mark.parametrize(
    ("request_", "admitted"),
    [
        (_request("CREATE", OURS, None), True),
        (_request("CREATE", {}, None), False),
        (_request("UPDATE", OURS, OURS), True),
        (_request("UPDATE", OURS, {}), False),  # taking over someone's object
        (_request("UPDATE", {"team": "a"}, {"team": "a"}), False),
        (_request("UPDATE", {}, OURS), False),  # dropping the label
        (_request("DELETE", None, OURS), True),
        (_request("DELETE", None, {}), False),
        (_request("DELETE", None, {}, user="system:serviceaccount:team:deployer"), None),
    ],
    ids=[
        "create-ours", "create-unlabelled", "update-ours", "take-over", "update-foreign",
        "drop-label", "delete-ours", "delete-foreign", "other-user-not-concerned",
    ],
)  # fmt: skip
def test_write_guard_admits_only_the_operators_own_objects(
    request_: dict[str, Any], admitted: bool | None
) -> None:
    assert _guard_verdict(request_) == admitted


def test_every_object_the_operator_writes_passes_the_write_guard() -> None:
    """What compute() plans for the seed (Services, ConfigMaps) and the key Secrets the
    reconciler writes all carry the label the guard asks for."""
    spec = yaml.safe_load(SEED_MANIFEST)
    body = {**spec, "metadata": {"name": "my-externalservice", "namespace": "default"}}
    snapshot = Snapshot([externalservice_record(body)], {}, [], [])
    desired = compute(snapshot, KeyBook(), OperatorSettings())
    written = [(obj, "services") for obj in desired.services.values()]
    written += [(obj, "configmaps") for obj in desired.configmaps.values()]
    assert {resource for _, resource in written} == {"services", "configmaps"}
    for obj, resource in written:
        for operation, old in (("CREATE", None), ("UPDATE", obj)):
            request = {"operation": operation, "userInfo": {"username": OPERATOR_USER},
                       "resource": {"resource": resource}, "object": obj, "oldObject": old}
            assert _guard_verdict(request) is True, obj["metadata"]
    secret = {"metadata": {"labels": managed_labels()}, "type": "kubernetes.io/ssh-auth"}
    assert _guard_verdict({"operation": "CREATE", "userInfo": {"username": OPERATOR_USER},
                           "resource": {"resource": "secrets"}, "object": secret,
                           "oldObject": None}) is True


def test_write_guard_needs_kubernetes_1_30() -> None:
    assert "ValidatingAdmissionPolicy" not in {d["kind"] for d in render(kube_version="1.29.0")}
    assert "ValidatingAdmissionPolicy" not in {
        d["kind"] for d in render({"operator.writeGuard.enabled": "false"})
    }


def _webhook_policy(values: dict[str, str] | None = None) -> dict[str, Any]:
    (policy,) = [d for d in render(values or {}) if d["kind"] == "NetworkPolicy"]
    return policy


def test_the_webhook_network_policy_admits_only_the_api_servers_sources() -> None:
    """Before: with the defaults every pod of the cluster reached port 8443."""
    (rule,) = _webhook_policy()["spec"]["ingress"]
    assert rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}}
    ]
    (rule,) = _webhook_policy(
        {"webhook.networkPolicy.apiServerCIDRs": '["203.0.113.0/28"]',
         "webhook.networkPolicy.from": "[]"}
    )["spec"]["ingress"]
    assert rule["from"] == [{"ipBlock": {"cidr": "203.0.113.0/28"}}]
    nobody = _webhook_policy({"webhook.networkPolicy.from": "[]"})["spec"]
    assert nobody["ingress"] == []
    assert nobody["policyTypes"] == ["Ingress"]
    (anyone,) = _webhook_policy({"webhook.networkPolicy.allowFromAnywhere": "true"})["spec"][
        "ingress"]
    assert "from" not in anyone


def test_the_webhook_has_cpu_and_memory_limits() -> None:
    (spec,) = [s for c, s in pod_specs(render()) if c == "webhook"]
    limits = spec["containers"][0]["resources"]["limits"]
    assert set(limits) == {"cpu", "memory"}


def _service(spec: dict[str, Any]) -> dict[str, Any]:
    return {"operation": "CREATE", "userInfo": {"username": OPERATOR_USER},
            "resource": {"resource": "services"},
            "object": {"metadata": {"name": "x", "labels": OURS}, "spec": spec},
            "oldObject": None}


def _secret(kind: str | None) -> dict[str, Any]:
    obj: dict[str, Any] = {"metadata": {"name": "x", "labels": OURS}}
    if kind is not None:
        obj["type"] = kind
    return {"operation": "CREATE", "userInfo": {"username": OPERATOR_USER},
            "resource": {"resource": "secrets"}, "object": obj, "oldObject": None}


@pytest.mark.parametrize(
    ("request_", "admitted"),
    [
        (_service({"type": "ClusterIP", "ports": [{"port": 80}]}), True),
        (_service({"ports": [{"port": 80}]}), True),
        (_service({"type": "LoadBalancer"}), False),
        (_service({"type": "NodePort"}), False),
        (_service({"type": "ClusterIP", "externalIPs": ["198.51.100.7"]}), False),
        (_secret("kubernetes.io/ssh-auth"), True),
        (_secret("kubernetes.io/service-account-token"), False),
        (_secret(None), False),
    ],
    ids=["clusterip", "default-type", "loadbalancer", "nodeport", "external-ips",
         "ssh-auth", "sa-token", "opaque-default"],
)  # fmt: skip
def test_write_guard_restricts_the_content_of_labelled_objects(
    request_: dict[str, Any], admitted: bool
) -> None:
    """Before: a labelled Service of any type with externalIPs, or a service-account-token
    Secret, passed the guard."""
    assert _guard_verdict(request_) == admitted
