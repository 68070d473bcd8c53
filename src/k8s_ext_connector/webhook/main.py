"""``k8s-ext-connector webhook``: flags, the watch cache, the HTTPS server, signals.

Wiring in ``cli.py``::

    webhook = commands.add_parser("webhook", help="the sidecar-injecting admission webhook")
    webhook_main.add_arguments(webhook)
    webhook.set_defaults(handler=webhook_main.run)

Bad flags raise ``ConfigError(field, value, reason)`` before anything listens.
The webhook is deployed with ``failurePolicy: Ignore``
(``charts/k8s-ext-connector/files/mutatingwebhookconfiguration.yaml``): while it is down,
pods start without the sidecar (never blocked cluster-wide), and the operator names them
in the ExternalService's status with the fix.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from k8s_ext_connector.core.errors import ConfigError
from k8s_ext_connector.core.kube import KubeClient, load_credentials
from k8s_ext_connector.core.run import add_log_level, run_agent, setup_logging, until_stopped
from k8s_ext_connector.webhook.cache import SourceCache, follow
from k8s_ext_connector.webhook.inject import InjectionSettings
from k8s_ext_connector.webhook.server import ServingCertificate, WebhookServer, serve_until

log = logging.getLogger(__name__)
DEFAULTS = InjectionSettings()
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
# A Kubernetes resource quantity: 100m, 0.5, 64Mi, 1G, 1e3 ...
_QUANTITY = re.compile(r"^[+]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_IMAGE = re.compile(r"^[^\s]+$")


@dataclass(frozen=True)
class WebhookCommand:
    tls_dir: Path
    host: str
    port: int
    kubeconfig: str | None
    injection: InjectionSettings
    drain_seconds: float
    log_level: str
    own_namespace_sources: bool = False

    @property
    def cert_path(self) -> Path:
        return self.tls_dir / "tls.crt"

    @property
    def key_path(self) -> Path:
        return self.tls_dir / "tls.key"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tls-dir",
        required=True,
        type=Path,
        help="directory with tls.crt and tls.key (a mounted Secret; reloaded on change)",
    )
    parser.add_argument("--host", default="0.0.0.0", help="listen address")
    parser.add_argument("--port", type=int, default=8443, help="HTTPS port")
    parser.add_argument("--kubeconfig", help="default: in-cluster, then $KUBECONFIG")
    parser.add_argument("--image", default=DEFAULTS.image, help="the sidecar's image")
    parser.add_argument(
        "--image-pull-policy", default=DEFAULTS.image_pull_policy, help="the sidecar's"
    )
    parser.add_argument(
        "--no-native-sidecar",
        action="store_true",
        help="inject a regular first container with a postStart wait instead of an init "
        "container with restartPolicy Always (Kubernetes < 1.29)",
    )
    parser.add_argument(
        "--sidecar-health-port",
        type=int,
        default=DEFAULTS.health_port,
        help="port of the sidecar's /ready probe",
    )
    parser.add_argument("--sidecar-cpu-request", default=DEFAULTS.cpu_request)
    parser.add_argument("--sidecar-memory-request", default=DEFAULTS.memory_request)
    parser.add_argument("--sidecar-cpu-limit", default=DEFAULTS.cpu_limit)
    parser.add_argument("--sidecar-memory-limit", default=DEFAULTS.memory_limit)
    parser.add_argument(
        "--own-namespace-sources",
        action="store_true",
        help="inject only for sources in the ExternalService's own namespace; must match "
        "the operator's flag of the same name",
    )
    parser.add_argument(
        "--drain-seconds",
        type=float,
        default=5.0,
        help="on SIGTERM, keep answering (not ready) this long before closing",
    )
    add_log_level(parser)


def _port(flag: str, value: int) -> int:
    if not 1 <= value <= 65535:
        raise ConfigError(flag, value, "must be a TCP port number 1-65535")
    return value


def _quantity(flag: str, value: str) -> str:
    if not _QUANTITY.match(value):
        raise ConfigError(flag, value, "must be a Kubernetes quantity such as 100m, 1 or 64Mi")
    return value


def command_from(args: argparse.Namespace) -> WebhookCommand:
    tls_dir = Path(args.tls_dir)
    if not tls_dir.is_dir():
        raise ConfigError("--tls-dir", str(tls_dir), "must be an existing directory")
    if not _IMAGE.match(args.image):
        raise ConfigError("--image", args.image, "must be an image reference without spaces")
    if args.image_pull_policy not in PULL_POLICIES:
        raise ConfigError(
            "--image-pull-policy", args.image_pull_policy, f"must be one of {PULL_POLICIES}"
        )
    if args.drain_seconds < 0:
        raise ConfigError("--drain-seconds", args.drain_seconds, "must not be negative")
    injection = InjectionSettings(
        image=args.image,
        image_pull_policy=args.image_pull_policy,
        native_sidecar=not args.no_native_sidecar,
        health_port=_port("--sidecar-health-port", args.sidecar_health_port),
        cpu_request=_quantity("--sidecar-cpu-request", args.sidecar_cpu_request),
        memory_request=_quantity("--sidecar-memory-request", args.sidecar_memory_request),
        cpu_limit=_quantity("--sidecar-cpu-limit", args.sidecar_cpu_limit),
        memory_limit=_quantity("--sidecar-memory-limit", args.sidecar_memory_limit),
    )
    return WebhookCommand(
        tls_dir=tls_dir,
        host=args.host,
        port=_port("--port", args.port),
        kubeconfig=args.kubeconfig,
        injection=injection,
        drain_seconds=float(args.drain_seconds),
        log_level=args.log_level,
        own_namespace_sources=args.own_namespace_sources,
    )


def run(args: argparse.Namespace) -> int:
    command = command_from(args)
    setup_logging(command.log_level)
    return run_agent(lambda: serve(command))


async def serve(
    command: WebhookCommand,
    stop: asyncio.Event | None = None,
    listening: Callable[[WebhookServer], None] | None = None,
) -> None:
    """Fill the cache, serve until SIGTERM/SIGINT (or ``stop``), drain, close.

    ``listening`` is called once the HTTPS listener is up (tests learn the port from it).
    """
    credentials = load_credentials(command.kubeconfig)
    cache = SourceCache(command.own_namespace_sources)
    certificate = ServingCertificate(command.cert_path, command.key_path)
    server = WebhookServer(cache, command.injection, certificate)
    if stop is None:
        stop = asyncio.Event()
        signals = asyncio.create_task(until_stopped())
        signals.add_done_callback(lambda _: stop.set())
    async with KubeClient(credentials) as client:
        watching = asyncio.create_task(follow(cache, client), name="webhook-cache")
        try:
            await server.start(command.host, command.port)
            if listening is not None:
                listening(server)
            await serve_until(server, stop, command.drain_seconds)
        finally:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
