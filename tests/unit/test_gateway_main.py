"""``gateway`` options for the in-cluster run: bad input ends in one line naming the option,
exit 2, before any side effect (the agent's event loop is replaced by a tripwire, as in
test_cli); good input gets as far as that tripwire.

The Secret itself (404 wait, 403, bad content, following a new key) is exercised against
real servers: tests/controlplane/test_gateway_incluster.py and
tests/netns/test_gateway_incluster.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml

from k8s_ext_connector import cli
from k8s_ext_connector.gateway import main as gateway_main
from tests.unit.samples import gateway_doc


def _forbidden(*args: Any, **kwargs: Any) -> NoReturn:
    raise AssertionError("side effect before validation finished")


@pytest.fixture(autouse=True)
def guarded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway_main, "run_agent", _forbidden)
    monkeypatch.setattr(gateway_main, "setup_logging", lambda level: None)
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    monkeypatch.setenv("NODE_NAME", "gw1")  # the chart's downward API


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "gw1.yaml"
    path.write_text(yaml.safe_dump(gateway_doc()))
    return path


@pytest.fixture
def kubeconfig(tmp_path: Path) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "current-context": "c",
                "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
                "clusters": [{"name": "k", "cluster": {"server": "http://127.0.0.1:1"}}],
                "users": [{"name": "u", "user": {}}],
            }
        )
    )
    return path


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out == ""
    assert len(lines) == 1, err
    assert lines[0].startswith("k8s-ext-connector gateway: error: ")
    return lines[0]


def _secret_args(config: Path, kubeconfig: Path, *extra: str) -> list[str]:
    return [
        "gateway",
        "--config",
        str(config),
        "--host-key-secret",
        "ext-connector-gateway-gw1-host-key",
        "--kubeconfig",
        str(kubeconfig),
        *extra,
    ]


def test_the_charts_arguments_pass_validation(
    config: Path, kubeconfig: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POD_NAMESPACE", "ignored-when-namespace-is-given")
    args = _secret_args(
        config,
        kubeconfig,
        "--wait-for-config",
        "--namespace",
        "external-services",
        "--health-port",
        "9102",
        "--manage-addresses",
        "eth0",
        "--iptables-backend",
        "auto",
    )
    parsed = cli.build_parser().parse_args(args)
    settings = gateway_main.settings_from(parsed)
    assert settings.namespace == "external-services"
    assert (settings.health_host, settings.health_port) == ("0.0.0.0", 9102)
    assert settings.host_key_poll_interval == 30.0
    assert (settings.node_name, settings.reports, settings.lease_renew_interval) == (
        "gw1",
        True,
        10.0,
    )
    with pytest.raises(AssertionError, match="side effect before validation finished"):
        cli.main(args)


def test_namespace_defaults_to_pod_namespace(
    config: Path, kubeconfig: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POD_NAMESPACE", "connector")
    parsed = cli.build_parser().parse_args(_secret_args(config, kubeconfig))
    assert gateway_main.settings_from(parsed).namespace == "connector"


def test_missing_config_with_wait_for_config_is_not_an_error(
    tmp_path: Path, kubeconfig: Path
) -> None:
    args = _secret_args(
        tmp_path / "absent.yaml", kubeconfig, "--namespace", "ns", "--wait-for-config"
    )
    with pytest.raises(AssertionError, match="side effect before validation finished"):
        cli.main(args)


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        pytest.param(
            [],
            ["--namespace: '': required with an API client", "POD_NAMESPACE"],
            id="no-namespace",
        ),
        pytest.param(
            ["--namespace", "Not_A_Namespace"],
            ["--namespace: 'Not_A_Namespace': is not a valid namespace name"],
            id="bad-namespace",
        ),
        pytest.param(
            ["--namespace", "ns", "--health-port", "70000"],
            ["--health-port: 70000: must be 0 (off) to 65535"],
            id="health-port",
        ),
        pytest.param(
            ["--namespace", "ns", "--host-key-poll-interval", "0"],
            ["--host-key-poll-interval: 0.0: must be > 0"],
            id="poll-interval",
        ),
        pytest.param(
            ["--namespace", "ns", "--node-name", "Not_A_Node"],
            ["--node-name: 'Not_A_Node': is not a node name that can name a Lease"],
            id="bad-node-name",
        ),
        pytest.param(
            ["--namespace", "ns", "--lease-renew-interval", "0"],
            ["--lease-renew-interval: 0.0: must be > 0"],
            id="lease-renew-interval",
        ),
    ],
)
def test_bad_in_cluster_options(
    config: Path,
    kubeconfig: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    words: list[str],
) -> None:
    assert cli.main(_secret_args(config, kubeconfig, *extra)) == 2
    line = _error_line(capsys)
    for word in words:
        assert word in line


def test_the_lease_needs_a_node_name(
    config: Path,
    kubeconfig: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With an API client the gateway reports through its node's Lease, so it must know
    its node: without --node-name or $NODE_NAME it ends before any side effect."""
    monkeypatch.delenv("NODE_NAME")
    assert cli.main(_secret_args(config, kubeconfig, "--namespace", "ns")) == 2
    line = _error_line(capsys)
    assert "--node-name: '': required with an API client" in line
    assert "NODE_NAME" in line
    parsed = cli.build_parser().parse_args(
        _secret_args(config, kubeconfig, "--namespace", "ns", "--node-name", "gw2")
    )
    assert gateway_main.settings_from(parsed).node_name == "gw2"


def test_outside_the_cluster_the_lease_is_optional(
    config: Path, kubeconfig: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--host-key FILE (the lab, the seed's way): no API client, no Lease, no node name
    needed; adding --kubeconfig turns the Lease on."""
    monkeypatch.delenv("NODE_NAME")
    key = ["gateway", "--config", str(config), "--host-key", str(tmp_path / "key")]
    settings = gateway_main.settings_from(cli.build_parser().parse_args(key))
    assert (settings.reports, settings.node_name) == (False, None)
    with_api = [*key, "--kubeconfig", str(kubeconfig), "--namespace", "ns", "--node-name", "gw1"]
    settings = gateway_main.settings_from(cli.build_parser().parse_args(with_api))
    assert (settings.reports, settings.node_name, settings.namespace) == (True, "gw1", "ns")


def test_bad_secret_name(
    config: Path, kubeconfig: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "gateway",
        "--config",
        str(config),
        "--host-key-secret",
        "../secrets",
        "--namespace",
        "ns",
        "--kubeconfig",
        str(kubeconfig),
    ]
    assert cli.main(args) == 2
    assert "--host-key-secret: '../secrets': is not a valid Secret name" in _error_line(capsys)


def test_unreadable_kubeconfig(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    absent = tmp_path / "nowhere"
    assert cli.main(_secret_args(config, absent, "--namespace", "ns")) == 2
    assert f"--kubeconfig: '{absent}': No such file or directory" in _error_line(capsys)


def test_invalid_config_fails_at_once_even_with_wait_for_config(
    tmp_path: Path, kubeconfig: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "gw1.yaml"
    path.write_text("sources: [{sourceIP: 999.1.1.1}]\n")
    args = _secret_args(path, kubeconfig, "--namespace", "ns", "--wait-for-config")
    assert cli.main(args) == 2
    assert "999.1.1.1" in _error_line(capsys)


@pytest.mark.parametrize(
    ("key_args", "message"),
    [
        pytest.param(
            [], "one of the arguments --host-key --host-key-secret is required", id="neither"
        ),
        pytest.param(
            ["--host-key", "k", "--host-key-secret", "s"],
            "argument --host-key-secret: not allowed with argument --host-key",
            id="both",
        ),
    ],
)
def test_exactly_one_host_key_source(
    config: Path, capsys: pytest.CaptureFixture[str], key_args: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["gateway", "--config", str(config), *key_args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
