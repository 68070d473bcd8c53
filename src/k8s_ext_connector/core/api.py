"""The user-facing API: ``submariner.io/v1alpha1 ExternalService``, as the seed defined it.

Only the spec is parsed here (status belongs to the operator). Parsing names the field
and value of anything the seed's semantics cannot serve, e.g. a named ``targetPort``
(an external server has no named ports), UDP (not supported yet) or an IPv4 address with
leading zeros. What parses but cannot be served (IPv6, duplicates) is for
``planner.spec_problems``, which gives each its own reason.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from k8s_ext_connector.core.errors import ConfigError
from k8s_ext_connector.core.fields import DNS_1035_LABEL, DNS_LABEL, Fields, canonical_ip

GROUP = "submariner.io"
VERSION = "v1alpha1"
KIND = "ExternalService"

# The label that makes a node a gateway (the DaemonSet's nodeSelector, the operator's
# candidates). Its key is under the prefix the NodeRestriction admission plugin forbids
# kubelets to set on their own Node, so only an administrator can make a node a gateway.
NODE_RESTRICTION_PREFIX = "node-restriction.kubernetes.io/"
GATEWAY_NODE_LABEL = (f"{NODE_RESTRICTION_PREFIX}ext-connector-gateway", "true")
# The prototype's label: a kubelet may set it on itself (opt-in, with a warning).
SELF_ASSIGNABLE_GATEWAY_LABEL = ("ext-connector.submariner.io/gateway", "true")


# What NodeRestriction still lets a kubelet set inside the kubernetes.io/k8s.io domains.
_KUBELET_LABEL_PREFIXES = (
    "kubelet.kubernetes.io/",
    "node.kubernetes.io/",
    "kubelet.k8s.io/",
    "node.k8s.io/",
)
_KUBELET_LABELS = frozenset(
    {
        "kubernetes.io/hostname",
        "kubernetes.io/arch",
        "kubernetes.io/os",
        "beta.kubernetes.io/arch",
        "beta.kubernetes.io/os",
        "beta.kubernetes.io/instance-type",
        "node.kubernetes.io/instance-type",
        "failure-domain.beta.kubernetes.io/region",
        "failure-domain.beta.kubernetes.io/zone",
        "topology.kubernetes.io/region",
        "topology.kubernetes.io/zone",
    }
)


def node_may_set_label(key: str) -> bool:
    """Whether a node's own kubelet may set the label ``key`` on its Node object, as the
    NodeRestriction admission plugin decides: anything outside the ``kubernetes.io`` and
    ``k8s.io`` domains, and inside them only a fixed list and two prefixes, which never
    include ``node-restriction.kubernetes.io/``."""
    domain = key.partition("/")[0] if "/" in key else ""
    if not any(domain == d or domain.endswith("." + d) for d in ("kubernetes.io", "k8s.io")):
        return True
    return key in _KUBELET_LABELS or key.startswith(_KUBELET_LABEL_PREFIXES)


@dataclass(frozen=True, order=True)
class ServiceRef:
    """A Kubernetes Service by namespace and name."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class ExternalPort:
    """``spec.ports[]``: clients use ``port``; the external server listens on ``target_port``."""

    port: int
    target_port: int
    protocol: str = "TCP"
    name: str = ""

    @property
    def service_port_name(self) -> str:
        """Its name on the connector Service (where names must be unique)."""
        return self.name or f"tcp-{self.port}"

    @staticmethod
    def read(data: object, path: str) -> ExternalPort:
        f = Fields(data, path)
        protocol = f.string("protocol", "TCP")
        if protocol != "TCP":
            raise ConfigError(
                f.path("protocol"), protocol, "only TCP is supported (UDP is planned)"
            )
        port = f.port("port")
        raw_target = f.raw("targetPort", port)
        if isinstance(raw_target, str):
            raise ConfigError(
                f.path("targetPort"),
                raw_target,
                "must be a number: an external server has no named ports",
            )
        target_port = f.port("targetPort", port)  # seed semantics: defaults to port
        name = f.string("name", "")
        if name and not DNS_LABEL.fullmatch(name):  # it names the connector Service's port
            raise ConfigError(f.path("name"), name, "must be a DNS label (a-z, 0-9, '-'; max 63)")
        port_spec = ExternalPort(port=port, target_port=target_port, protocol=protocol, name=name)
        f.done()
        return port_spec




def is_dns1035_label(value: str) -> bool:
    """Whether ``value`` can name a Service: a-z, 0-9 and '-', a letter first, max 63."""
    return bool(DNS_1035_LABEL.fullmatch(value))


def _address(f: Fields, name: str) -> str:
    """An IP address field, canonical text. Python refuses IPv4 with leading zeros
    (``192.168.122.010``: octal to some parsers, decimal to others), as the CRD does; an
    IPv6 address parses here and is refused by the planner (``IPv6NotSupported``)."""
    value = f.raw(name)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return canonical_ip(value)
    raise ConfigError(
        f.path(name),
        value,
        "must be an IPv4 address in dotted-quad form without leading zeros, e.g. 192.168.122.10",
    )


def _dns_label(f: Fields, name: str) -> str:
    value = f.string(name)
    if not DNS_LABEL.fullmatch(value):
        raise ConfigError(f.path(name), value, "must be a DNS label (a-z, 0-9, '-'; max 63)")
    return value


@dataclass(frozen=True)
class Source:
    """``spec.sources[]``: pods behind ``service`` leave with ``source_ip``."""

    service: ServiceRef
    source_ip: str

    @staticmethod
    def read(data: object, path: str) -> Source:
        f = Fields(data, path)
        svc = f.nested("service")
        source = Source(
            service=ServiceRef(
                namespace=_dns_label(svc, "namespace"), name=_dns_label(svc, "name")
            ),
            source_ip=_address(f, "sourceIP"),
        )
        svc.done()
        f.done()
        return source


@dataclass(frozen=True)
class ExternalServiceSpec:
    target_ip: str
    sources: tuple[Source, ...]
    ports: tuple[ExternalPort, ...]

    @staticmethod
    def from_dict(data: object, path: str = "spec") -> ExternalServiceSpec:
        f = Fields(data, path)
        spec = ExternalServiceSpec(
            target_ip=_address(f, "targetIP"),
            sources=f.items("sources", Source.read),
            ports=f.items("ports", ExternalPort.read),
        )
        f.done()
        if not spec.sources:
            raise ConfigError(f.path("sources"), [], "must list at least one source")
        if not spec.ports:
            raise ConfigError(f.path("ports"), [], "must list at least one port")
        return spec  # duplicates and IPv6 are the planner's (spec_problems), with reasons


@dataclass(frozen=True)
class ExternalService:
    """An ExternalService object reduced to what the planner needs."""

    namespace: str
    name: str
    spec: ExternalServiceSpec

    @property
    def ref(self) -> ServiceRef:
        return ServiceRef(self.namespace, self.name)

    @staticmethod
    def from_object(obj: object) -> ExternalService:
        """Parse a whole object as ``kubectl get -o yaml`` shows it."""
        f = Fields(obj)
        meta = f.nested("metadata")
        name = meta.string("name")
        namespace = meta.string("namespace", "default")
        spec = ExternalServiceSpec.from_dict(f.raw("spec"))
        return ExternalService(namespace=namespace, name=name, spec=spec)
