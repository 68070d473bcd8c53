"""CLI bad input: exit 2 with one stderr line naming field and value, before any side effect
(but the sidecar's egress rules, which go in as soon as its config is valid: fail closed).

No root needed: every subprocess (iptables, ip) and the agents' event loop are replaced by
functions that fail the test if reached, which proves validation runs first.
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any, NoReturn

import asyncssh
import pytest
import yaml

from k8s_ext_connector import cli
from k8s_ext_connector.core import iptables
from k8s_ext_connector.gateway import main as gateway_main
from k8s_ext_connector.sidecar import main as sidecar_main
from k8s_ext_connector.sidecar.rules import EGRESS_CHAIN
from tests.unit.fake_iptables import FakeIptables
from tests.unit.samples import KEY_A, gateway_doc, patched, sidecar_doc


def _forbidden(*args: Any, **kwargs: Any) -> NoReturn:
    raise AssertionError(f"side effect before validation finished: {args!r}")


@pytest.fixture(autouse=True)
def no_side_effects(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(iptables, "_run", _forbidden)
    monkeypatch.setattr(subprocess, "run", _forbidden)
    monkeypatch.setattr(subprocess, "Popen", _forbidden)
    monkeypatch.setattr(sidecar_main, "run_agent", _forbidden)
    monkeypatch.setattr(gateway_main, "run_agent", _forbidden)
    # Keep the root logger of the test process as it is, should validation ever pass.
    monkeypatch.setattr(sidecar_main, "setup_logging", lambda level: None)
    monkeypatch.setattr(gateway_main, "setup_logging", lambda level: None)


@pytest.fixture(scope="module")
def private_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "id_ed25519"
    key = asyncssh.generate_private_key("ssh-ed25519")
    path.write_bytes(key.export_private_key())
    path.with_suffix(".pub").write_bytes(key.export_public_key())
    return path


def _write(tmp_path: Path, content: str | bytes | dict[str, Any]) -> Path:
    path = tmp_path / "config.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


def _one_error_line(capsys: pytest.CaptureFixture[str], command: str) -> str:
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert lines[0].startswith(f"k8s-ext-connector {command}: error: ")
    return lines[0]


# (config document or raw text, words the error line must contain: field, then value)
SIDECAR_BAD_CONFIGS = [
    pytest.param("rules: [\n  {name: a\n", ["config.yaml", "line 3", "not valid YAML"],
                 id="malformed-yaml"),
    pytest.param("listenPort: 1\n rules: []\n", ["config.yaml", "line 2"], id="bad-indent"),
    pytest.param("", ["(top level)", "None", "mapping"], id="empty-file"),
    pytest.param("- 1\n- 2\n", ["(top level)", "[1, 2]", "mapping"], id="list-document"),
    pytest.param(patched(sidecar_doc(), ("rules", 0, "gateway", "hostkey"), "x"),
                 ["rules[0].gateway.hostkey", "'x'", "unknown field"], id="unknown-field"),
    pytest.param(patched(sidecar_doc(), ("rules", 0, "target", "address"), "192.168.122.1391"),
                 ["rules[0].target.address", "'192.168.122.1391'"], id="invalid-ip"),
    pytest.param(patched(sidecar_doc(), ("rules", 0, "intercept", 0, "port"), 70000),
                 ["rules[0].intercept[0].port", "70000", "1-65535"], id="port-70000"),
    pytest.param(patched(sidecar_doc(), ("rules", 0, "target", "port"), "80"),
                 ["rules[0].target.port", "'80'"], id="port-string"),
    pytest.param(patched(sidecar_doc(), ("listenPort",), 0), ["listenPort", "0"], id="port-0"),
    pytest.param(patched(sidecar_doc(), ("rules", 0, "gateway", "hostKey"), KEY_A[:-12]),
                 ["rules[0].gateway.hostKey", "is not an OpenSSH public key"],
                 id="bad-host-key"),
    # Bug: a YAML reader error (a control character) prints a two-line message.
    pytest.param('rules: []\nx: "a\x07b"\n', ["config.yaml", "not valid YAML"],
                 id="control-character"),
    # Bug: a non-UTF-8 file crashes with UnicodeDecodeError (traceback, exit 1).
    pytest.param(b"listenPort: \xff\xfe\n", ["config.yaml"], id="not-utf8"),
]


@pytest.mark.parametrize(("content", "words"), SIDECAR_BAD_CONFIGS)
def test_sidecar_bad_config(tmp_path: Path, private_key: Path,
                            capsys: pytest.CaptureFixture[str],
                            content: str | bytes | dict[str, Any], words: list[str]) -> None:
    config = _write(tmp_path, copy.deepcopy(content))
    code = cli.main(["sidecar", "--config", str(config), "--ssh-key", str(private_key)])
    line = _one_error_line(capsys, "sidecar")
    assert code == 2
    for word in words:
        assert word in line


def test_sidecar_missing_config_file(tmp_path: Path, private_key: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    code = cli.main(["sidecar", "--config", str(missing), "--ssh-key", str(private_key)])
    line = _one_error_line(capsys, "sidecar")
    assert code == 2
    assert str(missing) in line
    assert "No such file or directory" in line


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        pytest.param("missing", "No such file or directory", id="missing-key-file"),
        pytest.param("text", "is not an OpenSSH private key", id="non-key-file"),
        pytest.param("public", "is not an OpenSSH private key", id="public-key-file"),
        pytest.param("directory", "Is a directory", id="directory"),
    ],
)
def test_sidecar_bad_ssh_key(tmp_path: Path, private_key: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str], key: str, reason: str) -> None:
    """The one side effect before the key: the config's rules, so a bad key fails closed."""
    fake = FakeIptables()
    monkeypatch.setattr(sidecar_main, "_firewall", lambda settings: fake)
    paths = {
        "missing": tmp_path / "absent",
        "text": tmp_path / "hello.txt",
        "public": private_key.with_suffix(".pub"),
        "directory": tmp_path,
    }
    paths["text"].write_text("hello\n")
    config = _write(tmp_path, sidecar_doc())
    code = cli.main(["sidecar", "--config", str(config), "--ssh-key", str(paths[key])])
    line = _one_error_line(capsys, "sidecar")
    assert code == 2
    assert f"--ssh-key: '{paths[key]}': {reason}" in line
    assert len(fake.tables["nat"][EGRESS_CHAIN]) == 2


def test_sidecar_config_checked_before_key(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    config = _write(tmp_path, patched(sidecar_doc(), ("listenPort",), 70000))
    code = cli.main(["sidecar", "--config", str(config), "--ssh-key", str(tmp_path / "absent")])
    assert code == 2
    assert "listenPort" in _one_error_line(capsys, "sidecar")


GATEWAY_BAD_CONFIGS = [
    pytest.param("sources:\n- sourceIP: [\n", ["config.yaml", "line 3", "not valid YAML"],
                 id="malformed-yaml"),
    pytest.param(patched(gateway_doc(), ("sources", 0, "clients", 0, "allowed"), []),
                 ["sources[0].clients[0].allowed", "[]", "unknown field"], id="unknown-field"),
    pytest.param(patched(gateway_doc(), ("sources", 0, "sourceIP"), "192.168.122"),
                 ["sources[0].sourceIP", "'192.168.122'"], id="invalid-ip"),
    pytest.param(patched(gateway_doc(), ("sshPort",), True), ["sshPort", "True"],
                 id="port-true"),
    pytest.param(patched(gateway_doc(), ("sources", 1, "sourceIP"), "192.168.122.200"),
                 ["sources[1].sourceIP", "'192.168.122.200'", "already listed"],
                 id="duplicate-source-ip"),
    pytest.param(patched(gateway_doc(), ("sources", 0, "clients", 0, "publicKey"), "ssh-ed25519 x"),
                 ["sources[0].clients[0].publicKey", "not an OpenSSH public key"],
                 id="bad-public-key"),
]


@pytest.mark.parametrize(("content", "words"), GATEWAY_BAD_CONFIGS)
def test_gateway_bad_config(tmp_path: Path, private_key: Path,
                            capsys: pytest.CaptureFixture[str],
                            content: str | dict[str, Any], words: list[str]) -> None:
    config = _write(tmp_path, copy.deepcopy(content))
    code = cli.main(["gateway", "--config", str(config), "--host-key", str(private_key),
                     "--manage-addresses", "eth0"])
    line = _one_error_line(capsys, "gateway")
    assert code == 2
    for word in words:
        assert word in line


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        pytest.param("missing", "No such file or directory", id="missing-host-key-file"),
        pytest.param("text", "is not an OpenSSH private key", id="non-key-file"),
    ],
)
def test_gateway_bad_host_key(tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str,
                              reason: str) -> None:
    path = tmp_path / ("absent" if key == "missing" else "hello.txt")
    if key == "text":
        path.write_text("hello\n")
    config = _write(tmp_path, gateway_doc())
    code = cli.main(["gateway", "--config", str(config), "--host-key", str(path)])
    line = _one_error_line(capsys, "gateway")
    assert code == 2
    assert f"--host-key: '{path}': {reason}" in line


def test_guard_trips_when_validation_passes(tmp_path: Path, private_key: Path) -> None:
    """The control case: a valid config and key get past validation into the guarded calls."""
    config = _write(tmp_path, gateway_doc())
    with pytest.raises(AssertionError, match="side effect before validation finished"):
        cli.main(["gateway", "--config", str(config), "--host-key", str(private_key)])
