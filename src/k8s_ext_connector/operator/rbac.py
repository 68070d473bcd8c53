"""Each component's RBAC, derived from what its code calls (tested against recordings).

This module is the one list. The Helm chart renders its Roles from
``charts/k8s-ext-connector/files/rbac-rules.yaml`` (``k8s-ext-connector rbac rules``, kept
equal by a test), and ``k8s-ext-connector rbac COMPONENT`` prints whole manifests for a
hand install.

Every rule names the reason it exists. Notably absent: the operator reading Secrets. It
writes client and host keys into Secrets but never reads one back; the public halves are
on record in its ConfigMaps. The webhook only reads (watches) Services and ExternalServices.
The gateway reads one Secret, its node's host key, by name; RBAC cannot name Secrets that do
not exist at install time, so its Role covers ``get`` on the connector namespace's Secrets,
and nothing else secret is kept in that namespace (docs/security.md). Likewise it writes its
node's Lease (its report to the operator) with ``get``/``update`` on the connector
namespace's Leases, and the operator lists and watches them there (a second Role of its own
in the connector namespace, ``connector_rules``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import yaml


@dataclass(frozen=True)
class Rule:
    group: str
    resource: str
    verbs: tuple[str, ...]
    why: str
    # Symbolic names of the only objects the rule covers (keys of OBJECT_NAMES); empty:
    # any object. RBAC cannot restrict create or list/watch by name, so such verbs get a
    # rule of their own.
    names: tuple[str, ...] = ()


# The objects a name-restricted rule may touch, as a hand install names them. The chart
# maps the same keys to its release's names (templates/_helpers.tpl, extconn.rbac).
OBJECT_NAMES: dict[str, str] = {
    "operator-lease": "k8s-ext-connector-operator",  # operator/leader.py LEASE_NAME
    "webhook-configuration": "k8s-ext-connector",
    "webhook-tls-secret": "k8s-ext-connector-webhook-tls",
    "webhook-ca-secret": "k8s-ext-connector-webhook-ca",
}


CLUSTER_RULES: tuple[Rule, ...] = (
    Rule(
        "submariner.io",
        "externalservices",
        ("list", "watch", "patch"),
        "watch ExternalServices; kopf patches its finalizer and bookkeeping annotations",
    ),
    Rule("submariner.io", "externalservices/status", ("patch",), "write status"),
    Rule(
        "",
        "services",
        ("list", "watch", "create", "patch", "delete"),
        "read source Services; own the connector Services",
    ),
    Rule(
        "",
        "configmaps",
        ("list", "watch", "create", "patch", "delete"),
        "own sidecar and gateway configs (label-selected watch)",
    ),
    Rule(
        "",
        "secrets",
        ("create", "delete"),
        "issue SSH keys; never read back nor overwritten (a name taken is reported)",
    ),
    Rule("", "pods", ("list", "watch"), "count selected pods and ready sidecars"),
    Rule("", "nodes", ("list", "watch"), "find Ready gateway nodes"),
    Rule("", "events", ("create",), "explain conditions in kubectl describe"),
    Rule(
        "apiextensions.k8s.io",
        "customresourcedefinitions",
        ("list", "watch"),
        "kopf notices when the ExternalService CRD appears or changes",
    ),
)

NAMESPACE_RULES: tuple[Rule, ...] = (
    Rule("coordination.k8s.io", "leases", ("create",), "leader election: the first replica"),
    Rule(
        "coordination.k8s.io",
        "leases",
        ("get", "update"),
        "leader election between replicas: renew or take over the one Lease",
        ("operator-lease",),
    ),
)

WEBHOOK_CLUSTER_RULES: tuple[Rule, ...] = (
    Rule("", "services", ("list", "watch"), "which Services select a pod (watch cache)"),
    Rule(
        "submariner.io",
        "externalservices",
        ("list", "watch"),
        "which Services are sources (watch cache)",
    ),
)

CERTS_CLUSTER_RULES: tuple[Rule, ...] = (
    Rule(
        "admissionregistration.k8s.io",
        "mutatingwebhookconfigurations",
        ("get", "patch"),
        "keep the webhook's caBundle current (this release's configuration only)",
        ("webhook-configuration",),
    ),
)
CERTS_NAMESPACE_RULES: tuple[Rule, ...] = (
    Rule("", "secrets", ("create",), "issue the webhook CA and serving certificate"),
    Rule(
        "",
        "secrets",
        ("get", "update"),
        "renew the webhook CA and serving certificate (these two Secrets only)",
        ("webhook-tls-secret", "webhook-ca-secret"),
    ),
)

GATEWAY_NAMESPACE_RULES: tuple[Rule, ...] = (
    Rule(
        "",
        "secrets",
        ("get",),
        "read this node's SSH host key Secret by name (a DaemonSet cannot mount a per-node Secret)",
    ),
    Rule(
        "coordination.k8s.io",
        "leases",
        ("create",),
        "report to the operator: create this node's Lease the first time",
    ),
    Rule(
        "coordination.k8s.io",
        "leases",
        ("get", "update"),
        "report to the operator: renew this node's Lease with the source IPs it does not "
        "serve (a Role cannot name per-node Leases unknown at install time)",
    ),
)

# The operator's Role in the connector namespace (its main Role is in the release namespace).
OPERATOR_CONNECTOR_RULES: tuple[Rule, ...] = (
    Rule(
        "coordination.k8s.io",
        "leases",
        ("list", "watch"),
        "read the gateways' reports (their Leases) in the connector namespace",
    ),
)

RoleNamespace = Literal["release", "connector"]


@dataclass(frozen=True)
class Component:
    """One ServiceAccount's rules: cluster-wide, and in one namespace (``role_namespace``)."""

    cluster_rules: tuple[Rule, ...]
    namespace_rules: tuple[Rule, ...]
    role_namespace: RoleNamespace  # release: where the component runs; connector: its data
    # A second Role, in the connector namespace, for a component whose role_namespace is
    # "release" (named with CONNECTOR_ROLE_SUFFIX: the two namespaces may be one).
    connector_rules: tuple[Rule, ...] = ()


COMPONENTS: dict[str, Component] = {
    "operator": Component(
        CLUSTER_RULES, NAMESPACE_RULES, "release", OPERATOR_CONNECTOR_RULES
    ),  # its Lease; the gateways' Leases
    "webhook": Component(WEBHOOK_CLUSTER_RULES, (), "release"),
    "certs": Component(CERTS_CLUSTER_RULES, CERTS_NAMESPACE_RULES, "release"),
    "gateway": Component((), GATEWAY_NAMESPACE_RULES, "connector"),
}

NAME = "k8s-ext-connector-operator"
CONNECTOR_ROLE_SUFFIX = "-connector"


def _rules(rules: tuple[Rule, ...], names: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """As Kubernetes writes rules; symbolic names resolved through ``names`` if given."""
    rendered = []
    for r in rules:
        rule: dict[str, Any] = {"apiGroups": [r.group], "resources": [r.resource]}
        if r.names:
            rule["resourceNames"] = [names[n] if names else n for n in r.names]
        rendered.append({**rule, "verbs": list(r.verbs)})
    return rendered


def manifests(
    component: str = "operator",
    namespace: str = "k8s-ext-connector",
    connector_namespace: str = "external-services",
) -> list[dict[str, Any]]:
    """ServiceAccount-bound ClusterRole and/or Role of one component.

    ``namespace`` is where the component runs (its ServiceAccount); the Role lands there or
    in ``connector_namespace``, as the component's ``role_namespace`` says.
    """
    name = f"k8s-ext-connector-{component}"
    spec = COMPONENTS[component]
    cluster_rules, namespace_rules = spec.cluster_rules, spec.namespace_rules
    role_namespace = namespace if spec.role_namespace == "release" else connector_namespace
    sa_namespace = namespace if component != "gateway" else connector_namespace
    subject = [{"kind": "ServiceAccount", "name": name, "namespace": sa_namespace}]
    labels = {
        "app.kubernetes.io/name": "k8s-ext-connector",
        "app.kubernetes.io/component": component,
    }
    rbac = "rbac.authorization.k8s.io"
    documents: list[dict[str, Any]] = []
    for kind, rules, role_name, scope in (
        ("ClusterRole", cluster_rules, name, {}),
        ("Role", namespace_rules, name, {"namespace": role_namespace}),
        (
            "Role",
            spec.connector_rules,
            name + CONNECTOR_ROLE_SUFFIX,
            {"namespace": connector_namespace},
        ),
    ):
        if not rules:
            continue
        metadata = {"name": role_name, **scope, "labels": labels}
        documents.append(
            {
                "apiVersion": f"{rbac}/v1",
                "kind": kind,
                "metadata": metadata,
                "rules": _rules(rules, OBJECT_NAMES),
            }
        )
        documents.append(
            {
                "apiVersion": f"{rbac}/v1",
                "kind": f"{kind}Binding",
                "metadata": metadata,
                "roleRef": {"apiGroup": rbac, "kind": kind, "name": role_name},
                "subjects": subject,
            }
        )
    return documents


def render(component: str = "operator") -> str:
    header = f"# Generated by `k8s-ext-connector rbac {component}` from operator/rbac.py.\n"
    return header + yaml.safe_dump_all(manifests(component), sort_keys=False)


def chart_rules() -> dict[str, Any]:
    """Every component's rules with their reasons: the chart's RBAC templates read this."""
    return {
        component: {
            "roleNamespace": spec.role_namespace,
            "clusterRules": [_rule_with_reason(r) for r in spec.cluster_rules],
            "namespaceRules": [_rule_with_reason(r) for r in spec.namespace_rules],
            "connectorRules": [_rule_with_reason(r) for r in spec.connector_rules],
        }
        for component, spec in COMPONENTS.items()
    }


def _rule_with_reason(rule: Rule) -> dict[str, Any]:
    return {**_rules((rule,))[0], "why": rule.why}


def render_chart_rules() -> str:
    header = (
        "# Generated by `k8s-ext-connector rbac rules` from operator/rbac.py; the chart's RBAC\n"
        "# templates render every Role from this file, and tests keep it equal to the code.\n"
    )
    return header + yaml.safe_dump(chart_rules(), sort_keys=False, width=100)


def allowed(group: str, resource: str, verb: str, namespaced_in_connector: bool = False) -> bool:
    rules = CLUSTER_RULES + (NAMESPACE_RULES if namespaced_in_connector else ())
    return any(r.group == group and r.resource == resource and verb in r.verbs for r in rules)
