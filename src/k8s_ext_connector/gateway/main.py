"""``k8s-ext-connector gateway``: framework glue around GatewayAgent.

Two ways to run it:

- **In the cluster** (the chart's DaemonSet, hostNetwork): ``--config`` is the node's key
  of the gateway ConfigMap, mounted ``optional`` (``--wait-for-config`` waits, not ready,
  until the kubelet has written it); ``--host-key-secret`` names the node's host key
  Secret, read through the API with a GET of that one Secret (a DaemonSet cannot mount a
  per-node Secret; see ``gateway/hostkey.py``) and followed by polling it; ``--health-port``
  serves ``/healthz`` and ``/ready`` for kubelet probes.
- **Outside** (the seed's way, and the namespace lab): ``--host-key FILE``, followed like
  the config file.

With an API client (``--host-key-secret``, or ``--kubeconfig`` outside the cluster) the
gateway also reports to the operator through its node's Lease (``gateway/statuslease.py``):
which source IPs it does not serve and why, renewed every ``--lease-renew-interval``
seconds, released at a clean stop. That needs the node's name (``--node-name``, default
$NODE_NAME, which the chart sets). Without an API client there is no report: the log and
``/ready`` are then the only places an unserved source IP shows.

Invalid input ends with one line naming the option or field and exit 2, before any side
effect: the config and a ``--host-key`` file are read before anything else; a Secret that
cannot be read for lack of permission (401/403) or holds no OpenSSH private key ends the
same way before the agent touches iptables, addresses or listeners. Waiting (for the
config file or the Secret) installs nothing, so SIGTERM at any point leaves nothing behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from k8s_ext_connector.certs.ssh import load_private_key
from k8s_ext_connector.core import iptables
from k8s_ext_connector.core.config import GatewayConfig, load_gateway_config
from k8s_ext_connector.core.errors import ConfigError
from k8s_ext_connector.core.fields import DNS_LABEL, DNS_SUBDOMAIN
from k8s_ext_connector.core.gateway_status import RENEW_SECONDS, gateway_lease_name
from k8s_ext_connector.core.health import serve_health
from k8s_ext_connector.core.kube import KubeClient, load_credentials
from k8s_ext_connector.core.reload import ConfigWatcher
from k8s_ext_connector.core.run import (
    add_agent_arguments,
    run_agent,
    setup_logging,
    until_stopped,
)
from k8s_ext_connector.gateway.addresses import IprouteAddresses
from k8s_ext_connector.gateway.agent import RULES_CHECK_SECONDS, GatewayAgent
from k8s_ext_connector.gateway.hostkey import HostKeySecret
from k8s_ext_connector.gateway.statuslease import StatusLease

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GatewaySettings:
    config_path: Path
    host_key_path: Path | None
    manage_addresses: str | None
    reload_interval: float
    log_level: str
    iptables_backend: str = "auto"  # auto | nft | legacy
    host_key_secret: str | None = None
    namespace: str | None = None
    kubeconfig: str | None = None
    host_key_poll_interval: float = 30.0
    wait_for_config: bool = False
    health_host: str = "0.0.0.0"
    health_port: int = 0
    snat_guard: bool = True
    rules_check_interval: float = RULES_CHECK_SECONDS
    node_name: str | None = None
    lease_renew_interval: float = RENEW_SECONDS

    @property
    def reports(self) -> bool:
        """Whether the gateway writes its Lease: only with an API client."""
        return self.host_key_secret is not None or self.kubeconfig is not None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="gateway config (YAML/JSON)")
    key = parser.add_mutually_exclusive_group(required=True)
    key.add_argument(
        "--host-key",
        type=Path,
        help="SSH host private key file (OpenSSH format), followed when it changes",
    )
    key.add_argument(
        "--host-key-secret",
        metavar="NAME",
        help="read the SSH host private key from this Secret's data.ssh-privatekey through "
        "the API (a GET of this one Secret, polled); waits (not ready) until it exists",
    )
    parser.add_argument(
        "--namespace",
        help="namespace of --host-key-secret and of the gateway's Lease (default: $POD_NAMESPACE)",
    )
    parser.add_argument(
        "--kubeconfig",
        help="for --host-key-secret and the gateway's Lease (default: the in-cluster service "
        "account, else $KUBECONFIG, else ~/.kube/config); with --host-key, giving it turns "
        "the Lease on",
    )
    parser.add_argument(
        "--node-name",
        default=None,
        help="this gateway's node (default: $NODE_NAME): it writes the Lease "
        f"{gateway_lease_name('<node>')} reporting the source IPs it does not serve",
    )
    parser.add_argument(
        "--lease-renew-interval",
        type=float,
        default=RENEW_SECONDS,
        metavar="SECONDS",
        help="seconds between renewals of the gateway's Lease (a change of what it serves "
        "is written at once)",
    )
    parser.add_argument(
        "--host-key-poll-interval",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="seconds between GETs of --host-key-secret once running",
    )
    parser.add_argument(
        "--wait-for-config",
        action="store_true",
        help="wait (not ready) until the config file exists, as a ConfigMap volume mounted "
        "optional appears once the operator has written it",
    )
    parser.add_argument(
        "--health-host",
        default="0.0.0.0",
        help="address of /healthz and /ready; all addresses by default, as kubelet probes "
        "of a hostNetwork pod dial the node's IP",
    )
    parser.add_argument(
        "--health-port", type=int, default=0, help="port of /healthz and /ready; 0 disables it"
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
        help="for the gateway's chains (ingress filter, source IP SNAT); auto: the backend "
        "already holding more rules",
    )
    parser.add_argument(
        "--snat-guard",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep each source IP as the source of connections leaving from it: a nat chain "
        "jumped to first from POSTROUTING with a same-address SNAT per source IP, so a node "
        "that masquerades its egress (kindnet, ip-masq-agent, Calico natOutgoing) cannot "
        "replace it with the node's address (default: on). --no-snat-guard is a diagnostic "
        "switch: it shows whether the node rewrites the source IPs",
    )
    parser.add_argument(
        "--rules-check-interval",
        type=float,
        default=RULES_CHECK_SECONDS,
        metavar="SECONDS",
        help="seconds between checks of the gateway's iptables rules; drift (e.g. a CNI "
        "inserting a rule above the SNAT jump) is repaired as a diff",
    )
    add_agent_arguments(parser)


def settings_from(args: argparse.Namespace) -> GatewaySettings:
    namespace = args.namespace or os.environ.get("POD_NAMESPACE") or None
    node_name = args.node_name or os.environ.get("NODE_NAME") or None
    if args.host_key_secret is not None or args.kubeconfig is not None:
        if node_name is None:
            raise ConfigError(
                "--node-name",
                "",
                "required with an API client (--host-key-secret or --kubeconfig), to write "
                "the gateway's Lease (or set NODE_NAME, as the chart does)",
            )
        if not DNS_SUBDOMAIN.fullmatch(node_name) or len(gateway_lease_name(node_name)) > 253:
            raise ConfigError("--node-name", node_name, "is not a node name that can name a Lease")
        if namespace is None:
            raise ConfigError(
                "--namespace", "", "required with an API client (or set POD_NAMESPACE)"
            )
    if not args.lease_renew_interval > 0:
        raise ConfigError("--lease-renew-interval", args.lease_renew_interval, "must be > 0")
    if args.host_key_secret is not None and not DNS_SUBDOMAIN.fullmatch(args.host_key_secret):
        raise ConfigError("--host-key-secret", args.host_key_secret, "is not a valid Secret name")
    if namespace is not None and not DNS_LABEL.fullmatch(namespace):
        raise ConfigError("--namespace", namespace, "is not a valid namespace name")
    if not 0 <= args.health_port <= 65535:
        raise ConfigError("--health-port", args.health_port, "must be 0 (off) to 65535")
    if args.host_key_poll_interval <= 0:
        raise ConfigError("--host-key-poll-interval", args.host_key_poll_interval, "must be > 0")
    if not args.rules_check_interval > 0:
        raise ConfigError("--rules-check-interval", args.rules_check_interval, "must be > 0")
    return GatewaySettings(
        config_path=args.config,
        host_key_path=args.host_key,
        manage_addresses=args.manage_addresses,
        reload_interval=args.reload_interval,
        log_level=args.log_level,
        iptables_backend=args.iptables_backend,
        host_key_secret=args.host_key_secret,
        namespace=namespace,
        kubeconfig=args.kubeconfig,
        host_key_poll_interval=args.host_key_poll_interval,
        wait_for_config=args.wait_for_config,
        health_host=args.health_host,
        health_port=args.health_port,
        snat_guard=args.snat_guard,
        rules_check_interval=args.rules_check_interval,
        node_name=node_name,
        lease_renew_interval=args.lease_renew_interval,
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
    # Everything that can be checked now is checked before any side effect.
    config, host_key = None, None
    if not settings.wait_for_config or settings.config_path.exists():
        config = load_gateway_config(settings.config_path)
    path = settings.host_key_path
    if path is not None and (not settings.wait_for_config or path.exists()):
        host_key = load_private_key(path, "--host-key")
    if settings.reports:
        load_credentials(settings.kubeconfig)  # a ConfigError names --kubeconfig
    setup_logging(settings.log_level)
    return run_agent(lambda: _serve(settings, config, host_key))


class _Readiness:
    """``/ready``: the reason the gateway waits, then the agent's own readiness."""

    def __init__(self) -> None:
        self.why = "starting"
        self.agent: GatewayAgent | None = None

    def __call__(self) -> tuple[bool, str]:
        if self.agent is None:
            return False, self.why
        return self.agent.readiness()

    def waiting(self, why: str) -> None:
        self.why = why


async def _serve(
    settings: GatewaySettings, config: GatewayConfig | None, host_key: asyncssh.SSHKey | None
) -> None:
    """Run until SIGTERM/SIGINT, which may come at any stage, waiting included."""
    body = asyncio.create_task(_gateway(settings, config, host_key))
    stop = asyncio.create_task(until_stopped())
    await asyncio.wait({body, stop}, return_when=asyncio.FIRST_COMPLETED)
    stop.cancel()
    body.cancel()  # a no-op if it ended (with a ConfigError) by itself
    with contextlib.suppress(asyncio.CancelledError):
        await body  # its own clean-up runs here; a ConfigError propagates (exit 2)


async def _wait_for_files(paths: list[Path], interval: float, ready: _Readiness) -> None:
    """Return once every path exists; nothing is installed meanwhile, so nothing leaks."""
    waiting = [p for p in paths if not p.exists()]
    if not waiting:
        return
    why = f"waiting for {', '.join(map(str, waiting))}"
    ready.waiting(why)
    log.info("%s (not ready meanwhile)", why)
    while any(not p.exists() for p in paths):
        await asyncio.sleep(interval)


async def _gateway(
    settings: GatewaySettings, config: GatewayConfig | None, host_key: asyncssh.SSHKey | None
) -> None:
    ready = _Readiness()
    health: asyncio.Server | None = None
    secret: HostKeySecret | None = None
    lease: StatusLease | None = None
    agent: GatewayAgent | None = None
    tasks: list[asyncio.Task[None]] = []

    # The watchers run only once the agent is up; these read ``agent`` when called.
    async def apply_config(new: GatewayConfig) -> None:
        assert agent is not None
        await agent.apply(new)

    async def replace_host_key(new: asyncssh.SSHKey) -> None:
        assert agent is not None
        await agent.replace_host_key(new)

    try:
        if settings.health_port:
            try:
                health = await serve_health(settings.health_host, settings.health_port, ready)
            except OSError as error:
                raise ConfigError(
                    "--health-port",
                    settings.health_port,
                    f"cannot listen on {settings.health_host}: {error.strerror or error}",
                ) from None
        key_path = settings.host_key_path
        await _wait_for_files(
            [settings.config_path, *([key_path] if key_path and host_key is None else [])],
            settings.reload_interval,
            ready,
        )
        # Watchers first: their digest is of content at most as new as what is loaded, so
        # a change between the two is applied (again) rather than missed.
        watcher = ConfigWatcher(
            settings.config_path, load_gateway_config, apply_config, settings.reload_interval
        )
        if config is None:
            config = load_gateway_config(settings.config_path)
        key_watcher: ConfigWatcher[asyncssh.SSHKey] | None = None
        if key_path is not None:
            key_watcher = ConfigWatcher(
                key_path,
                lambda path: load_private_key(path, "--host-key"),
                replace_host_key,
                settings.reload_interval,
            )
            if host_key is None:
                host_key = load_private_key(key_path, "--host-key")
        if settings.host_key_secret is not None:
            assert settings.namespace is not None
            kubeconfig = settings.kubeconfig
            secret = HostKeySecret(
                lambda: KubeClient(load_credentials(kubeconfig)),
                settings.namespace,
                settings.host_key_secret,
                settings.host_key_poll_interval,
            )
            host_key = await secret.load(ready.waiting)
        assert host_key is not None

        backend: iptables.Backend = (
            iptables.detect_backend()  # now, not at start: the node's rules may be in by now
            if settings.iptables_backend == "auto"
            else settings.iptables_backend  # type: ignore[assignment]
        )
        log.info("iptables backend: %s", backend)
        addresses = (
            IprouteAddresses(settings.manage_addresses) if settings.manage_addresses else None
        )
        if settings.reports:
            assert settings.namespace is not None
            assert settings.node_name is not None
            kubeconfig = settings.kubeconfig
            lease = StatusLease(
                lambda: KubeClient(load_credentials(kubeconfig)),
                settings.namespace,
                settings.node_name,
                settings.lease_renew_interval,
            )
        agent = GatewayAgent(
            config,
            host_key,
            addresses,
            firewalls(backend),
            snat_guard=settings.snat_guard,
            rules_check_interval=settings.rules_check_interval,
            on_failed=lease.report if lease is not None else None,
        )
        if not settings.snat_guard:
            log.warning("--no-snat-guard: the node's nat rules may rewrite the source IPs")
        await agent.start()
        ready.agent = agent

        watcher.install_sighup()
        tasks.append(asyncio.create_task(watcher.run()))
        if key_watcher is not None:
            tasks.append(asyncio.create_task(key_watcher.run()))
        if secret is not None:
            tasks.append(asyncio.create_task(secret.follow(replace_host_key)))
        if lease is not None:
            tasks.append(asyncio.create_task(lease.run()))
        log.info("gateway running with %d source IPs", len(config.sources))
        await asyncio.Event().wait()  # until cancelled (SIGTERM)
    finally:
        for task in tasks:
            task.cancel()
        if health is not None:
            health.close()
        if agent is not None:
            await agent.stop()
            log.info("gateway stopped")
        if lease is not None:
            await lease.release()  # after the stop: it serves nothing now
            await lease.close()
        if secret is not None:
            await secret.close()
