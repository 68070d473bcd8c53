"""Webhook certificates: the pure rotation plan (every reason to rotate, and not to), the
certificates' properties, and ``certs files`` / option validation of ``certs sync``.

The plan takes ``now`` as a parameter, so "expiring" and "expired" are tested by asking
about a later moment, not by waiting.
"""

from __future__ import annotations

import argparse
import datetime
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from k8s_ext_connector.certs import main as certs_main
from k8s_ext_connector.certs.rotation import (
    Certificates,
    RotationPlan,
    SyncSettings,
    carry_out,
    plan_rotation,
)
from k8s_ext_connector.certs.tls import (
    Issued,
    dns_names_of,
    generate_ca,
    issue_serving_cert,
    load_certificates,
    remaining_fraction,
    service_dns_names,
    signed_by,
    write_pair,
)
from k8s_ext_connector.core.errors import ConfigError

DAY = datetime.timedelta(days=1)
CA_LIFE, SERVING_LIFE = 30 * DAY, 3 * DAY
NAMES = service_dns_names("webhook", "external-services")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True)
class World:
    """Certificates issued once per module; cases pick and combine them."""

    ca: Issued
    serving: Issued
    other_ca: Issued
    foreign_serving: Issued  # right names, wrong CA
    other_names: Issued  # right CA, another Service
    issued_at: datetime.datetime


@pytest.fixture(scope="module")
def world() -> World:
    issued_at = _now()
    ca = generate_ca("test CA", CA_LIFE)
    other_ca = generate_ca("other CA", CA_LIFE)
    return World(
        ca=ca,
        serving=issue_serving_cert(ca, NAMES, SERVING_LIFE),
        other_ca=other_ca,
        foreign_serving=issue_serving_cert(other_ca, NAMES, SERVING_LIFE),
        other_names=issue_serving_cert(ca, service_dns_names("other", "ns"), SERVING_LIFE),
        issued_at=issued_at,
    )


GARBAGE = Issued(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n", b"x")


@dataclass(frozen=True)
class Case:
    """Inputs as functions of the world; what the plan must decide; a word of the reason."""

    ca: Callable[[World], Issued | None]
    serving: Callable[[World], Issued | None]
    later: datetime.timedelta = datetime.timedelta(0)  # "now" = issue time + later
    issue_ca: bool = False
    issue_serving: bool = False
    reason: str = ""
    keeps_old_ca: bool = False
    serving_lifetime: datetime.timedelta = SERVING_LIFE


def _ca(w: World) -> Issued:
    return w.ca


def _serving(w: World) -> Issued:
    return w.serving


def _none(w: World) -> None:
    return None


CASES = {
    "all current: nothing to do": Case(_ca, _serving),
    "just before the serving renew point": Case(_ca, _serving, later=SERVING_LIFE * 0.6),
    "nothing on record": Case(_none, _none, issue_ca=True, issue_serving=True, reason="CA missing"),
    "serving certificate missing": Case(_ca, _none, issue_serving=True, reason="missing"),
    "serving expiring (less than a third left)": Case(
        _ca, _serving, later=SERVING_LIFE * 0.7, issue_serving=True, reason="lifetime left"
    ),
    "serving expired": Case(
        _ca, _serving, later=SERVING_LIFE * 1.1, issue_serving=True, reason="expired"
    ),
    "serving signed by another CA": Case(
        _ca, lambda w: w.foreign_serving, issue_serving=True, reason="not signed by the current"
    ),
    "serving names differ": Case(_ca, lambda w: w.other_names, issue_serving=True, reason="differ"),
    "serving key does not match": Case(
        _ca,
        lambda w: Issued(w.serving.cert_pem, w.other_names.key_pem),
        issue_serving=True,
        reason="key does not match",
    ),
    "serving not PEM": Case(_ca, lambda w: GARBAGE, issue_serving=True, reason="not PEM"),
    "serving lifetime shortened in the settings": Case(
        _ca, _serving, serving_lifetime=DAY, issue_serving=True, reason="longer than"
    ),
    "CA expiring: both reissued, old CA kept in the bundle": Case(
        _ca,
        _serving,
        later=CA_LIFE * 0.7,
        issue_ca=True,
        issue_serving=True,
        reason="CA expires",
        keeps_old_ca=True,
    ),
    "CA expired: nothing worth keeping": Case(
        _ca, _serving, later=CA_LIFE * 1.1, issue_ca=True, issue_serving=True, reason="expired"
    ),
    "CA is not a CA": Case(
        lambda w: w.serving, _serving, issue_ca=True, issue_serving=True, reason="not a CA"
    ),
    "CA key does not match": Case(
        lambda w: Issued(w.ca.cert_pem, w.other_ca.key_pem),
        _serving,
        issue_ca=True,
        issue_serving=True,
        reason="CA key does not match",
        keeps_old_ca=True,
    ),
    "CA not PEM": Case(
        lambda w: GARBAGE, _serving, issue_ca=True, issue_serving=True, reason="not PEM"
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_plan(world: World, case: Case) -> None:
    plan = plan_rotation(
        case.ca(world),
        case.serving(world),
        NAMES,
        world.issued_at + case.later,
        CA_LIFE,
        case.serving_lifetime,
    )
    assert (plan.issue_ca, plan.issue_serving) == (case.issue_ca, case.issue_serving)
    assert plan.due == (case.issue_ca or case.issue_serving)
    if case.reason:
        assert any(case.reason in r for r in plan.reasons), plan.reasons
    else:
        assert plan.reasons == ()
    assert plan.also_trusted == ((world.ca.cert_pem,) if case.keeps_old_ca else ())


def _trusted(serving: Issued, bundle: bytes) -> bool:
    return any(signed_by(serving.certificate, ca) for ca in load_certificates(bundle))


def test_ca_rotation_keeps_the_old_ca_for_one_run_then_drops_it(world: World) -> None:
    plan = plan_rotation(
        world.ca, world.serving, NAMES, world.issued_at + CA_LIFE * 0.7, CA_LIFE, SERVING_LIFE
    )
    rotated = carry_out(plan, world.ca, world.serving, NAMES, CA_LIFE, SERVING_LIFE)
    assert rotated.ca != world.ca
    assert rotated.serving != world.serving
    bundle = load_certificates(rotated.ca_bundle)
    assert bundle == [rotated.ca.certificate, world.ca.certificate]  # new first
    # While the webhook may still serve the old certificate, both are trusted.
    assert _trusted(world.serving, rotated.ca_bundle)
    assert _trusted(rotated.serving, rotated.ca_bundle)

    following = plan_rotation(rotated.ca, rotated.serving, NAMES, _now(), CA_LIFE, SERVING_LIFE)
    assert not following.due
    assert following.ca_bundle(rotated.ca.cert_pem) == rotated.ca.cert_pem  # old CA dropped
    assert not _trusted(world.serving, following.ca_bundle(rotated.ca.cert_pem))


def test_overlap_keeps_published_cas_while_the_serving_certificate_is_young(
    world: World,
) -> None:
    rotated = carry_out(
        plan_rotation(
            world.ca, world.serving, NAMES, world.issued_at + CA_LIFE * 0.7, CA_LIFE, SERVING_LIFE
        ),
        world.ca,
        world.serving,
        NAMES,
        CA_LIFE,
        SERVING_LIFE,
    )
    published = load_certificates(rotated.ca_bundle)
    overlap = datetime.timedelta(minutes=5)

    def plan_at(now: datetime.datetime) -> RotationPlan:
        return plan_rotation(
            rotated.ca,
            rotated.serving,
            NAMES,
            now,
            CA_LIFE,
            SERVING_LIFE,
            published=published,
            overlap=overlap,
        )

    soon = plan_at(_now())
    assert not soon.due
    assert soon.ca_bundle(rotated.ca.cert_pem) == rotated.ca_bundle  # unchanged: no patch
    later = plan_at(_now() + 2 * overlap)
    assert later.ca_bundle(rotated.ca.cert_pem) == rotated.ca.cert_pem


def test_overlap_ignores_expired_and_non_ca_certificates(world: World) -> None:
    published = [world.serving.certificate, world.other_ca.certificate]
    young = plan_rotation(
        world.ca,
        world.serving,
        NAMES,
        world.issued_at,
        CA_LIFE,
        SERVING_LIFE,
        published=published,
        overlap=DAY,
    )
    assert young.also_trusted == (world.other_ca.cert_pem,)
    expired = plan_rotation(
        world.ca,
        None,
        NAMES,
        world.issued_at + CA_LIFE * 0.5,
        CA_LIFE,
        CA_LIFE,
        published=[generate_ca("old", DAY).certificate],
        overlap=DAY,
    )
    assert expired.issue_serving
    assert expired.also_trusted == ()


def test_carry_out_issues_only_what_the_plan_says(world: World) -> None:
    nothing = carry_out(RotationPlan(False, False), world.ca, world.serving, NAMES, DAY, DAY)
    assert (nothing.ca, nothing.serving, nothing.ca_bundle) == (
        world.ca,
        world.serving,
        world.ca.cert_pem,
    )
    serving_only = carry_out(RotationPlan(False, True), world.ca, world.serving, NAMES, DAY, DAY)
    assert serving_only.ca == world.ca
    assert serving_only.serving != world.serving


# Certificate properties.


def test_ca_properties(world: World) -> None:
    cert = world.ca.certificate
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca
    assert constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    assert usage.crl_sign
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert signed_by(cert, cert)  # self-signed


def test_serving_properties(world: World) -> None:
    cert = world.serving.certificate
    assert dns_names_of(cert) == NAMES
    assert NAMES[0] == "webhook.external-services.svc"  # the name the API server dials
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert signed_by(cert, world.ca.certificate)
    assert not signed_by(cert, world.other_ca.certificate)


def test_serving_certificate_never_outlives_its_ca() -> None:
    ca = generate_ca("short CA", DAY)
    serving = issue_serving_cert(ca, NAMES, 10 * DAY)
    assert serving.certificate.not_valid_after_utc == ca.certificate.not_valid_after_utc


def test_short_lived_certificates_start_with_most_of_their_lifetime_left() -> None:
    """The backdate (a minute against clock skew) shrinks with the lifetime, else a 6 s
    certificate would be "expiring" at birth and rotate on every run."""
    ca = generate_ca("seconds CA", datetime.timedelta(seconds=6))
    assert remaining_fraction(ca.certificate) > 0.75  # X.509 times have whole seconds
    long_lived = generate_ca("year CA", 365 * DAY).certificate
    backdate = datetime.timedelta(minutes=1)
    assert _now() - long_lived.not_valid_before_utc >= backdate


def test_no_key_material_in_reprs(world: World) -> None:
    certs = Certificates(world.ca, world.serving, world.ca.cert_pem)
    for text in (repr(world.ca), repr(certs), repr(RotationPlan(True, True, ("x",), (b"PEM",)))):
        assert "PRIVATE" not in text
        assert "BEGIN" not in text
        assert "PEM" not in text


def test_write_pair_modes_even_over_a_stale_temporary(world: World, tmp_path: Path) -> None:
    stale = tmp_path / ".tls.key.tmp"
    stale.write_bytes(b"old")
    stale.chmod(0o644)
    write_pair(tmp_path, world.serving)
    assert stat.S_IMODE((tmp_path / "tls.key").stat().st_mode) == 0o600
    assert (tmp_path / "tls.crt").read_bytes() == world.serving.cert_pem


# The command line (``certs files`` and option checks of ``certs sync``).


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    certs_main.add_arguments(parser)
    return parser.parse_args(list(argv))


def _files(out: Path, *extra: str) -> int:
    return certs_main.run(
        _parse(
            "files",
            "--out",
            str(out),
            "--service",
            "webhook",
            "--namespace",
            "external-services",
            *extra,
        )
    )


def test_files_writes_ca_and_serving_pair(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "certs"
    assert _files(out, "--days", "10") == 0
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes["ca.key"] == modes["tls.key"] == 0o600
    assert {"ca.crt", "tls.crt"} <= modes.keys()
    assert len(modes) == 4
    ca = Issued((out / "ca.crt").read_bytes(), (out / "ca.key").read_bytes())
    serving = Issued((out / "tls.crt").read_bytes(), (out / "tls.key").read_bytes())
    assert signed_by(serving.certificate, ca.certificate)
    assert dns_names_of(serving.certificate) == NAMES
    life = serving.certificate.not_valid_after_utc - _now()
    assert 9.9 * DAY < life <= 10 * DAY
    printed = capsys.readouterr().out
    assert "created CA" in printed
    assert "created serving certificate" in printed
    for secret in (ca.key_pem, serving.key_pem):
        assert secret.decode().splitlines()[1] not in printed
    assert "PRIVATE" not in printed


def test_files_reuses_a_valid_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _files(tmp_path) == 0
    ca_before, tls_before = (tmp_path / "ca.crt").read_bytes(), (tmp_path / "tls.crt").read_bytes()
    capsys.readouterr()
    assert _files(tmp_path) == 0
    assert (tmp_path / "ca.crt").read_bytes() == ca_before
    assert (tmp_path / "tls.crt").read_bytes() != tls_before  # a fresh serving certificate
    assert "reused CA" in capsys.readouterr().out


def test_files_replaces_an_invalid_ca(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_pair(tmp_path, world.serving, "ca.crt", "ca.key")  # a leaf, not a CA
    assert _files(tmp_path) == 0
    assert (tmp_path / "ca.crt").read_bytes() != world.serving.cert_pem
    printed = capsys.readouterr().out
    assert "not a CA" in printed
    assert "publish the new ca.crt" in printed


FILES_ERRORS = {
    "days zero": (("--days", "0"), "--days"),
    "days negative": (("--days", "-3"), "--days"),
    "days not a number": (("--days", "ten"), "--days"),
    "days infinite": (("--days", "inf"), "--days"),
    "ca days zero": (("--ca-days", "0"), "--ca-days"),
    "ca days absurd": (("--ca-days", "1e9"), "--ca-days"),
}


@pytest.mark.parametrize(("extra", "option"), FILES_ERRORS.values(), ids=FILES_ERRORS.keys())
def test_files_bad_values(tmp_path: Path, extra: tuple[str, ...], option: str) -> None:
    with pytest.raises(ConfigError) as error:
        _files(tmp_path / "out", *extra)
    assert error.value.field == option
    assert error.value.value == extra[1]
    assert not (tmp_path / "out").exists()  # validated before anything is written


def test_files_unwritable_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError) as error:
        _files(blocker / "certs")
    assert error.value.field == "--out"
    assert error.value.value == str(blocker / "certs")


def test_files_bad_service_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        certs_main.run(
            _parse("files", "--out", str(tmp_path), "--service", "Web_Hook", "--namespace", "ns")
        )
    assert error.value.field == "--service"


SYNC_ERRORS = {
    "fraction zero": (("--renew-fraction", "0"), "--renew-fraction"),
    "fraction one": (("--renew-fraction", "1"), "--renew-fraction"),
    "fraction above one": (("--renew-fraction", "1.5"), "--renew-fraction"),
    "fraction not a number": (("--renew-fraction", "third"), "--renew-fraction"),
    "loop zero": (("--loop", "0"), "--loop"),
    "overlap negative": (("--overlap", "-1"), "--overlap"),
    "serving days zero": (("--days", "0"), "--days"),
    "secret name": (("--secret", "Not/A/Name"), "--secret"),
    "ca secret name": (("--ca-secret", "Not_A_Name"), "--ca-secret"),
    "ca secret is the serving secret": (("--ca-secret", "webhook-tls"), "--ca-secret"),
    "kubeconfig missing": (("--kubeconfig", "/nonexistent/kubeconfig"), "--kubeconfig"),
}


@pytest.mark.parametrize(("extra", "option"), SYNC_ERRORS.values(), ids=SYNC_ERRORS.keys())
def test_sync_bad_values(extra: tuple[str, ...], option: str) -> None:
    args = _parse(
        "sync",
        "--namespace",
        "external-services",
        "--secret",
        "webhook-tls",
        "--ca-secret",
        "webhook-ca",
        "--service",
        "webhook",
        "--webhook-config",
        "extconn",
        *extra,
    )
    with pytest.raises(ConfigError) as error:
        certs_main.run(args)
    assert error.value.field == option
    assert error.value.value == extra[1]


def test_sync_accepts_a_fraction_as_a_ratio() -> None:
    args = _parse(
        "sync",
        "--namespace",
        "ns",
        "--secret",
        "s",
        "--ca-secret",
        "c",
        "--service",
        "webhook",
        "--webhook-config",
        "w",
        "--renew-fraction",
        "1/4",
        "--days",
        "0.5",
    )
    settings = certs_main.settings_from(args)
    assert settings.renew_at_fraction == 0.25
    assert settings.serving_lifetime == DAY / 2
    assert (settings.secret, settings.ca_secret) == ("s", "c")


def test_sync_requires_a_separate_ca_secret(capsys: pytest.CaptureFixture[str]) -> None:
    """The CA key has its own Secret: no default that could put it next to the serving
    pair the webhook pods mount."""
    with pytest.raises(SystemExit):
        _parse("sync", "--namespace", "ns", "--secret", "s", "--service", "w")
    assert "--ca-secret" in capsys.readouterr().err
    with pytest.raises(ValueError, match="CA Secret"):
        SyncSettings("ns", "same", "same", "webhook", "w")
