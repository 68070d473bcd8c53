"""``k8s-ext-connector operator``: settings, leader election, then kopf's own runner."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
from dataclasses import dataclass

from k8s_ext_connector.core.api import NODE_RESTRICTION_PREFIX, node_may_set_label
from k8s_ext_connector.core.config import read_network, unique_networks
from k8s_ext_connector.core.errors import ConfigError
from k8s_ext_connector.core.health import serve_health
from k8s_ext_connector.core.kube import KubeClient, load_credentials
from k8s_ext_connector.core.run import add_log_level, run_agent, setup_logging
from k8s_ext_connector.operator.desired import OperatorSettings
from k8s_ext_connector.operator.leader import LeaderElector

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OperatorCommand:
    settings: OperatorSettings
    kubeconfig: str | None
    leader_election: bool
    identity: str
    log_level: str
    lease_namespace: str = ""  # empty: the connector namespace
    health_host: str = "0.0.0.0"
    health_port: int = 0  # 0: no /healthz endpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--connector-namespace",
        default="external-services",
        help="namespace of the connector Services, gateway config and host keys",
    )
    parser.add_argument(
        "--gateway-label",
        default="=".join(OperatorSettings.gateway_label),
        help="KEY=VALUE label of the nodes that may hold source IPs; the default's key is "
        "one a node's kubelet cannot set on itself (NodeRestriction); a label a kubelet may "
        "set is accepted with a warning",
    )
    parser.add_argument("--ssh-port", type=int, default=2022, help="gateway SSH port")
    parser.add_argument(
        "--ssh-allow-from",
        action="append",
        default=[],
        metavar="CIDR",
        help="also allow this network to the gateways' SSH port (repeatable); the nodes' "
        "podCIDRs and InternalIPs always are. For CNIs whose Nodes carry no podCIDRs "
        "(e.g. Calico IPAM): the pod network's CIDR",
    )
    parser.add_argument(
        "--own-namespace-sources",
        action="store_true",
        help="an ExternalService may only name source Services of its own namespace "
        "(multi-tenant clusters; the seed's example names other namespaces)",
    )
    parser.add_argument("--kubeconfig", help="default: in-cluster, then $KUBECONFIG")
    parser.add_argument(
        "--no-leader-election",
        action="store_true",
        help="run without a Lease (a single replica only)",
    )
    parser.add_argument("--identity", default=os.environ.get("POD_NAME") or socket.gethostname())
    parser.add_argument(
        "--lease-namespace",
        default=os.environ.get("POD_NAMESPACE", ""),
        help="namespace of the leader-election Lease (default: $POD_NAMESPACE, else the "
        "connector namespace)",
    )
    parser.add_argument("--health-host", default="0.0.0.0", help="address of the /healthz endpoint")
    parser.add_argument(
        "--health-port",
        type=int,
        default=0,
        help="port of /healthz and /ready for kubelet probes, on leader and standby (0: off)",
    )
    add_log_level(parser)


def command_from(args: argparse.Namespace) -> OperatorCommand:
    key, sep, value = str(args.gateway_label).partition("=")
    if not key or not sep:
        raise ConfigError("--gateway-label", args.gateway_label, "must be KEY=VALUE")
    if not 1 <= args.ssh_port <= 65535:
        raise ConfigError("--ssh-port", args.ssh_port, "must be a TCP port number 1-65535")
    if not 0 <= args.health_port <= 65535:
        raise ConfigError("--health-port", args.health_port, "must be 0 (off) or a port 1-65535")
    allow_from = unique_networks(read_network(n, "--ssh-allow-from") for n in args.ssh_allow_from)
    return OperatorCommand(
        settings=OperatorSettings(
            connector_namespace=args.connector_namespace,
            gateway_label=(key, value),
            ssh_port=args.ssh_port,
            own_namespace_sources=args.own_namespace_sources,
            ssh_allow_from=allow_from,
        ),
        kubeconfig=args.kubeconfig,
        leader_election=not args.no_leader_election,
        identity=args.identity,
        log_level=args.log_level,
        lease_namespace=args.lease_namespace,
        health_host=args.health_host,
        health_port=args.health_port,
    )


def warn_if_nodes_may_self_label(gateway_label: tuple[str, str]) -> None:
    """A gateway label a kubelet may set lets a compromised node become a gateway."""
    key, value = gateway_label
    if node_may_set_label(key):
        log.warning(
            "--gateway-label %s=%s: a node's own kubelet may set this label, so a compromised "
            "node can make itself a gateway and be given source IPs; prefer a key under %s "
            "(docs/security.md)",
            key,
            value,
            NODE_RESTRICTION_PREFIX,
        )


def run(args: argparse.Namespace) -> int:
    command = command_from(args)
    setup_logging(command.log_level)
    warn_if_nodes_may_self_label(command.settings.gateway_label)
    if command.log_level != "debug":
        # kopf logs every handler call at INFO: at 1,000 objects that is most of the CPU.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    return run_agent(lambda: serve(command))


async def serve(command: OperatorCommand, stop: asyncio.Event | None = None) -> None:
    import kopf  # imported here: the agents' start-up should not pay for it

    from k8s_ext_connector.operator.handlers import register

    credentials = load_credentials(command.kubeconfig)
    registry = kopf.OperatorRegistry()
    stop = stop or asyncio.Event()
    register(registry, command.settings, credentials, on_stop=stop.set)
    health = (
        await serve_health(command.health_host, command.health_port, lambda: (True, "ok"))
        if command.health_port
        else None
    )
    async with KubeClient(credentials) as client:
        lease_namespace = command.lease_namespace or command.settings.connector_namespace
        elector = LeaderElector(client, lease_namespace, command.identity)
        if command.leader_election:
            await elector.acquire()
        running = asyncio.create_task(
            kopf.operator(
                registry=registry,
                clusterwide=True,
                standalone=True,
                stop_flag=stop,
                # kopf would otherwise derive one from getpass.getuser(), which fails for a
                # uid without a passwd entry (the image's non-root user on some bases).
                # (kopf's Identity is a NewType of str it does not export.)
                identity=command.identity,  # type: ignore[arg-type]
            )
        )
        watchers = [running]
        if command.leader_election:
            watchers.append(asyncio.create_task(elector.hold()))
        await asyncio.wait(watchers, return_when=asyncio.FIRST_COMPLETED)
        stop.set()
        await running
        for task in watchers:
            task.cancel()
    if health is not None:
        health.close()
