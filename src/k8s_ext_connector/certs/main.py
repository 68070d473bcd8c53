"""``k8s-ext-connector certs``: the webhook's CA and serving certificate.

``files`` writes them to a directory by hand (for a webhook run outside the cluster, or to
inspect); ``sync`` keeps two Secrets (``--ca-secret``: the CA's certificate and key, read
only by ``sync``; ``--secret``: the webhook's serving pair and the CA certificate, never the
CA key) and the MutatingWebhookConfiguration's caBundle current, once (a CronJob) or every
``--loop`` seconds (a Deployment). Both print what they did, never key material.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import logging
import os
import re
import signal
from fractions import Fraction
from pathlib import Path

from k8s_ext_connector.certs.rotation import (
    CA_CRT,
    CA_KEY,
    DEFAULT_RENEW_AT,
    TLS_CRT,
    TLS_KEY,
    SyncSettings,
    carry_out,
    plan_rotation,
    sync,
)
from k8s_ext_connector.certs.tls import Issued, service_dns_names, write_pair
from k8s_ext_connector.core.errors import ConfigError, TransientError
from k8s_ext_connector.core.fields import DNS_LABEL, DNS_SUBDOMAIN
from k8s_ext_connector.core.kube import ApiError, Credentials, KubeClient, load_credentials
from k8s_ext_connector.core.run import add_log_level, setup_logging

log = logging.getLogger(__name__)

DEFAULT_CA_DAYS = 3650
DEFAULT_DAYS = 365
PENDING_RETRY = 10.0  # seconds between rounds while a round failed or the config is missing
MAX_DAYS = 36500  # beyond this, not_valid_after runs into X.509's year 9999
MAX_SECONDS = 366 * 86400


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="certs_command", required=True, metavar="ACTION")

    files = actions.add_parser(
        "files", help="write ca.crt, ca.key, tls.crt, tls.key to a directory"
    )
    files.add_argument("--out", required=True, type=Path, help="directory (created if needed)")
    _add_common(files)

    sync_parser = actions.add_parser(
        "sync", help="keep the webhook CA and serving Secrets and the caBundle current"
    )
    sync_parser.add_argument(
        "--secret",
        required=True,
        help="Secret the webhook mounts: tls.crt, tls.key, ca.crt (never ca.key)",
    )
    sync_parser.add_argument(
        "--ca-secret",
        required=True,
        help="Secret holding the CA: ca.crt, ca.key (mount it nowhere; a ca.key found in"
        " --secret, from an older layout, is moved here)",
    )
    sync_parser.add_argument(
        "--webhook-config", required=True, help="MutatingWebhookConfiguration to keep trusted"
    )
    sync_parser.add_argument("--kubeconfig", help="default: in-cluster, then $KUBECONFIG")
    _add_common(sync_parser)
    sync_parser.add_argument(
        "--renew-fraction",
        default=str(DEFAULT_RENEW_AT),
        help="renew when less than this fraction of a lifetime is left (default: 1/3)",
    )
    sync_parser.add_argument(
        "--overlap",
        default="300",
        help="seconds a replaced CA stays in the caBundle after a new serving certificate, "
        "so the kubelet can deliver it to the webhook first (default: 300)",
    )
    sync_parser.add_argument(
        "--loop", metavar="SECONDS", help="run every SECONDS until SIGTERM (default: once)"
    )
    add_log_level(sync_parser)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--service", required=True, help="the webhook's Service name")
    parser.add_argument("--namespace", required=True, help="the webhook's (connector) namespace")
    parser.add_argument(
        "--ca-days", default=str(DEFAULT_CA_DAYS), help=f"CA lifetime (default: {DEFAULT_CA_DAYS})"
    )
    parser.add_argument(
        "--days",
        default=str(DEFAULT_DAYS),
        help=f"serving certificate lifetime, capped by the CA's (default: {DEFAULT_DAYS})",
    )


def _number(option: str, text: str) -> float:
    """A finite number; "1/3" is accepted too. A ConfigError names the option."""
    try:
        return float(Fraction(text))
    except (ValueError, ZeroDivisionError, OverflowError):
        raise ConfigError(option, text, "is not a number") from None


def _days(option: str, text: str) -> datetime.timedelta:
    days = _number(option, text)
    if not 0 < days <= MAX_DAYS:
        raise ConfigError(option, text, f"must be a number of days > 0 and <= {MAX_DAYS}")
    lifetime = datetime.timedelta(days=days)
    if lifetime < datetime.timedelta(seconds=1):
        raise ConfigError(option, text, "must be at least one second")
    return lifetime


def _seconds(option: str, text: str, allow_zero: bool) -> float:
    seconds = _number(option, text)
    if seconds < 0 or (seconds == 0 and not allow_zero) or seconds > MAX_SECONDS:
        low_text = ">= 0" if allow_zero else "> 0"
        raise ConfigError(
            option, text, f"must be a number of seconds {low_text} and <= {MAX_SECONDS}"
        )
    return seconds


def _name(option: str, value: str, pattern: re.Pattern[str], what: str) -> str:
    if not pattern.fullmatch(value):
        raise ConfigError(option, value, f"must be {what}")
    return value


def _label(option: str, value: str) -> str:
    return _name(option, value, DNS_LABEL, "a DNS label (lowercase letters, digits, '-')")


def _subdomain(option: str, value: str) -> str:
    return _name(
        option, value, DNS_SUBDOMAIN, "a DNS subdomain (lowercase letters, digits, '-', '.')"
    )


def run(args: argparse.Namespace) -> int:
    if args.certs_command == "files":
        return _files(args)
    return _sync(args)


# files


def _read_ca(directory: Path) -> Issued | None:
    """The CA already in ``directory``, if both halves are there (validity is the plan's)."""
    try:
        return Issued((directory / CA_CRT).read_bytes(), (directory / CA_KEY).read_bytes())
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ConfigError("--out", str(directory), error.strerror or "cannot be read") from None


def _writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError("--out", str(directory), error.strerror or "cannot be created") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError("--out", str(directory), "is not writable")


def _files(args: argparse.Namespace) -> int:
    directory: Path = args.out
    namespace = _label("--namespace", args.namespace)
    service = _label("--service", args.service)
    ca_lifetime, lifetime = _days("--ca-days", args.ca_days), _days("--days", args.days)
    _writable(directory)
    names = service_dns_names(service, namespace)
    existing = _read_ca(directory)
    now = datetime.datetime.now(datetime.UTC)
    # The same decisions as sync; the serving certificate is always fresh (that is the
    # point of running this by hand).
    plan = plan_rotation(existing, None, names, now, ca_lifetime, lifetime)
    certs = carry_out(plan, existing, None, names, ca_lifetime, lifetime)
    try:
        if plan.issue_ca:
            write_pair(directory, certs.ca, CA_CRT, CA_KEY)
        write_pair(directory, certs.serving, TLS_CRT, TLS_KEY)
    except OSError as error:
        raise ConfigError("--out", str(directory), error.strerror or "cannot be written") from None
    ca_cert, serving_cert = certs.ca.certificate, certs.serving.certificate
    ca_until = f"{ca_cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
    if plan.issue_ca:
        why = f" ({plan.reasons[0]})" if existing is not None else ""
        print(f"created CA {directory / CA_CRT}, {directory / CA_KEY} until {ca_until}{why}")
        if existing is not None:
            print("the CA changed: publish the new ca.crt as the webhook's caBundle")
    else:
        print(f"reused CA {directory / CA_CRT} (valid until {ca_until})")
    capped = (
        " (capped by the CA)"
        if serving_cert.not_valid_after_utc == ca_cert.not_valid_after_utc
        else ""
    )
    print(
        f"created serving certificate {directory / TLS_CRT}, {directory / TLS_KEY} for"
        f" {', '.join(names)} until {serving_cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}{capped}"
    )
    return 0


# sync


def settings_from(args: argparse.Namespace) -> SyncSettings:
    fraction = _number("--renew-fraction", args.renew_fraction)
    if not 0 < fraction < 1:
        raise ConfigError("--renew-fraction", args.renew_fraction, "must be between 0 and 1")
    secret = _subdomain("--secret", args.secret)
    ca_secret = _subdomain("--ca-secret", args.ca_secret)
    if ca_secret == secret:
        raise ConfigError("--ca-secret", ca_secret, "must differ from --secret")
    return SyncSettings(
        namespace=_label("--namespace", args.namespace),
        secret=secret,
        ca_secret=ca_secret,
        service=_label("--service", args.service),
        webhook_config=_subdomain("--webhook-config", args.webhook_config),
        ca_lifetime=_days("--ca-days", args.ca_days),
        serving_lifetime=_days("--days", args.days),
        renew_at_fraction=fraction,
        overlap=datetime.timedelta(seconds=_seconds("--overlap", args.overlap, True)),
    )


def _credentials(kubeconfig: str | None) -> Credentials:
    try:
        return load_credentials(kubeconfig)
    except (OSError, KeyError, StopIteration, TypeError, ValueError) as error:
        where = kubeconfig or "(in-cluster, $KUBECONFIG, ~/.kube/config)"
        reason = getattr(error, "strerror", None) or "is not a usable kubeconfig"
        raise ConfigError("--kubeconfig", where, reason) from None


def _sync(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    interval = None if args.loop is None else _seconds("--loop", args.loop, False)
    credentials = _credentials(args.kubeconfig)
    setup_logging(args.log_level)
    if interval is None:
        return asyncio.run(sync_once(credentials, settings))
    asyncio.run(_until_signalled(credentials, settings, interval))
    return 0


async def _until_signalled(
    credentials: Credentials, settings: SyncSettings, interval: float
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # kubelet stops containers with SIGTERM
        loop.add_signal_handler(sig, stop.set)
    await sync_forever(credentials, settings, interval, stop)


async def sync_once(credentials: Credentials, settings: SyncSettings) -> int:
    """One run; 1 if the API refused or failed (a CronJob's retry will try again)."""
    async with KubeClient(credentials) as client:
        try:
            result = await sync(client, settings)
        except (ApiError, TransientError) as error:
            log.error("certificate sync failed: %s", error)
            return 1
    print(f"{settings.namespace}/{settings.secret}: {result.summary()}")
    return 0


async def sync_forever(
    credentials: Credentials,
    settings: SyncSettings,
    interval: float,
    stop: asyncio.Event,
) -> None:
    """Sync every ``interval`` seconds until ``stop``; failures are logged and retried on
    the next round (a conflict means another replica has just written). While the round
    failed or the MutatingWebhookConfiguration is not there yet (a first install creates
    both at once), the next round comes after ``PENDING_RETRY`` seconds instead: an empty
    caBundle means pods start without their sidecar."""
    async with KubeClient(credentials) as client:
        while not stop.is_set():
            wait = interval
            try:
                result = await sync(client, settings)
                if result.changed or not result.webhook_config_found:
                    log.info("%s/%s: %s", settings.namespace, settings.secret, result.summary())
                if not result.webhook_config_found:
                    wait = min(interval, PENDING_RETRY)
            except (ApiError, TransientError) as error:
                wait = min(interval, PENDING_RETRY)
                log.warning("certificate sync failed, retrying in %ss: %s", wait, error)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=wait)
