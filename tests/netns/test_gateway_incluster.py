"""The gateway as the chart runs it: host key from its per-node Secret, config that appears
late, /ready, its report through its node's Lease, and nothing asked of the API but a GET
of that one Secret and the writes of that one Lease.

One network namespace per test holds everything: the API emulator (on its 127.0.0.1), the
real gateway process (``ip netns exec``), an echo server standing for the target, and the
SSH clients; ``ext0`` (a veth pair, both ends inside) carries 198.51.100.0/24 addresses
only there. Deleting the namespace removes all of it, whatever the outcome.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncssh
import pytest
import yaml

from k8s_ext_connector.certs.ssh import KeyPair, generate_key_pair, write_private_key
from k8s_ext_connector.core.gateway_status import (
    UNSERVED_ANNOTATION,
    gateway_lease_name,
    host_key_secret_name,
)
from k8s_ext_connector.lab import netns
from k8s_ext_connector.lab.topology import Process
from k8s_ext_connector.operator import rbac
from k8s_ext_connector_testbed.emulator import ApiServer
from tests.polling import wait_for

pytestmark = pytest.mark.root

T = TypeVar("T")
NODE = "gw1"
NAMESPACE = "external-services"
SECRET = host_key_secret_name(NODE)
LEASE = gateway_lease_name(NODE)
SOURCE_IP = "198.51.100.10"
TARGET_IP = "198.51.100.1"
TARGET_PORT = 7000
SSH_PORT = 2022
HEALTH_PORT = 9102
_counter = itertools.count(1000)  # never a number a Lab of this process takes


class NsLoop:
    """An event loop on a thread inside a namespace (threads inherit their creator's netns)."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        netns.call_in_netns(name, self.thread.start)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@dataclass
class Node:
    """A gateway node: its namespace, the API, the files the kubelet would mount."""

    ns: str
    loop: NsLoop
    api: ApiServer
    workdir: Path
    client: KeyPair
    gateway: Process | None = None

    @property
    def config_path(self) -> Path:
        return self.workdir / "config" / f"{NODE}.yaml"

    def write_config(self, *source_ips: str) -> None:
        doc = {
            "version": 1,
            "sshPort": SSH_PORT,
            "sshAllowFrom": ["198.51.100.0/24"],  # the clients here (the operator: the cluster)
            "sources": [
                {
                    "sourceIP": source_ip,
                    "clients": [
                        {
                            "name": "ns1/my-service1",
                            "publicKey": self.client.public_openssh,
                            "allow": [{"address": TARGET_IP, "port": TARGET_PORT}],
                        }
                    ],
                }
                for source_ip in source_ips or (SOURCE_IP,)
            ],
        }
        self.config_path.parent.mkdir(exist_ok=True)
        staged = self.config_path.with_suffix(".tmp")
        staged.write_text(yaml.safe_dump(doc))
        staged.rename(self.config_path)  # whole, as the kubelet's symlink swap

    def put_host_key(self, pair: KeyPair) -> None:
        """Create or replace the Secret as the operator does (store access: not recorded)."""
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/ssh-auth",
            "metadata": {"name": SECRET, "namespace": NAMESPACE},
            "data": {"ssh-privatekey": base64.b64encode(pair.private_openssh).decode()},
        }
        if self.api.get_object("", "v1", "secrets", NAMESPACE, SECRET) is None:
            self.api.create_object(body)
        else:
            rt = self.api.registry.lookup("", "v1", "secrets")
            assert rt is not None
            self.api.store.update(rt, NAMESPACE, SECRET, body)

    def start_gateway(self, *extra: str, key_file: Path | None = None) -> Process:
        kubeconfig = self.api.write_kubeconfig(self.workdir / "kubeconfig")
        key_args = (
            ["--host-key", str(key_file)]
            if key_file
            else ["--host-key-secret", SECRET, "--kubeconfig", str(kubeconfig)]
        )
        log_path = self.workdir / "gateway.log"
        argv = [
            sys.executable,
            "-m",
            "k8s_ext_connector",
            "gateway",
            "--config",
            str(self.config_path),
            *key_args,
            "--health-port",
            str(HEALTH_PORT),
            "--manage-addresses",
            "ext0",
            "--iptables-backend",
            "auto",
            "--reload-interval",
            "0.1",
            "--host-key-poll-interval",
            "0.2",
            *extra,
        ]
        with log_path.open("ab") as handle:
            popen = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, *argv],
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "POD_NAMESPACE": NAMESPACE, "NODE_NAME": NODE},
            )
        self.gateway = Process("gateway", popen, log_path)
        return self.gateway

    def output(self) -> str:
        return self.gateway.output() if self.gateway else ""

    def health(self, path: str) -> tuple[int, str]:
        return self.loop.run(_http_get("127.0.0.1", HEALTH_PORT, path))

    def not_ready(self) -> str | None:
        """/ready's reason while it answers 503, else None."""
        status, why = self.ready()
        return why if status == 503 else None

    def ready(self) -> tuple[int, str]:
        try:
            return self.health("/ready")
        except OSError as error:
            return 0, str(error)

    def gateway_requests(self) -> set[tuple[str, str, str]]:
        """Every call the API saw but those of its Lease: (verb, method, path). Only the
        gateway calls it here."""
        return {(r.verb, r.method, r.path) for r in self.api.requests if r.resource != "leases"}

    def lease(self) -> dict[str, Any] | None:
        return self.api.get_object("coordination.k8s.io", "v1", "leases", NAMESPACE, LEASE)

    def unserved(self) -> dict[str, str] | None:
        lease = self.lease()
        if lease is None:
            return None
        found: dict[str, str] = json.loads(lease["metadata"]["annotations"][UNSERVED_ANNOTATION])
        return found

    def lease_calls_allowed(self) -> bool:
        """Every Lease call is one the gateway's Role grants, on its own Lease, in its
        namespace (RBAC cannot name it; the test can)."""
        granted = {
            (r.group, r.resource, v) for r in rbac.GATEWAY_NAMESPACE_RULES for v in r.verbs
        }
        calls = [r for r in self.api.requests if r.resource == "leases"]
        return bool(calls) and all(
            (r.api_group, r.resource, r.verb) in granted
            and r.namespace == NAMESPACE
            and r.name in ("", LEASE)
            for r in calls
        )


async def _http_get(host: str, port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: probe\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body.strip()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    name = f"xcl{os.getpid()}n{next(_counter)}-gwic"  # swept by the lab if we die
    netns.sweep_orphans()
    loop: NsLoop | None = None
    api = ApiServer()
    started = False
    result: Node | None = None
    try:
        netns.add(name)
        for args in (
            ["link", "add", "ext0", "type", "veth", "peer", "name", "ext0-peer"],
            ["link", "set", "ext0", "up"],
            ["link", "set", "ext0-peer", "up"],
            ["addr", "add", f"{TARGET_IP}/32", "dev", "ext0"],
        ):
            netns.sh(["ip", "-n", name, *args])
        loop = NsLoop(name)
        loop.run(api.start())
        started = True
        loop.run(asyncio.start_server(_echo, TARGET_IP, TARGET_PORT))
        api.create_object(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
        )
        result = Node(name, loop, api, tmp_path, generate_key_pair())
        yield result
    finally:
        if result is not None and result.gateway is not None:
            result.gateway.stop(signal.SIGKILL, timeout=5)
        if loop is not None:
            if started:
                loop.run(api.stop())
            loop.close()
        netns.delete(name)


async def _connect(node: Node, host_key: KeyPair) -> asyncssh.SSHClientConnection:
    return await asyncssh.connect(
        SOURCE_IP,
        SSH_PORT,
        username="probe",
        client_keys=[asyncssh.import_private_key(node.client.private_openssh)],
        known_hosts=([asyncssh.import_public_key(host_key.public_openssh)], [], []),
        agent_path=None,
        config=None,
        connect_timeout=5,
    )


async def _echo_through(conn: asyncssh.SSHClientConnection, text: bytes) -> bytes:
    reader, writer = await conn.open_connection(TARGET_IP, TARGET_PORT)
    writer.write(text)
    writer.write_eof()
    data: bytes = await reader.read()
    writer.close()
    return data


def _verified_with(node: Node, host_key: KeyPair) -> str:
    """Return "ok" when a new connection pinned to ``host_key`` tunnels, else why it did not."""

    async def attempt() -> str:
        try:
            conn = await _connect(node, host_key)
        except (OSError, asyncssh.Error) as error:
            return type(error).__name__
        try:
            return "ok" if await _echo_through(conn, b"ping") == b"ping" else "no echo"
        finally:
            conn.close()

    return node.loop.run(attempt())


def test_waits_for_its_host_key_secret_serves_with_it_and_follows_a_new_one(node: Node) -> None:
    node.write_config()
    key_a, key_b = generate_key_pair(), generate_key_pair()
    gateway = node.start_gateway()  # namespace from POD_NAMESPACE, as in the chart's pod

    # No Secret yet: alive, not ready, asking for it; nothing installed.
    def waiting_for_secret() -> str | None:
        why = node.not_ready()
        return why if why and "waiting for Secret" in why else None

    why = wait_for(waiting_for_secret, 10, "/ready to report the missing Secret")
    assert SECRET in why
    assert NAMESPACE in why
    assert node.health("/healthz") == (200, "ok")
    wait_for(lambda: "not found yet" in node.output(), 5, "the gateway to log the wait")
    assert gateway.alive()
    assert SOURCE_IP not in netns.sh(["ip", "-n", node.ns, "addr", "show", "ext0"]).stdout

    node.put_host_key(key_a)
    wait_for(lambda: node.ready() == (200, "ready"), 15, "/ready after the Secret appeared")
    assert _verified_with(node, key_a) == "ok"
    held = node.loop.run(_connect(node, key_a))  # established before the switch
    try:
        node.put_host_key(key_b)
        wait_for(
            lambda: _verified_with(node, key_b) == "ok", 10, "new connections to get the new key"
        )
        assert _verified_with(node, key_a) == "HostKeyNotVerifiable"
        # The connection accepted with the old key carries on, in the same process.
        assert node.loop.run(_echo_through(held, b"still here")) == b"still here"
        assert gateway.alive()
        assert node.ready() == (200, "ready")
    finally:
        held.close()

    # RBAC: a get of that one Secret in that namespace, nothing else (no list, no watch),
    # and the writes of its own Lease.
    assert node.gateway_requests() == {
        ("get", "GET", f"/api/v1/namespaces/{NAMESPACE}/secrets/{SECRET}")
    }
    assert node.lease_calls_allowed()
    log = node.output()
    for pair in (key_a, key_b, node.client):
        private_body = b"".join(pair.private_openssh.splitlines()[1:-1]).decode()
        assert private_body[:40] not in log.replace("\n", "")  # no key material in logs
    assert "host key changed" in log
    assert gateway.stop(signal.SIGTERM) == 0
    assert SOURCE_IP not in netns.sh(["ip", "-n", node.ns, "addr", "show", "ext0"]).stdout


def test_wait_for_config_waits_until_the_file_appears(node: Node) -> None:
    key = generate_key_pair()
    node.put_host_key(key)
    gateway = node.start_gateway("--wait-for-config", "--namespace", NAMESPACE)

    why = wait_for(node.not_ready, 10, "/ready to answer while waiting")
    assert why == f"waiting for {node.config_path}"
    assert node.health("/healthz") == (200, "ok")
    assert gateway.alive()
    assert not node.api.requests  # the Secret is asked for once the config is there

    node.write_config()
    wait_for(lambda: node.ready() == (200, "ready"), 10, "/ready once the config appeared")
    assert _verified_with(node, key) == "ok"
    assert node.gateway_requests() == {
        ("get", "GET", f"/api/v1/namespaces/{NAMESPACE}/secrets/{SECRET}")
    }
    assert gateway.stop(signal.SIGTERM) == 0
    assert node.lease_calls_allowed()


def test_reports_the_source_ips_it_does_not_serve_through_its_lease(node: Node) -> None:
    """The issue's channel to the operator: TARGET_IP is on ext0 (this node's own address,
    not one the gateway added), so with --manage-addresses the gateway refuses it as a
    source IP and says so in its Lease, while SOURCE_IP is served. At SIGTERM the Lease is
    released: a stopped gateway reports nothing."""
    node.put_host_key(key := generate_key_pair())
    node.write_config(SOURCE_IP, TARGET_IP)
    gateway = node.start_gateway("--lease-renew-interval", "0.5")
    reason = (
        f"{TARGET_IP} is already an address of this node (on ext0) and not one the gateway "
        "added: refusing to take over the node's own address"
    )
    wait_for(lambda: node.unserved() == {TARGET_IP: reason}, 15, "the Lease to report it")
    lease = node.lease()
    assert lease is not None
    assert lease["spec"]["holderIdentity"] == NODE
    assert lease["spec"]["leaseDurationSeconds"] == 2  # three renewals of 0.5 s, rounded up
    assert _verified_with(node, key) == "ok"  # the other source IP is served
    assert node.not_ready() == f"{TARGET_IP} not served: {reason}"
    renewed = lease["spec"]["renewTime"]
    wait_for(
        lambda: (node.lease() or {})["spec"]["renewTime"] != renewed, 5, "a renewal of the Lease"
    )
    # The address stays the node's: not relabelled, not removed at stop.
    shown = netns.sh(["ip", "-n", node.ns, "-j", "addr", "show", "ext0"]).stdout
    assert f'"local":"{TARGET_IP}"' in shown.replace(" ", "")
    assert gateway.stop(signal.SIGTERM) == 0
    released = node.lease()
    assert released is not None
    assert "holderIdentity" not in released["spec"]
    assert node.unserved() == {}
    assert TARGET_IP in netns.sh(["ip", "-n", node.ns, "addr", "show", "ext0"]).stdout
    assert SOURCE_IP not in netns.sh(["ip", "-n", node.ns, "addr", "show", "ext0"]).stdout
    assert node.lease_calls_allowed()
    assert "Traceback" not in node.output()


def test_sigterm_while_waiting_exits_cleanly(node: Node) -> None:
    gateway = node.start_gateway("--wait-for-config")
    wait_for(node.not_ready, 10, "/ready to answer while waiting")
    assert gateway.stop(signal.SIGTERM) == 0
    assert "Traceback" not in node.output()


def test_a_host_key_file_is_followed_too(node: Node) -> None:
    """Outside the cluster (and in the lab): a changed --host-key file needs no restart."""
    node.write_config()
    key_a, key_b = generate_key_pair(), generate_key_pair()
    key_file = node.workdir / "host-key" / "ssh-privatekey"
    write_private_key(key_file, key_a)
    gateway = node.start_gateway(key_file=key_file)
    wait_for(lambda: node.ready() == (200, "ready"), 10, "/ready with the key file")
    assert _verified_with(node, key_a) == "ok"
    staged = node.workdir / "host-key" / "staged"
    write_private_key(staged, key_b)
    staged.rename(key_file)
    wait_for(lambda: _verified_with(node, key_b) == "ok", 10, "new connections to get the new key")
    assert gateway.alive()
    assert not node.api.requests  # a key file: no API at all
