"""``k8s-ext-connector webhook`` flags: settings reach InjectionSettings; bad ones name
the flag and value (ConfigError) before anything listens."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from k8s_ext_connector.core.errors import ConfigError
from k8s_ext_connector.webhook import main


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    main.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults(tmp_path: Path) -> None:
    command = main.command_from(parse("--tls-dir", str(tmp_path)))
    assert command.port == 8443
    assert command.host == "0.0.0.0"
    assert command.cert_path == tmp_path / "tls.crt"
    assert command.key_path == tmp_path / "tls.key"
    assert command.injection == main.DEFAULTS
    assert command.kubeconfig is None


def test_injection_settings_from_flags(tmp_path: Path) -> None:
    command = main.command_from(
        parse(
            "--tls-dir",
            str(tmp_path),
            "--port",
            "9443",
            "--image",
            "registry.example/x:2",
            "--image-pull-policy",
            "Always",
            "--no-native-sidecar",
            "--sidecar-health-port",
            "15999",
            "--sidecar-cpu-request",
            "100m",
            "--sidecar-memory-request",
            "32Mi",
            "--sidecar-cpu-limit",
            "0.5",
            "--sidecar-memory-limit",
            "1Gi",
            "--kubeconfig",
            "/k",
        )
    )
    settings = command.injection
    assert command.port == 9443
    assert command.kubeconfig == "/k"
    assert (settings.image, settings.image_pull_policy) == ("registry.example/x:2", "Always")
    assert settings.native_sidecar is False
    assert settings.health_port == 15999
    assert (settings.cpu_request, settings.memory_request) == ("100m", "32Mi")
    assert (settings.cpu_limit, settings.memory_limit) == ("0.5", "1Gi")


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        (["--port", "0"], "--port"),
        (["--port", "70000"], "--port"),
        (["--image", "has space"], "--image"),
        (["--image", ""], "--image"),
        (["--image-pull-policy", "Sometimes"], "--image-pull-policy"),
        (["--sidecar-health-port", "-1"], "--sidecar-health-port"),
        (["--sidecar-cpu-limit", "lots"], "--sidecar-cpu-limit"),
        (["--sidecar-memory-request", "64MB"], "--sidecar-memory-request"),
        (["--drain-seconds", "-1"], "--drain-seconds"),
    ],
)
def test_bad_flags(tmp_path: Path, flags: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as error:
        main.command_from(parse("--tls-dir", str(tmp_path), *flags))
    assert error.value.field == field


def test_tls_dir_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        main.command_from(parse("--tls-dir", str(tmp_path / "missing")))
    assert error.value.field == "--tls-dir"
