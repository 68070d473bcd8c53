"""Keep the webhook's CA, serving certificate and the API server's caBundle current.

Two halves. ``plan_rotation`` is pure: from the certificates on record and the clock it
decides what to reissue and why, so every reason to rotate is table-tested without an
API server. ``sync`` applies a plan to the cluster.

State lives in two Secrets in the connector namespace:

- the CA Secret (``--ca-secret``, type ``Opaque``): ``ca.crt`` and ``ca.key``. Only the
  certs component reads or writes it, through the API; no pod mounts it, so the CA key
  never reaches a node (a kubelet fetches a mounted Secret whole, ``items`` or not);
- the serving Secret (``--secret``, type ``kubernetes.io/tls``): ``tls.crt``/``tls.key``
  for the webhook server and ``ca.crt`` (the CA that signed them, for a ServiceMonitor to
  verify with: cert-manager's layout). Never ``ca.key``.

An older layout kept ``ca.key`` in the serving Secret; ``sync`` moves it (CA Secret written
first, then ``ca.key`` removed from the serving Secret, so a crash in between loses
nothing). The webhook reloads ``tls.crt``/``tls.key`` when the kubelet updates its mounted
copy, which takes up to a minute or two. Hence the order of a rotation:

1. publish the caBundle (new CA *and* the old one) in every webhook of the
   MutatingWebhookConfiguration, so the API server trusts both certificates the webhook
   may be serving during the switch;
2. write the CA Secret, then the serving Secret (optimistic concurrency: of two concurrent
   syncs, one wins; the CA first, so a serving certificate is never stored whose CA key
   could be lost);
3. on a later run, drop the old CA from the bundle. With ``overlap`` (the applier's
   default: five minutes), CAs already published stay while the serving certificate is
   younger than that, so a quick rerun cannot drop a CA the webhook still depends on (nor
   one a run interrupted between the two writes left the webhook serving).
"""

from __future__ import annotations

import base64
import binascii
import copy
import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from k8s_ext_connector.certs.tls import (
    Issued,
    backdate,
    dns_names_of,
    generate_ca,
    is_ca,
    issue_serving_cert,
    key_matches,
    load_certificates,
    remaining_fraction,
    service_dns_names,
    signed_by,
    to_pem,
)
from k8s_ext_connector.core.kube import SECRETS, KubeClient, NotFound, Resource

MUTATING_WEBHOOK_CONFIGURATIONS = Resource(
    "admissionregistration.k8s.io", "v1", "mutatingwebhookconfigurations", namespaced=False
)
CA_CRT, CA_KEY, TLS_CRT, TLS_KEY = "ca.crt", "ca.key", "tls.crt", "tls.key"
DEFAULT_RENEW_AT = 1 / 3
DEFAULT_CA_NAME = "k8s-ext-connector webhook CA"
_SHA256 = hashes.SHA256()


@dataclass(frozen=True)
class RotationPlan:
    """What to reissue, why, and which other CAs the caBundle must still carry.

    The bundle itself depends on a CA that may not exist yet: ``ca_bundle(ca_pem)``.
    """

    issue_ca: bool
    issue_serving: bool
    reasons: tuple[str, ...] = ()
    also_trusted: tuple[bytes, ...] = field(default=(), repr=False)  # PEM, after the CA

    @property
    def due(self) -> bool:
        return self.issue_ca or self.issue_serving

    def ca_bundle(self, ca_pem: bytes) -> bytes:
        return ca_pem + b"".join(self.also_trusted)


def _certificate(issued: Issued | None) -> x509.Certificate | None:
    if issued is None:
        return None
    try:
        return issued.certificate
    except ValueError:
        return None


def _expiring(
    cert: x509.Certificate, now: datetime.datetime, fraction: float, what: str
) -> str | None:
    left = remaining_fraction(cert, now)
    if cert.not_valid_after_utc <= now:
        return f"{what} expired at {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
    if left < fraction:
        return (
            f"{what} expires at {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
            f" ({left:.0%} of its lifetime left, renewing below {fraction:.0%})"
        )
    return None


def _human(span: datetime.timedelta) -> str:
    seconds = span.total_seconds()
    return f"{seconds / 86400:g} days" if seconds >= 86400 else f"{seconds:g} s"


def _too_long(cert: x509.Certificate, lifetime: datetime.timedelta, what: str) -> str | None:
    """Makes a shortened lifetime take effect (allowing for the backdating and a second)."""
    span = cert.not_valid_after_utc - cert.not_valid_before_utc
    limit = lifetime + backdate(lifetime)  # X.509 times have whole seconds, hence the 1 s
    if span > limit + datetime.timedelta(seconds=1):
        return f"{what} lifetime {_human(span)} is longer than the configured {_human(lifetime)}"
    return None


def _ca_problem(
    ca: Issued | None,
    cert: x509.Certificate | None,
    now: datetime.datetime,
    lifetime: datetime.timedelta,
    fraction: float,
) -> str | None:
    if ca is None:
        return "CA missing"
    if cert is None:
        return "CA certificate is not PEM"
    if not is_ca(cert):
        return "CA certificate is not a CA (basicConstraints)"
    if not key_matches(ca):
        return "CA key does not match its certificate"
    if cert.not_valid_before_utc > now:
        return "CA is not valid yet (clock skew?)"
    return _expiring(cert, now, fraction, "CA") or _too_long(cert, lifetime, "CA")


def _serving_problem(
    serving: Issued | None,
    cert: x509.Certificate | None,
    ca_cert: x509.Certificate | None,
    dns_names: Sequence[str],
    now: datetime.datetime,
    lifetime: datetime.timedelta,
    fraction: float,
) -> str | None:
    if serving is None:
        return "serving certificate missing"
    if cert is None:
        return "serving certificate is not PEM"
    if ca_cert is None or not signed_by(cert, ca_cert):
        return "serving certificate is not signed by the current CA"
    if not key_matches(serving):
        return "serving key does not match its certificate"
    if sorted(dns_names_of(cert)) != sorted(dns_names):
        return f"serving certificate names {dns_names_of(cert)} differ from {list(dns_names)}"
    if cert.not_valid_before_utc > now:
        return "serving certificate is not valid yet (clock skew?)"
    return _expiring(cert, now, fraction, "serving certificate") or _too_long(
        cert, lifetime, "serving certificate"
    )


def plan_rotation(
    ca: Issued | None,
    serving: Issued | None,
    dns_names: Sequence[str],
    now: datetime.datetime,
    ca_lifetime: datetime.timedelta,
    serving_lifetime: datetime.timedelta,
    renew_at_fraction: float = DEFAULT_RENEW_AT,
    *,
    published: Sequence[x509.Certificate] = (),
    overlap: datetime.timedelta = datetime.timedelta(0),
) -> RotationPlan:
    """Decide what to reissue.

    A new CA when it is missing, unusable, not a CA, expiring (less than
    ``renew_at_fraction`` of its lifetime left) or longer-lived than ``ca_lifetime``. A new
    serving certificate for the same reasons, when not signed by the (new) CA, or when its
    DNS names differ. During a CA rotation the old CA stays in the bundle (if still valid)
    until the next run; with ``overlap``, any still-valid CA in ``published`` (the bundle
    on the webhooks now) also stays while the serving certificate is that young.
    """
    ca_cert = _certificate(ca)
    reasons: list[str] = []
    ca_reason = _ca_problem(ca, ca_cert, now, ca_lifetime, renew_at_fraction)
    if ca_reason:
        reasons.append(ca_reason)
    serving_cert = _certificate(serving)
    serving_reason = (
        "serving certificate must be signed by the new CA"
        if ca_reason
        else _serving_problem(
            serving,
            serving_cert,
            ca_cert,
            dns_names,
            now,
            serving_lifetime,
            renew_at_fraction,
        )
    )
    if serving_reason:
        reasons.append(serving_reason)

    def usable(cert: x509.Certificate) -> bool:
        return is_ca(cert) and cert.not_valid_before_utc <= now < cert.not_valid_after_utc

    keep: list[x509.Certificate] = []
    if ca_reason and ca_cert is not None and usable(ca_cert):
        keep.append(ca_cert)  # the old serving certificate is still served for a while
    young = serving_reason is not None or (
        serving_cert is not None and now < serving_cert.not_valid_before_utc + overlap
    )
    if overlap > datetime.timedelta(0) and young:
        keep.extend(c for c in published if usable(c))
    current = None if ca_reason else ca_cert
    seen: set[bytes] = set() if current is None else {current.fingerprint(_SHA256)}
    also: list[bytes] = []
    for cert in keep:
        fingerprint = cert.fingerprint(_SHA256)
        if fingerprint not in seen:
            seen.add(fingerprint)
            also.append(to_pem([cert]))
    return RotationPlan(
        issue_ca=ca_reason is not None,
        issue_serving=serving_reason is not None,
        reasons=tuple(reasons),
        also_trusted=tuple(also),
    )


@dataclass(frozen=True)
class Certificates:
    """The outcome of a plan: what the Secret holds and what the webhooks must trust."""

    ca: Issued
    serving: Issued
    ca_bundle: bytes

    def __repr__(self) -> str:  # no key material, not even via Issued
        return f"Certificates(ca_bundle={len(load_certificates(self.ca_bundle))} certificates)"


def carry_out(
    plan: RotationPlan,
    ca: Issued | None,
    serving: Issued | None,
    dns_names: Sequence[str],
    ca_lifetime: datetime.timedelta,
    serving_lifetime: datetime.timedelta,
    ca_name: str = DEFAULT_CA_NAME,
) -> Certificates:
    """Issue what ``plan`` says (the only step that makes keys)."""
    if plan.issue_ca or ca is None:
        ca = generate_ca(ca_name, ca_lifetime)
    if plan.issue_serving or serving is None:
        serving = issue_serving_cert(ca, list(dns_names), serving_lifetime)
    return Certificates(ca, serving, plan.ca_bundle(ca.cert_pem))


# The applier.


@dataclass(frozen=True)
class SyncSettings:
    namespace: str
    secret: str  # the serving Secret: tls.crt, tls.key, ca.crt (mounted by the webhook)
    ca_secret: str  # the CA Secret: ca.crt, ca.key (never mounted)
    service: str
    webhook_config: str
    ca_lifetime: datetime.timedelta = datetime.timedelta(days=3650)
    serving_lifetime: datetime.timedelta = datetime.timedelta(days=365)
    renew_at_fraction: float = DEFAULT_RENEW_AT
    overlap: datetime.timedelta = datetime.timedelta(minutes=5)

    def __post_init__(self) -> None:
        if self.secret == self.ca_secret:
            raise ValueError("the CA Secret must not be the serving Secret")

    @property
    def dns_names(self) -> list[str]:
        return service_dns_names(self.service, self.namespace)


@dataclass(frozen=True)
class SyncResult:
    reasons: tuple[str, ...]
    secret_written: bool  # the serving Secret
    patched_webhooks: tuple[str, ...]
    webhook_config_found: bool
    ca_secret_written: bool = False
    moved_ca_key: bool = False  # ca.key taken out of the serving Secret (older layout)

    @property
    def changed(self) -> bool:
        return self.secret_written or self.ca_secret_written or bool(self.patched_webhooks)

    def summary(self) -> str:
        parts = []
        if self.reasons:
            parts.append("reissued: " + "; ".join(self.reasons))
        if self.moved_ca_key:
            parts.append("moved ca.key from the serving Secret to the CA Secret")
        if not self.reasons and (self.secret_written or self.ca_secret_written):
            written = [
                what
                for what, done in (("CA", self.ca_secret_written), ("serving", self.secret_written))
                if done
            ]
            parts.append(f"rewrote the {' and '.join(written)} Secret")
        if self.patched_webhooks:
            parts.append("caBundle updated in " + ", ".join(self.patched_webhooks))
        if not self.webhook_config_found:
            parts.append("MutatingWebhookConfiguration not found (caBundle not published)")
        return ". ".join(parts) if parts else "nothing due"


def _decode(data: dict[str, Any], key: str) -> bytes | None:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


def _pair(data: dict[str, Any], cert_key: str, key_key: str) -> Issued | None:
    cert, key = _decode(data, cert_key), _decode(data, key_key)
    return Issued(cert, key) if cert and key else None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _data(secret: dict[str, Any] | None) -> dict[str, Any]:
    return (secret or {}).get("data") or {}


async def _get(
    client: KubeClient, resource: Resource, namespace: str | None, name: str
) -> dict[str, Any] | None:
    try:
        return await client.get(resource, namespace, name)
    except NotFound:
        return None


def _published(config: dict[str, Any] | None) -> list[x509.Certificate]:
    found: dict[bytes, x509.Certificate] = {}
    for webhook in (config or {}).get("webhooks") or []:
        bundle = _decode((webhook.get("clientConfig") or {}), "caBundle") or b""
        for cert in load_certificates(bundle):
            found.setdefault(cert.fingerprint(_SHA256), cert)
    return list(found.values())


async def _publish(client: KubeClient, config: dict[str, Any], bundle: bytes) -> tuple[str, ...]:
    """Set caBundle in every webhook that differs, in one patch guarded by resourceVersion
    (a merge patch replaces the whole list, so a concurrent edit must make it fail)."""
    wanted = _b64(bundle)
    webhooks = copy.deepcopy(config.get("webhooks") or [])
    changed = []
    for webhook in webhooks:
        client_config = webhook.setdefault("clientConfig", {})
        if client_config.get("caBundle") != wanted:
            client_config["caBundle"] = wanted
            changed.append(str(webhook.get("name", "?")))
    if changed:
        metadata = config["metadata"]
        await client.merge_patch(
            MUTATING_WEBHOOK_CONFIGURATIONS,
            None,
            metadata["name"],
            {"metadata": {"resourceVersion": metadata["resourceVersion"]}, "webhooks": webhooks},
        )
    return tuple(changed)


@dataclass(frozen=True)
class _Wanted:
    """What one Secret must hold (and must not), and how to create it if it is missing."""

    name: str
    data: dict[str, bytes] = field(repr=False)
    type: str
    component: str
    drop: tuple[str, ...] = ()

    def differs(self, secret: dict[str, Any] | None) -> bool:
        data = _data(secret)
        return (
            secret is None
            or any(_decode(data, key) != value for key, value in self.data.items())
            or any(key in data for key in self.drop)
        )


async def _write_secret(
    client: KubeClient, namespace: str, secret: dict[str, Any] | None, wanted: _Wanted
) -> None:
    data = {key: _b64(value) for key, value in wanted.data.items()}
    if secret is None:
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": wanted.name,
                "namespace": namespace,
                "labels": {
                    "app.kubernetes.io/name": "k8s-ext-connector",
                    "app.kubernetes.io/component": wanted.component,
                },
            },
            "type": wanted.type,
            "data": data,
        }
        await client.create(SECRETS, namespace, body)
        return
    # Replace, keeping labels, annotations, other keys and the (immutable) type; the
    # resourceVersion it carries makes a concurrent writer's update fail instead of mixing.
    body = copy.deepcopy(secret)
    kept = {k: v for k, v in (secret.get("data") or {}).items() if k not in wanted.drop}
    body["data"] = {**kept, **data}
    body.pop("stringData", None)
    await client.replace(SECRETS, namespace, wanted.name, body)


async def sync(
    client: KubeClient, settings: SyncSettings, now: datetime.datetime | None = None
) -> SyncResult:
    """Read both Secrets and the webhook configuration, plan, and write only what changed.

    The CA comes from the CA Secret or, while the serving Secret still has the older
    layout (``ca.key`` in it) and the CA Secret has no CA yet, from the serving Secret.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    ca_secret = await _get(client, SECRETS, settings.namespace, settings.ca_secret)
    secret = await _get(client, SECRETS, settings.namespace, settings.secret)
    data = _data(secret)
    ca = _pair(_data(ca_secret), CA_CRT, CA_KEY) or _pair(data, CA_CRT, CA_KEY)
    serving = _pair(data, TLS_CRT, TLS_KEY)
    config = await _get(client, MUTATING_WEBHOOK_CONFIGURATIONS, None, settings.webhook_config)
    plan = plan_rotation(
        ca,
        serving,
        settings.dns_names,
        now,
        settings.ca_lifetime,
        settings.serving_lifetime,
        settings.renew_at_fraction,
        published=_published(config),
        overlap=settings.overlap,
    )
    certs = carry_out(
        plan, ca, serving, settings.dns_names, settings.ca_lifetime, settings.serving_lifetime
    )
    wanted_ca = _Wanted(
        settings.ca_secret,
        {CA_CRT: certs.ca.cert_pem, CA_KEY: certs.ca.key_pem},
        "Opaque",
        "certs",
    )
    wanted_serving = _Wanted(
        settings.secret,
        {
            TLS_CRT: certs.serving.cert_pem,
            TLS_KEY: certs.serving.key_pem,
            CA_CRT: certs.ca.cert_pem,
        },
        "kubernetes.io/tls",
        "webhook",
        drop=(CA_KEY,),
    )
    patched = await _publish(client, config, certs.ca_bundle) if config is not None else ()
    write_ca, write_serving = wanted_ca.differs(ca_secret), wanted_serving.differs(secret)
    if write_ca:  # first: the serving Secret may hold the only other copy of the CA key
        await _write_secret(client, settings.namespace, ca_secret, wanted_ca)
    if write_serving:
        await _write_secret(client, settings.namespace, secret, wanted_serving)
    return SyncResult(
        plan.reasons,
        write_serving,
        patched,
        config is not None,
        ca_secret_written=write_ca,
        moved_ca_key=CA_KEY in data,
    )
