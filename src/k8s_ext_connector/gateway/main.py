"""``k8s-ext-connector gateway``: framework glue around GatewayAgent."""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from k8s_ext_connector.certs.ssh import load_private_key
from k8s_ext_connector.core import iptables
from k8s_ext_connector.core.config import GatewayConfig, load_gateway_config
from k8s_ext_connector.core.reload import ConfigWatcher
from k8s_ext_connector.core.run import (
    add_agent_arguments,
    run_agent,
    setup_logging,
    until_stopped,
)
from k8s_ext_connector.gateway.addresses import IprouteAddresses
from k8s_ext_connector.gateway.agent import GatewayAgent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GatewaySettings:
    config_path: Path
    host_key_path: Path
    manage_addresses: str | None
    reload_interval: float
    log_level: str
    iptables_backend: str = "auto"  # auto | nft | legacy


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="gateway config (YAML/JSON)")
    parser.add_argument(
        "--host-key", required=True, type=Path, help="SSH host private key (OpenSSH format)"
    )
    parser.add_argument(
        "--manage-addresses",
        metavar="IFACE",
        help="add the source IPs to IFACE at start, remove them at stop",
    )
    parser.add_argument(
        "--iptables-backend",
        default="auto",
        choices=["auto", "nft", "legacy"],
        help="for the ingress filter chain; auto: the backend already holding more rules",
    )
    add_agent_arguments(parser)


def settings_from(args: argparse.Namespace) -> GatewaySettings:
    return GatewaySettings(
        args.config,
        args.host_key,
        args.manage_addresses,
        args.reload_interval,
        args.log_level,
        args.iptables_backend,
    )


def firewalls(backend: iptables.Backend) -> dict[iptables.Family, iptables.Iptables]:
    """IPv4 always; IPv6 where the node has it and its ip6tables binaries are installed."""
    found: dict[iptables.Family, iptables.Iptables] = {
        "ipv4": iptables.SubprocessIptables(backend, "ipv4")
    }
    if Path("/proc/net/if_inet6").exists() and shutil.which(f"ip6tables-{backend}-restore"):
        found["ipv6"] = iptables.SubprocessIptables(backend, "ipv6")
    return found


def run(settings: GatewaySettings) -> int:
    config = load_gateway_config(settings.config_path)  # errors before any side effect
    host_key = load_private_key(settings.host_key_path, "--host-key")
    setup_logging(settings.log_level)
    backend: iptables.Backend = (
        iptables.detect_backend()
        if settings.iptables_backend == "auto"
        else settings.iptables_backend  # type: ignore[assignment]
    )
    log.info("iptables backend: %s", backend)
    return run_agent(lambda: _serve(settings, config, host_key, firewalls(backend)))


async def _serve(
    settings: GatewaySettings,
    config: GatewayConfig,
    host_key: asyncssh.SSHKey,
    firewalls: dict[iptables.Family, iptables.Iptables],
) -> None:
    addresses = IprouteAddresses(settings.manage_addresses) if settings.manage_addresses else None
    agent = GatewayAgent(config, host_key, addresses, firewalls)
    await agent.start()
    watcher = ConfigWatcher(
        settings.config_path, load_gateway_config, agent.apply, settings.reload_interval
    )
    watcher.install_sighup()
    watching = asyncio.create_task(watcher.run())
    log.info("gateway running with %d source IPs", len(config.sources))
    try:
        await until_stopped()
    finally:
        watching.cancel()
        await agent.stop()
        log.info("gateway stopped")
