"""``k8s-ext-connector sidecar``: framework glue around SidecarAgent.

Order of side effects, so that nothing leaves the pod unintercepted at any moment: the hold
while waiting for the first config; the egress rules the moment the config is readable
(before the key, the sessions and the health server); then the rest. Nothing here removes
a rule: an exception at any later stage, or SIGTERM, leaves the pod fail-closed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from k8s_ext_connector.certs.ssh import load_private_key
from k8s_ext_connector.core import iptables
from k8s_ext_connector.core.config import SidecarConfig, load_sidecar_config
from k8s_ext_connector.core.health import serve_health
from k8s_ext_connector.core.reload import ConfigWatcher
from k8s_ext_connector.core.run import (
    add_agent_arguments,
    run_agent,
    setup_logging,
    until_stopped,
)
from k8s_ext_connector.sidecar.agent import SidecarAgent, hold, take_over
from k8s_ext_connector.sidecar.readiness import STARTUP_GRACE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SidecarSettings:
    config_path: Path
    ssh_key_path: Path
    iptables_backend: str  # auto | nft | legacy
    health_host: str
    health_port: int
    reload_interval: float
    log_level: str
    wait_for_config: bool = False
    startup_grace: float = STARTUP_GRACE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="sidecar config (YAML/JSON)")
    parser.add_argument(
        "--ssh-key",
        required=True,
        type=Path,
        help="this pod's SSH client private key (OpenSSH format)",
    )
    parser.add_argument(
        "--iptables-backend",
        default="auto",
        choices=["auto", "nft", "legacy"],
        help="auto: the backend already holding more rules, nft on a tie",
    )
    parser.add_argument(
        "--health-host",
        default="0.0.0.0",
        help="address of the /healthz and /ready endpoint (kubelet probes)",
    )
    parser.add_argument("--health-port", type=int, default=15021, help="0 disables it")
    parser.add_argument(
        "--wait-for-config",
        action="store_true",
        help="wait (not ready) until the config and key files exist, as mounted optional "
        "volumes appear once the operator has written them; new TCP connections of the pod "
        "are refused meanwhile",
    )
    parser.add_argument(
        "--startup-grace",
        type=float,
        default=STARTUP_GRACE,
        help="seconds each gateway session gets to connect before the first ready: after "
        "that, a gateway still down is reported in /ready instead of holding the pod back",
    )
    add_agent_arguments(parser)


def settings_from(args: argparse.Namespace) -> SidecarSettings:
    return SidecarSettings(
        args.config,
        args.ssh_key,
        args.iptables_backend,
        args.health_host,
        args.health_port,
        args.reload_interval,
        args.log_level,
        args.wait_for_config,
        args.startup_grace,
    )


def wait_for_files(paths: list[Path], interval: float = 1.0) -> None:
    """Block until every path exists."""
    waiting = [p for p in paths if not p.exists()]
    if waiting:
        print(
            f"k8s-ext-connector sidecar: waiting for {', '.join(map(str, waiting))}",
            file=sys.stderr,
            flush=True,
        )
    while any(not p.exists() for p in paths):
        time.sleep(interval)


def _firewall(settings: SidecarSettings) -> iptables.Iptables:
    backend: iptables.Backend = (
        iptables.detect_backend()
        if settings.iptables_backend == "auto"
        else settings.iptables_backend  # type: ignore[assignment]
    )
    return iptables.SubprocessIptables(backend)


def run(settings: SidecarSettings) -> int:
    firewall: iptables.Iptables | None = None
    if settings.wait_for_config and not settings.config_path.exists():
        firewall = _firewall(settings)
        if hold(firewall):
            print(
                "k8s-ext-connector sidecar: no config yet: the pod's new TCP connections"
                " are refused until it arrives",
                file=sys.stderr,
                flush=True,
            )
        wait_for_files([settings.config_path], settings.reload_interval)
    config = load_sidecar_config(settings.config_path)  # errors before any (other) side effect
    firewall = firewall or _firewall(settings)
    take_over(firewall, config)  # from here on the pod fails closed, whatever happens next
    if settings.wait_for_config:
        wait_for_files([settings.ssh_key_path], settings.reload_interval)
    client_key = load_private_key(settings.ssh_key_path, "--ssh-key")
    setup_logging(settings.log_level)
    log.info("iptables: %r", firewall)
    return run_agent(lambda: _serve(settings, config, client_key, firewall))


async def _serve(
    settings: SidecarSettings,
    config: SidecarConfig,
    client_key: asyncssh.SSHKey,
    firewall: iptables.Iptables,
) -> None:
    agent = SidecarAgent(config, client_key, firewall, settings.startup_grace)
    health = None
    try:
        await agent.start()
        if settings.health_port:
            health = await serve_health(settings.health_host, settings.health_port, agent.readiness)
        watcher = ConfigWatcher(
            settings.config_path, load_sidecar_config, agent.apply, settings.reload_interval
        )
        watcher.install_sighup()
        # The key is a mounted Secret too: the operator re-issues it when a source service
        # comes back, and the kubelet swaps the file under us.
        key_watcher = ConfigWatcher(
            settings.ssh_key_path,
            lambda path: load_private_key(path, "--ssh-key"),
            agent.replace_key,
            settings.reload_interval,
        )
        watching = [asyncio.create_task(watcher.run()), asyncio.create_task(key_watcher.run())]
        try:
            await until_stopped()
        finally:
            for task in watching:
                task.cancel()
    finally:
        if health is not None:
            health.close()
        await agent.stop()
        log.info("sidecar stopped; its rules stay and refuse intercepted connections")
