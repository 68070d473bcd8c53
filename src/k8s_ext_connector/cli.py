"""``k8s-ext-connector``: one command, a subcommand per component.

Invalid input of any subcommand ends with one line naming the field and value, exit 2,
before any side effect (no iptables rule, address or listener is touched).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from k8s_ext_connector import __version__
from k8s_ext_connector.core.errors import ConfigError

EXIT_INVALID = 2


def _keygen(args: argparse.Namespace) -> int:
    from k8s_ext_connector.certs.ssh import generate_key_pair, write_private_key

    pair = generate_key_pair()
    write_private_key(args.out, pair)
    print(pair.public_openssh)
    return 0


def _wait_ready(args: argparse.Namespace) -> int:
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{args.port}/ready", timeout=1):
                return 0
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    print(f"k8s-ext-connector wait-ready: not ready after {args.timeout}s", file=sys.stderr)
    return 1


def _rbac(args: argparse.Namespace) -> int:
    from k8s_ext_connector.operator import rbac

    if args.component == "rules":
        print(rbac.render_chart_rules(), end="")
    else:
        print(rbac.render(args.component), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from k8s_ext_connector.certs import main as certs_main
    from k8s_ext_connector.gateway import main as gateway_main
    from k8s_ext_connector.operator import main as operator_main
    from k8s_ext_connector.sidecar import main as sidecar_main
    from k8s_ext_connector.webhook import main as webhook_main
    from k8s_ext_connector.webhook import manifests as inject_main

    parser = argparse.ArgumentParser(prog="k8s-ext-connector", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)

    gateway = commands.add_parser("gateway", help="SSH gateway holding source IPs")
    gateway_main.add_arguments(gateway)
    gateway.set_defaults(handler=lambda a: gateway_main.run(gateway_main.settings_from(a)))

    sidecar = commands.add_parser("sidecar", help="per-pod forwarder (needs NET_ADMIN)")
    sidecar_main.add_arguments(sidecar)
    sidecar.set_defaults(handler=lambda a: sidecar_main.run(sidecar_main.settings_from(a)))

    operator = commands.add_parser("operator", help="the kopf operator (control plane)")
    operator_main.add_arguments(operator)
    operator.set_defaults(handler=operator_main.run)

    certs = commands.add_parser("certs", help="webhook CA and serving certificate (files, sync)")
    certs_main.add_arguments(certs)
    certs.set_defaults(handler=certs_main.run)

    webhook = commands.add_parser("webhook", help="the sidecar-injecting admission webhook")
    webhook_main.add_arguments(webhook)
    webhook.set_defaults(handler=webhook_main.run)

    inject = commands.add_parser("inject", help="print manifests with the sidecar injected")
    inject_main.add_arguments(inject)
    inject.set_defaults(handler=inject_main.run)

    wait_ready = commands.add_parser(
        "wait-ready", help="block until the local sidecar is ready (postStart hook fallback)"
    )
    wait_ready.add_argument("--port", type=int, default=15021)
    wait_ready.add_argument("--timeout", type=float, default=300)
    wait_ready.set_defaults(handler=_wait_ready)

    rbac = commands.add_parser(
        "rbac", help="print the RBAC a component needs (YAML); 'rules': the chart's rules file"
    )
    rbac.add_argument("component", choices=["operator", "webhook", "certs", "gateway", "rules"])
    rbac.set_defaults(handler=_rbac)

    keygen = commands.add_parser("keygen", help="write an Ed25519 SSH key pair (FILE, FILE.pub)")
    keygen.add_argument("--out", required=True, type=Path)
    keygen.set_defaults(handler=_keygen)

    lab = commands.add_parser("lab", help="the seed's walkthrough on network namespaces (root)")
    try:
        from k8s_ext_connector.lab import main as lab_main
    except ImportError as error:
        # The image holds the product only: the lab needs the development checkout's
        # k8s_ext_connector_testbed. Every other subcommand must still work there.
        missing = str(error)
        lab.add_argument("rest", nargs=argparse.REMAINDER)
        lab.set_defaults(handler=lambda a: _lab_unavailable(missing))
    else:
        lab_main.add_arguments(lab)
        lab.set_defaults(handler=lab_main.run)
    return parser


def _lab_unavailable(missing: str) -> int:
    print(
        f"k8s-ext-connector lab: not available here ({missing}); run it from a checkout "
        "after `make install`",
        file=sys.stderr,
    )
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ConfigError as error:
        print(f"k8s-ext-connector {args.command}: error: {error}", file=sys.stderr)
        return EXIT_INVALID
