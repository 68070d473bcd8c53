"""The gateway refuses what a key is not entitled to, and survives restarts and reloads."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import threading
import time
from contextlib import AbstractAsyncContextManager

import asyncssh
import pytest

from k8s_ext_connector.certs.ssh import generate_key_pair
from k8s_ext_connector.gateway.rules import SNAT_CHAIN, render_snat_rules
from k8s_ext_connector.lab.client import run_gets
from k8s_ext_connector.lab.netns import sh
from k8s_ext_connector.lab.scenario import SERVICE1, SERVICE2
from k8s_ext_connector.lab.topology import EXTERNAL_SERVER_IP, SERVICE_IP, SOURCE_IPS, Lab
from tests.netns.conftest import SeedLab

pytestmark = pytest.mark.root


def raw_client(
    private_key: bytes, host_key: str, source_ip: str = SOURCE_IPS[0]
) -> AbstractAsyncContextManager[asyncssh.SSHClientConnection]:
    """A raw asyncssh client with one key, pinning ``host_key``, no agent, no ssh config."""
    return asyncssh.connect(
        source_ip,
        2022,
        username="probe",
        client_keys=[asyncssh.import_private_key(private_key)],
        known_hosts=([asyncssh.import_public_key(host_key)], [], []),
        agent_path=None,
        config=None,
    )


async def _open_channel(
    private_key: bytes, host_key: str, source_ip: str, target: str, port: int
) -> str:
    """A raw asyncssh client: authenticate, open direct-tcpip, GET / through it."""
    async with raw_client(private_key, host_key, source_ip) as conn:
        reader, writer = await conn.open_connection(target, port)
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        writer.write_eof()
        response: bytes = await reader.read()
        return response.decode().split("\r\n\r\n", 1)[1].strip()


def _probe(seed: SeedLab, private_key: bytes, source_ip: str, target: str, port: int) -> str:
    host_key = seed.lab.host_key.public_openssh
    try:
        result = seed.lab.in_pod(
            "other-pod",
            lambda: asyncio.run(_open_channel(private_key, host_key, source_ip, target, port)),
        )
    except asyncssh.PermissionDenied:
        return "auth refused"
    except asyncssh.ChannelOpenError as error:
        return f"channel refused: {error.reason}"
    assert isinstance(result, str)
    return result


def test_authorised_key_reaches_its_target_from_its_source_ip(seed_lab: SeedLab) -> None:
    key = seed_lab.keys.clients[SERVICE1].private_openssh
    assert _probe(seed_lab, key, SOURCE_IPS[0], EXTERNAL_SERVER_IP, 8000) == SOURCE_IPS[0]


def test_unknown_key_is_refused(seed_lab: SeedLab) -> None:
    stranger = generate_key_pair().private_openssh
    assert _probe(seed_lab, stranger, SOURCE_IPS[0], EXTERNAL_SERVER_IP, 8000) == "auth refused"


def test_key_of_another_source_ip_is_refused(seed_lab: SeedLab) -> None:
    key_of_service2 = seed_lab.keys.clients[SERVICE2].private_openssh
    assert (
        _probe(seed_lab, key_of_service2, SOURCE_IPS[0], EXTERNAL_SERVER_IP, 8000) == "auth refused"
    )


@pytest.mark.parametrize(
    ("target", "port"),
    [
        (EXTERNAL_SERVER_IP, 8001),  # port not allowed
        ("203.0.113.1", 8000),  # another host
        ("localhost", 8000),
    ],
)  # names never allowed
def test_target_outside_the_allow_list_is_refused(
    seed_lab: SeedLab, target: str, port: int
) -> None:
    key = seed_lab.keys.clients[SERVICE1].private_openssh
    assert _probe(seed_lab, key, SOURCE_IPS[0], target, port) == (
        "channel refused: target not allowed for this key"
    )
    # ...and the gateway keeps serving everyone else.
    assert run_in(seed_lab.lab, "my-pod2") == [SOURCE_IPS[1]]
    log = seed_lab.lab.gateway.output() if seed_lab.lab.gateway else ""
    assert "refused channel" in log
    assert seed_lab.keys.clients[SERVICE1].public_openssh.split()[1] not in log  # no key material


def run_in(lab: Lab, pod: str, port: int = 8000, count: int = 1) -> list[str]:
    outcomes = lab.in_pod(pod, lambda: run_gets(SERVICE_IP, port, count))
    assert isinstance(outcomes, list)
    return [o.body if o.ok else f"error: {o.body}" for o in outcomes]


def _timed_get(lab: Lab, pod: str) -> tuple[str, float]:
    started = time.monotonic()
    result = run_in(lab, pod)[0]
    return result, time.monotonic() - started


def test_gateway_restart_fails_fast_then_recovers_without_leaks(seed_lab: SeedLab) -> None:
    lab = seed_lab.lab
    assert run_in(lab, "my-pod1") == [SOURCE_IPS[0]]
    rules_before = lab.iptables_save(lab.pods["my-pod1"].netns)
    assert lab.gateway is not None
    lab.gateway.stop(signal.SIGKILL)  # a crash: no clean-up of its own

    # During the outage every new connection fails at once, never hangs.
    for _ in range(5):
        result, elapsed = _timed_get(lab, "my-pod1")
        assert result.startswith("error: "), result
        assert elapsed < 1.0, f"connection during outage took {elapsed:.2f}s"
    listeners = sh(["ip", "netns", "exec", lab.gw_ns, "ss", "-Hltn"]).stdout
    assert ":2022" not in listeners

    lab.start_gateway()
    returned = time.monotonic()
    while True:
        result, _ = _timed_get(lab, "my-pod1")
        if result == SOURCE_IPS[0]:
            break
        assert time.monotonic() - returned < 5.0, f"not recovered within 5 s: {result}"
        time.sleep(0.05)
    assert run_in(lab, "my-pod2") == [SOURCE_IPS[1]]
    # Nothing leaked: the sidecar's rules are unchanged, one gateway process, one listener
    # per source IP, and the source IPs are on the interface exactly once.
    assert lab.iptables_save(lab.pods["my-pod1"].netns) == rules_before
    # In the node's nat table: the source-IP SNAT guard exactly once, nothing else.
    guard = render_snat_rules(seed_lab.plan.gateway)
    nat = [line for line in lab.iptables_save(lab.gw_ns).splitlines() if line.startswith("-A ")]
    assert nat == [
        f"-A POSTROUTING {guard.jumps[0].spec}",
        *(f"-A {SNAT_CHAIN} {spec}" for spec in guard.chains[SNAT_CHAIN]),
    ]
    listeners = sh(["ip", "netns", "exec", lab.gw_ns, "ss", "-Hltn"]).stdout
    assert sorted(line.split()[3] for line in listeners.splitlines()) == sorted(
        f"{ip}:2022" for ip in SOURCE_IPS
    )
    addresses = sh(["ip", "-n", lab.gw_ns, "-o", "addr", "show", "dev", "ext0"]).stdout
    for ip in SOURCE_IPS:
        assert addresses.count(f" {ip}/32 ") == 1


def test_gateway_stop_removes_the_addresses_it_added(seed_lab: SeedLab) -> None:
    lab = seed_lab.lab
    assert lab.gateway is not None
    assert lab.gateway.stop(signal.SIGTERM) == 0
    addresses = sh(["ip", "-n", lab.gw_ns, "-o", "addr", "show", "dev", "ext0"]).stdout
    assert all(ip not in addresses for ip in SOURCE_IPS)
    assert "203.0.113.1/24" in addresses  # what it did not add stays


def test_reload_adds_a_second_target_without_breaking_a_transfer_in_flight(
    seed_lab: SeedLab,
) -> None:
    lab = seed_lab.lab
    size = 8 * 1024 * 1024
    result: dict[str, object] = {}

    async def download() -> None:
        reader, writer = await asyncio.open_connection(SERVICE_IP, 8000)
        writer.write(f"GET /bytes?n={size}&delay=0.02 HTTP/1.0\r\n\r\n".encode())
        data = await reader.read()
        writer.close()
        body = data.split(b"\r\n\r\n", 1)[1]
        result["length"] = len(body)
        result["digest"] = hashlib.sha256(body).hexdigest()

    transfer = threading.Thread(
        target=lambda: lab.in_pod("my-pod1", lambda: asyncio.run(download()))
    )
    transfer.start()
    # The transfer lasts ~2.5 s (128 chunks x 20 ms); reload once it is under way.
    Lab.wait_until(
        lambda: any(r["path"] == "/bytes" for r in lab.server_log()),
        5,
        lambda: "the transfer did not start",
    )
    assert run_in(lab, "my-pod1", 8001)[0].startswith("error: ")  # not allowed yet

    planned = seed_lab.replan(((8000, 8000), (8001, 8001)))
    lab.write_gateway_config(planned.gateway)
    lab.write_sidecar_config("my-pod1", planned.sidecars[SERVICE1])
    Lab.wait_until(
        lambda: run_in(lab, "my-pod1", 8001) == [SOURCE_IPS[0]],
        10,
        lambda: "second target not reachable after reload",
    )
    assert transfer.is_alive(), "the transfer should still be in flight during the reload"
    transfer.join(30)
    assert result == {"length": size, "digest": hashlib.sha256(b"x" * size).hexdigest()}
    assert run_in(lab, "my-pod1", 8000) == [SOURCE_IPS[0]]


def test_invalid_config_on_reload_keeps_the_running_one(seed_lab: SeedLab) -> None:
    lab = seed_lab.lab
    (lab.workdir / "gateway.yaml").write_text("sources: [{sourceIP: 999.1.1.1}]\n")
    Lab.wait_until(
        lambda: "not applied" in (lab.gateway.output() if lab.gateway else ""),
        5,
        lambda: "gateway did not report the bad config",
    )
    assert run_in(lab, "my-pod1") == [SOURCE_IPS[0]]


async def _try_shell_and_remote_forward(private_key: bytes, host_key: str) -> list[str]:
    refused = []
    async with raw_client(private_key, host_key) as conn:
        try:
            await conn.run("id", check=True)
        except asyncssh.ChannelOpenError:
            refused.append("exec")
        try:
            await conn.forward_remote_port("", 8080, "localhost", 22)
        except asyncssh.ChannelListenError:
            refused.append("remote forward")
    return refused


def test_an_authorised_key_gets_no_shell_and_no_remote_forwarding(seed_lab: SeedLab) -> None:
    key = seed_lab.keys.clients[SERVICE1].private_openssh
    host_key = seed_lab.lab.host_key.public_openssh
    refused = seed_lab.lab.in_pod(
        "other-pod", lambda: asyncio.run(_try_shell_and_remote_forward(key, host_key))
    )
    assert refused == ["exec", "remote forward"]


def test_a_gateway_with_a_different_host_key_is_not_trusted(seed_lab: SeedLab) -> None:
    impostor = generate_key_pair().public_openssh  # as if someone else answered on .200
    key = seed_lab.keys.clients[SERVICE1].private_openssh

    async def connect() -> None:
        async with raw_client(key, impostor):
            pass

    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        seed_lab.lab.in_pod("other-pod", lambda: asyncio.run(connect()))
