"""Sidecar lifecycle on real namespaces: bad input, crash, restart, stop, readiness."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from k8s_ext_connector.certs.ssh import generate_key_pair, write_private_key
from k8s_ext_connector.lab.client import run_gets
from k8s_ext_connector.lab.scenario import SERVICE1
from k8s_ext_connector.lab.topology import EXTERNAL_SERVER_IP, SERVICE_IP, SOURCE_IPS, Lab
from tests.netns.conftest import SeedLab

pytestmark = pytest.mark.root


def first(lab: Lab, pod: str, host: str = SERVICE_IP) -> str:
    outcomes = lab.in_pod(pod, lambda: run_gets(host, 8000, 1))
    assert isinstance(outcomes, list)
    return outcomes[0].body if outcomes[0].ok else f"error: {outcomes[0].body}"


def egress_rules(lab: Lab, pod: str) -> list[str]:
    return [
        line
        for line in lab.iptables_save(lab.pods[pod].netns).splitlines()
        if line.startswith("-A")
    ]


def run_sidecar_cli(netns: str, config: Path, key: object) -> subprocess.CompletedProcess[str]:
    """The real command in a pod's namespace, as the container would run it."""
    return subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            netns,
            sys.executable,
            "-m",
            "k8s_ext_connector",
            "sidecar",
            "--config",
            str(config),
            "--ssh-key",
            str(key),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


VALID = """\
rules:
- name: es:8000
  intercept: [{address: 198.51.100.130, port: 8000}]
  gateway: {address: 203.0.113.200, hostKey: "%s"}
  target: {address: 203.0.113.10, port: 8000}
"""

BAD_CONFIGS = {
    "not-yaml": ("rules: [", "line"),
    "unknown-field": (VALID + "colour: blue\n", "colour"),
    "invalid-ip": (
        VALID.replace("198.51.100.130", "198.51.100.300"),
        "rules[0].intercept[0].address: '198.51.100.300'",
    ),
    "invalid-port": (
        VALID.replace("port: 8000}]", "port: 70000}]"),
        "rules[0].intercept[0].port: 70000",
    ),
    "bad-host-key": (None, "rules[0].gateway.hostKey"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_input_exits_2_with_one_line_and_touches_no_rules(seed_lab: SeedLab, case: str) -> None:
    lab = seed_lab.lab
    pod = lab.pods["other-pod"]
    text, expected = BAD_CONFIGS[case]
    if text is None:
        text = VALID % "ssh-ed25519 AAAAnot-a-key"
    elif "%s" in text:
        text = text % lab.host_key.public_openssh
    config = lab.workdir / f"bad-{case}.yaml"
    config.write_text(text)
    before = lab.iptables_save(pod.netns)
    result = run_sidecar_cli(pod.netns, config, lab.pods["my-pod1"].key_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert lab.iptables_save(pod.netns) == before


def test_missing_key_file_exits_2_with_the_rules_in(seed_lab: SeedLab) -> None:
    """The rules go in as soon as the config is valid, before the key: fail closed."""
    lab = seed_lab.lab
    pod = lab.pods["other-pod"]
    config = lab.workdir / "ok.yaml"
    config.write_text(VALID % lab.host_key.public_openssh)
    result = run_sidecar_cli(pod.netns, config, "/nonexistent/key")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "k8s-ext-connector sidecar: error: --ssh-key: '/nonexistent/key': No such file or directory"
    )
    rules = egress_rules(lab, "other-pod")
    assert len(rules) == 2  # the jump and the one intercept
    assert "-d 198.51.100.130/32" in rules[-1]


def test_crashed_sidecar_fails_closed_and_restart_replaces_leftovers(seed_lab: SeedLab) -> None:
    lab = seed_lab.lab
    pod = lab.pods["my-pod1"]
    rules = egress_rules(lab, "my-pod1")
    assert pod.sidecar is not None
    pod.sidecar.stop(signal.SIGKILL)
    # Rules stay behind: intercepted traffic hits a closed port and is refused. It never
    # leaves with the pod's own address (nothing reaches the server).
    assert first(lab, "my-pod1") == "error: ConnectionRefusedError"
    assert first(lab, "my-pod1", EXTERNAL_SERVER_IP) == "error: ConnectionRefusedError"
    assert lab.server_log() == []
    lab.start_sidecar("my-pod1", seed_lab.plan.sidecars[SERVICE1], seed_lab.keys.clients[SERVICE1])
    assert egress_rules(lab, "my-pod1") == rules  # replaced, not duplicated
    assert first(lab, "my-pod1") == SOURCE_IPS[0]


def test_sigterm_keeps_every_rule_and_fails_closed(seed_lab: SeedLab) -> None:
    """The rules die with the pod's namespace, never with the sidecar (issue #10)."""
    lab = seed_lab.lab
    rules = egress_rules(lab, "my-pod2")
    assert lab.pods["my-pod2"].sidecar is not None
    assert lab.pods["my-pod2"].sidecar.stop(signal.SIGTERM) == 0
    assert egress_rules(lab, "my-pod2") == rules
    assert first(lab, "my-pod2") == "error: ConnectionRefusedError"
    assert first(lab, "my-pod2", EXTERNAL_SERVER_IP) == "error: ConnectionRefusedError"
    assert lab.server_log() == []


def test_readiness_follows_the_gateway_session(seed_lab: SeedLab) -> None:
    lab = seed_lab.lab
    assert lab.sidecar_ready("my-pod1") == (200, "ready")
    assert lab.gateway is not None
    lab.gateway.stop(signal.SIGKILL)
    Lab.wait_until(
        lambda: lab.sidecar_ready("my-pod1")[0] == 503, 5, lambda: "readiness did not drop"
    )
    _, reason = lab.sidecar_ready("my-pod1")
    assert "203.0.113.200:2022" in reason
    lab.start_gateway()
    lab.wait_sidecar_ready("my-pod1", timeout=5)


def test_sidecar_needs_only_net_admin_and_net_raw(seed_lab: SeedLab) -> None:
    """What the injected container gets (capabilities drop ALL, add NET_ADMIN, NET_RAW)."""
    lab = seed_lab.lab
    only = "-all,+net_admin,+net_raw"
    process = lab.start_sidecar(
        "other-pod",
        seed_lab.plan.sidecars[SERVICE1],
        seed_lab.keys.clients[SERVICE1],
        wrapper=["setpriv", "--bounding-set", only, "--inh-caps", only, "--"],
    )
    status = Path(f"/proc/{process.popen.pid}/status").read_text()
    effective = int(
        next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), 16
    )
    assert effective == (1 << 12) | (1 << 13)  # CAP_NET_ADMIN, CAP_NET_RAW
    assert first(lab, "other-pod") == SOURCE_IPS[0]
    assert process.stop(signal.SIGTERM) == 0


def test_reissued_key_is_picked_up_without_a_restart(seed_lab: SeedLab) -> None:
    """The operator re-issues a client key when a source service comes back: the kubelet
    swaps the mounted Secret file and the sidecar must follow it."""
    lab = seed_lab.lab
    pod = lab.pods["my-pod1"]
    assert pod.sidecar is not None
    assert pod.key_path is not None
    fresh = generate_key_pair()
    seed_lab.keys.clients[SERVICE1] = fresh
    planned = seed_lab.replan(((8000, 8000),))
    lab.write_gateway_config(planned.gateway)  # the old key is no longer authorised
    Lab.wait_until(
        lambda: first(lab, "my-pod1").startswith("error: "),
        10,
        lambda: "the gateway to drop the old key",
    )
    write_private_key(pod.key_path, fresh)  # as the kubelet updates the Secret volume
    Lab.wait_until(
        lambda: first(lab, "my-pod1") == SOURCE_IPS[0], 10, lambda: "the sidecar to use its new key"
    )
    assert pod.sidecar.alive()
