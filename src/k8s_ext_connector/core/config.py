"""The configuration the operator produces and the agents consume.

Two documents, both plain YAML/JSON with camelCase keys (like Kubernetes objects):

- ``SidecarConfig``: the egress rules of one pod: which destinations to intercept, and for
  each the gateway SSH endpoint (with its pinned host key) and the target to open.
- ``GatewayConfig``: for each source IP a gateway holds, the authorised client public keys
  and, per key, the exact ``targetIP:port`` pairs it may open; and its ingress entries:
  which peer may connect to ``sourceIP:port`` and the backend (a source Service's
  ClusterIP) such connections are relayed to.

Parsing is strict (unknown fields, bad IPs and ports fail with the field path and value)
and also checks what makes a config unusable as a whole (one destination intercepted by
two rules, a rule intercepting its own gateway's SSH endpoint, a key listed twice, an
ingress port that is the gateway's SSH port or that leads to two backends).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import yaml

from k8s_ext_connector.core.errors import ConfigError
from k8s_ext_connector.core.fields import Fields

CONFIG_VERSION = 1
DEFAULT_SSH_PORT = 2022
DEFAULT_LISTEN_PORT = 15001


@dataclass(frozen=True, order=True)
class Endpoint:
    """An IP address and TCP port."""

    address: str
    port: int

    def __str__(self) -> str:
        return (
            f"[{self.address}]:{self.port}"
            if ":" in self.address
            else f"{self.address}:{self.port}"
        )

    @staticmethod
    def read(data: object, path: str) -> Endpoint:
        f = Fields(data, path)
        endpoint = Endpoint(address=f.ip("address"), port=f.port("port"))
        f.done()
        return endpoint

    def to_dict(self) -> dict[str, Any]:
        return {"address": self.address, "port": self.port}


def canonical_public_key(text: object, path: str) -> str:
    """``type base64`` of an OpenSSH public key line (comment dropped), or a ConfigError."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(path, text, "must be an OpenSSH public key line")
    try:
        key = asyncssh.import_public_key(text.strip())
    except (asyncssh.KeyImportError, ValueError):
        # Never echo key material back: name the field and the first characters only.
        raise ConfigError(path, text.strip()[:24] + "...", "is not an OpenSSH public key") from None
    algorithm, blob = key.export_public_key("openssh").decode().split()[:2]
    return f"{algorithm} {blob}"


@dataclass(frozen=True)
class GatewayEndpoint:
    """Where a sidecar opens its SSH session, and the host key it pins."""

    address: str
    host_key: str
    port: int = DEFAULT_SSH_PORT

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.address, self.port)

    @staticmethod
    def read(data: object, path: str) -> GatewayEndpoint:
        f = Fields(data, path)
        gateway = GatewayEndpoint(
            address=f.ip("address"),
            port=f.port("port", DEFAULT_SSH_PORT),
            host_key=canonical_public_key(f.raw("hostKey"), f.path("hostKey")),
        )
        f.done()
        return gateway

    def to_dict(self) -> dict[str, Any]:
        return {"address": self.address, "port": self.port, "hostKey": self.host_key}


@dataclass(frozen=True)
class EgressRule:
    """Connections to any ``intercept`` destination leave through ``gateway`` to ``target``."""

    name: str
    intercept: tuple[Endpoint, ...]
    gateway: GatewayEndpoint
    target: Endpoint

    @staticmethod
    def read(data: object, path: str) -> EgressRule:
        f = Fields(data, path)
        rule = EgressRule(
            name=f.string("name"),
            intercept=f.items("intercept", Endpoint.read),
            gateway=GatewayEndpoint.read(f.raw("gateway"), f.path("gateway")),
            target=Endpoint.read(f.raw("target"), f.path("target")),
        )
        if not rule.intercept:
            raise ConfigError(f.path("intercept"), [], "must list at least one destination")
        f.done()
        return rule

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "intercept": [e.to_dict() for e in self.intercept],
            "gateway": self.gateway.to_dict(),
            "target": self.target.to_dict(),
        }


@dataclass(frozen=True)
class SidecarConfig:
    """Everything one pod's sidecar needs; no API credentials, no private keys."""

    rules: tuple[EgressRule, ...]
    listen_port: int = DEFAULT_LISTEN_PORT

    def rule_for(self, destination: Endpoint) -> EgressRule | None:
        """The rule that intercepts ``destination``, if any (validated to be unique)."""
        for rule in self.rules:
            if destination in rule.intercept:
                return rule
        return None

    def gateways(self) -> tuple[GatewayEndpoint, ...]:
        """Distinct gateway endpoints, in rule order (one SSH session each)."""
        return tuple(dict.fromkeys(rule.gateway for rule in self.rules))

    @staticmethod
    def from_dict(data: object) -> SidecarConfig:
        f = Fields(data)
        version = f.integer("version", CONFIG_VERSION, lo=1, hi=CONFIG_VERSION)
        del version
        config = SidecarConfig(
            listen_port=f.port("listenPort", DEFAULT_LISTEN_PORT),
            rules=f.items("rules", EgressRule.read),
        )
        f.done()
        config._check_consistency()
        return config

    def _check_consistency(self) -> None:
        owner: dict[Endpoint, int] = {}
        gateways = {rule.gateway.endpoint for rule in self.rules}
        for i, rule in enumerate(self.rules):
            for j, destination in enumerate(rule.intercept):
                path = f"rules[{i}].intercept[{j}]"
                if destination in owner and owner[destination] != i:
                    raise ConfigError(
                        path,
                        str(destination),
                        f"already intercepted by rules[{owner[destination]}]",
                    )
                if destination in gateways:
                    raise ConfigError(
                        path,
                        str(destination),
                        "is a gateway SSH endpoint; intercepting it would loop",
                    )
                owner[destination] = i
        keys: dict[Endpoint, str] = {}
        for i, rule in enumerate(self.rules):
            endpoint = rule.gateway.endpoint
            if keys.setdefault(endpoint, rule.gateway.host_key) != rule.gateway.host_key:
                raise ConfigError(
                    f"rules[{i}].gateway.hostKey",
                    str(endpoint),
                    "differs from an earlier rule's host key",
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": CONFIG_VERSION,
            "listenPort": self.listen_port,
            "rules": [rule.to_dict() for rule in self.rules],
        }


@dataclass(frozen=True)
class AuthorizedClient:
    """A client public key and the exact targets it may open from one source IP."""

    name: str
    public_key: str
    allow: tuple[Endpoint, ...]

    @staticmethod
    def read(data: object, path: str) -> AuthorizedClient:
        f = Fields(data, path)
        client = AuthorizedClient(
            name=f.string("name"),
            public_key=canonical_public_key(f.raw("publicKey"), f.path("publicKey")),
            allow=tuple(sorted(set(f.items("allow", Endpoint.read)))),
        )
        f.done()
        return client

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "publicKey": self.public_key,
            "allow": [e.to_dict() for e in self.allow],
        }


@dataclass(frozen=True, order=True)
class IngressRule:
    """Connections from ``allow_from`` to ``sourceIP:port`` are relayed to ``backend``.

    ``allow_from`` is an ExternalService's targetIP and ``backend`` a source Service's
    ClusterIP and port: the external server reaches that Service through the source IP it
    already sees the Service's pods come from, and nobody else does.
    """

    allow_from: str
    port: int
    backend: Endpoint

    @staticmethod
    def read(data: object, path: str) -> IngressRule:
        f = Fields(data, path)
        rule = IngressRule(
            allow_from=f.ip("allowFrom"),
            port=f.port("port"),
            backend=Endpoint.read(f.raw("backend"), f.path("backend")),
        )
        f.done()
        return rule

    def to_dict(self) -> dict[str, Any]:
        return {"allowFrom": self.allow_from, "port": self.port, "backend": self.backend.to_dict()}


@dataclass(frozen=True)
class SourceIPConfig:
    """One source IP a gateway holds: its SSH server's clients and its ingress entries."""

    source_ip: str
    clients: tuple[AuthorizedClient, ...] = field(default=())
    ingress: tuple[IngressRule, ...] = field(default=())

    def client_for(self, public_key: str) -> AuthorizedClient | None:
        for client in self.clients:
            if client.public_key == public_key:
                return client
        return None

    @staticmethod
    def read(data: object, path: str) -> SourceIPConfig:
        f = Fields(data, path)
        source = SourceIPConfig(
            source_ip=f.ip("sourceIP"),
            clients=f.items("clients", AuthorizedClient.read, []),
            ingress=f.items("ingress", IngressRule.read, []),
        )
        f.done()
        seen: dict[str, int] = {}
        for i, client in enumerate(source.clients):
            if client.public_key in seen:
                raise ConfigError(
                    f"{path}.clients[{i}].publicKey",
                    client.name,
                    f"key already listed for clients[{seen[client.public_key]}];"
                    " merge their allow lists",
                )
            seen[client.public_key] = i
        source._check_ingress(path)
        return source

    def _check_ingress(self, path: str) -> None:
        family = _family(self.source_ip)
        backends: dict[int, tuple[Endpoint, int]] = {}
        entries: dict[IngressRule, int] = {}
        for i, rule in enumerate(self.ingress):
            where = f"{path}.ingress[{i}]"
            if _family(rule.allow_from) != family:
                raise ConfigError(
                    f"{where}.allowFrom",
                    rule.allow_from,
                    f"is not of the address family of sourceIP {self.source_ip}",
                )
            if rule in entries:
                raise ConfigError(where, str(rule.backend), f"repeats ingress[{entries[rule]}]")
            entries[rule] = i
            backend, first = backends.setdefault(rule.port, (rule.backend, i))
            if backend != rule.backend:
                raise ConfigError(
                    f"{where}.backend",
                    str(rule.backend),
                    f"port {rule.port} already leads to {backend} (ingress[{first}]);"
                    " one port has one backend",
                )

    def ingress_ports(self) -> dict[int, tuple[Endpoint, frozenset[str]]]:
        """Port -> (backend, peers allowed to connect): one relay listener each."""
        ports: dict[int, tuple[Endpoint, frozenset[str]]] = {}
        for rule in self.ingress:
            _, peers = ports.get(rule.port, (rule.backend, frozenset()))
            ports[rule.port] = (rule.backend, peers | {rule.allow_from})
        return ports

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "sourceIP": self.source_ip,
            "clients": [c.to_dict() for c in self.clients],
        }
        if self.ingress:  # absent rather than empty: egress-only configs read as before
            data["ingress"] = [rule.to_dict() for rule in self.ingress]
        return data


def _family(address: str) -> int:
    return 6 if ":" in address else 4


@dataclass(frozen=True)
class GatewayConfig:
    """Every source IP one gateway serves."""

    sources: tuple[SourceIPConfig, ...]
    ssh_port: int = DEFAULT_SSH_PORT
    # Networks that may reach the SSH port (the cluster: pod CIDRs, node addresses). Empty:
    # nobody but the node itself (fail closed); see gateway/rules.py.
    ssh_allow_from: tuple[str, ...] = ()

    def source(self, source_ip: str) -> SourceIPConfig | None:
        for source in self.sources:
            if source.source_ip == source_ip:
                return source
        return None

    @staticmethod
    def from_dict(data: object) -> GatewayConfig:
        f = Fields(data)
        f.integer("version", CONFIG_VERSION, lo=1, hi=CONFIG_VERSION)
        config = GatewayConfig(
            ssh_port=f.port("sshPort", DEFAULT_SSH_PORT),
            sources=f.items("sources", SourceIPConfig.read),
            ssh_allow_from=unique_networks(f.items("sshAllowFrom", read_network, [])),
        )
        f.done()
        seen: dict[str, int] = {}
        for i, source in enumerate(config.sources):
            if source.source_ip in seen:
                raise ConfigError(
                    f"sources[{i}].sourceIP",
                    source.source_ip,
                    f"already listed as sources[{seen[source.source_ip]}]",
                )
            seen[source.source_ip] = i
            for j, rule in enumerate(source.ingress):
                if rule.port == config.ssh_port:
                    raise ConfigError(
                        f"sources[{i}].ingress[{j}].port",
                        rule.port,
                        "is the gateway's sshPort; the SSH server already listens there",
                    )
        return config

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"version": CONFIG_VERSION, "sshPort": self.ssh_port}
        if self.ssh_allow_from:  # absent rather than empty, as for ingress
            data["sshAllowFrom"] = list(self.ssh_allow_from)
        data["sources"] = [s.to_dict() for s in self.sources]
        return data


def read_network(data: object, path: str) -> str:
    """The canonical text of a CIDR (``10.244.1.0/24``; a bare address is a /32 or /128)."""
    if not isinstance(data, str):
        raise ConfigError(path, data, "must be a CIDR such as 10.244.0.0/16")
    try:
        return str(ipaddress.ip_network(data.strip(), strict=True))
    except ValueError as error:
        reason = "has host bits set" if "host bits" in str(error) else "is not a CIDR"
        raise ConfigError(path, data, f"{reason} (e.g. 10.244.0.0/16)") from None


def unique_networks(networks: Iterable[str]) -> tuple[str, ...]:
    """Networks without repeats, IPv4 first, each family in address order."""
    parsed = {ipaddress.ip_network(n) for n in networks}
    return tuple(str(n) for n in sorted(parsed, key=lambda n: (n.version, n)))


def parse_document(text: str, origin: str) -> object:
    """YAML (a superset of JSON) to plain data; syntax errors name the file and line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        position = getattr(error, "position", None)  # reader errors: bad characters
        if mark is not None:
            where = f"line {mark.line + 1}"
        elif position is not None:
            where = f"character {position}"
        else:
            where = "document"
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(origin, where, f"is not valid YAML/JSON ({problem})") from None


def load_sidecar_config(path: Path) -> SidecarConfig:
    return SidecarConfig.from_dict(_read(path))


def load_gateway_config(path: Path) -> GatewayConfig:
    return GatewayConfig.from_dict(_read(path))


def _read(path: Path) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(str(path), error.strerror, "cannot be read") from None
    except UnicodeDecodeError as error:
        raise ConfigError(str(path), f"byte {error.start}", "is not UTF-8 text") from None
    return parse_document(text, str(path))


def dump(config: SidecarConfig | GatewayConfig) -> str:
    """Stable YAML text of a config (sorted lists stay in their given order)."""
    # The C emitter gives the same text ~3x faster: the operator renders every config per pass.
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    return yaml.dump(config.to_dict(), Dumper=dumper, sort_keys=False)


def dump_json(config: SidecarConfig | GatewayConfig) -> str:
    return json.dumps(config.to_dict(), indent=2)


def unique(items: Iterable[Endpoint]) -> tuple[Endpoint, ...]:
    return tuple(dict.fromkeys(items))
