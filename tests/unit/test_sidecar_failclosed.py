"""The sidecar fails closed and one bad rule fails alone (issue #10), without root.

- ``served``: an IPv6 destination is left out and named; the rest of the config is served.
- ``readiness``: the pure choice documented in docs/architecture.md ("Readiness").
- The agent and ``run()`` against a fake iptables: the rules are never removed (stop, an
  exception), the hold is in while the config is missing and goes only once the egress
  rules are in, and the rules precede the key.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path
from typing import Any

import asyncssh
import pytest
import yaml

from k8s_ext_connector.core.config import GatewayEndpoint, SidecarConfig
from k8s_ext_connector.sidecar import main as sidecar_main
from k8s_ext_connector.sidecar.agent import SidecarAgent, hold, take_over
from k8s_ext_connector.sidecar.readiness import readiness
from k8s_ext_connector.sidecar.rules import EGRESS_CHAIN, HOLD_CHAIN, served
from k8s_ext_connector.sidecar.sessions import GatewayStatus
from tests.polling import wait_for
from tests.unit.fake_iptables import FakeIptables
from tests.unit.samples import KEY_A, KEY_B, sidecar_doc


def _config(doc: dict[str, Any]) -> SidecarConfig:
    return SidecarConfig.from_dict(doc)


def _two_rules(second_gateway: str = "2001:db8::5", second_intercept: str = "10.96.0.20") -> \
        dict[str, Any]:
    doc = sidecar_doc()
    doc["rules"].append({
        "name": "default/other:9000",
        "intercept": [{"address": second_intercept, "port": 9000}],
        "gateway": {"address": second_gateway, "port": 2022, "hostKey": KEY_B},
        "target": {"address": "192.168.122.150", "port": 9000},
    })
    return doc


# ---- served -----------------------------------------------------------------------------


def test_an_ipv6_rule_is_left_out_and_named_the_others_stay() -> None:
    split = served(_config(_two_rules(second_intercept="2001:db8::20")))
    assert [rule.name for rule in split.config.rules] == ["default/my-externalservice:8000"]
    (problem,) = split.problems
    assert "default/other:9000" in problem
    assert "rules[1].intercept[0]" in problem
    assert "[2001:db8::20]:9000" in problem
    assert split.config.gateways() == (GatewayEndpoint("192.168.122.200", KEY_A),)


def test_an_all_ipv4_config_is_served_whole() -> None:
    config = _config(_two_rules())
    assert served(config).config == config
    assert served(config).problems == ()


# ---- readiness --------------------------------------------------------------------------

GOOD = GatewayEndpoint("192.168.122.200", KEY_A)
BAD = GatewayEndpoint("2001:db8::5", KEY_B)
UNREACHABLE = "[Errno 101] Network is unreachable"


def _up(gateway: GatewayEndpoint) -> GatewayStatus:
    return GatewayStatus(gateway, True, "", True, 0.0)


def _down(gateway: GatewayEndpoint, down_for: float, once: bool = False) -> GatewayStatus:
    return GatewayStatus(gateway, False, UNREACHABLE, once, down_for)


def _ready(sessions: tuple[GatewayStatus, ...], starting: bool,
           problems: tuple[str, ...] = ()) -> tuple[bool, str]:
    return readiness(_config(_two_rules()), problems, sessions,
                     listening=True, starting=starting, grace=10)


def test_one_unreachable_gateway_holds_the_start_only_for_the_grace() -> None:
    ok, detail = _ready((_up(GOOD), _down(BAD, 2)), starting=True)
    assert not ok
    assert detail.startswith("connecting: ")
    ok, detail = _ready((_up(GOOD), _down(BAD, 10.5)), starting=True)
    assert ok
    assert detail == (f"degraded: gateway [2001:db8::5]:2022 (rules default/other:9000): "
                      f"{UNREACHABLE}")


def test_after_the_first_ready_a_lost_gateway_degrades_but_does_not_unready() -> None:
    ok, detail = _ready((_up(GOOD), _down(BAD, 0.1, once=True)), starting=False)
    assert ok
    assert "[2001:db8::5]:2022" in detail
    ok, detail = _ready((_up(GOOD), _down(BAD, 0.1)), starting=False)
    assert ok  # a gateway added by a reload never holds a running pod back


def test_not_ready_when_nothing_asked_for_is_served() -> None:
    ok, detail = _ready((_down(GOOD, 30, once=True), _down(BAD, 30)), starting=False)
    assert not ok
    assert "192.168.122.200:2022 (rules default/my-externalservice:8000)" in detail
    assert "[2001:db8::5]:2022 (rules default/other:9000)" in detail
    only_unsupported = readiness(_config({"rules": []}), ("rule x: IPv6",), (),
                                 listening=True, starting=False)
    assert only_unsupported == (False, "rule x: IPv6")


def test_unsupported_destinations_are_named_while_ready() -> None:
    ok, detail = _ready((_up(GOOD), _up(BAD)), starting=False, problems=("rule v6: IPv6",))
    assert (ok, detail) == (True, "degraded: rule v6: IPv6")


def test_plain_cases() -> None:
    assert _ready((_up(GOOD), _up(BAD)), starting=True) == (True, "ready")
    assert readiness(_config({"rules": []}), (), (), listening=True, starting=True) == (
        True, "ready")
    assert readiness(_config(_two_rules()), (), (_up(GOOD), _up(BAD)), listening=False,
                     starting=False) == (False, "listener not up")


# ---- the agent never removes its rules ---------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _local_config(listen_port: int) -> SidecarConfig:
    doc = sidecar_doc()
    doc["listenPort"] = listen_port
    doc["rules"][0]["gateway"] = {"address": "127.0.0.1", "port": _closed_port(),
                                  "hostKey": KEY_A}
    return _config(doc)


def test_stop_leaves_the_rules_and_a_restart_takes_them_over() -> None:
    fake = FakeIptables()
    config = _local_config(_closed_port())
    key = asyncssh.generate_private_key("ssh-ed25519")

    async def run_once() -> None:
        agent = SidecarAgent(config, key, fake)
        await agent.start()
        await agent.stop()

    asyncio.run(run_once())
    rules = list(fake.tables["nat"][EGRESS_CHAIN])
    assert len(rules) == 2
    restores = len(fake.restores)
    asyncio.run(run_once())
    assert fake.tables["nat"][EGRESS_CHAIN] == rules
    assert len(fake.restores) == restores  # taken over as they are: nothing written


def test_a_health_port_taken_crashes_the_sidecar_but_leaves_its_rules(tmp_path: Path) -> None:
    fake = FakeIptables()
    config_path = tmp_path / "sidecar.yaml"
    config = _local_config(_closed_port())
    config_path.write_text(yaml.safe_dump(config.to_dict()))
    key = asyncssh.generate_private_key("ssh-ed25519")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = sidecar_main.SidecarSettings(
            config_path, tmp_path / "key", "nft", "127.0.0.1", taken.getsockname()[1], 0.1, "info")
        with pytest.raises(OSError, match="address already in use"):
            asyncio.run(sidecar_main._serve(settings, config, key, fake))
    assert len(fake.tables["nat"][EGRESS_CHAIN]) == 2
    assert any(EGRESS_CHAIN in spec for spec in fake.tables["nat"]["OUTPUT"])


# ---- hold, then rules, then the key -------------------------------------------------------


def test_hold_is_skipped_when_egress_rules_of_an_earlier_run_are_in() -> None:
    fake = FakeIptables()
    take_over(fake, _config(sidecar_doc()))
    assert hold(fake) is False
    assert HOLD_CHAIN not in fake.tables["filter"]


def test_run_holds_while_waiting_then_rules_before_the_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--wait-for-config`` with neither file: hold; config: rules in, hold out; key: run."""
    fake = FakeIptables()
    started = threading.Event()
    monkeypatch.setattr(sidecar_main, "_firewall", lambda settings: fake)
    monkeypatch.setattr(sidecar_main, "setup_logging", lambda level: None)

    def run_agent(body: object) -> int:
        started.set()
        return 0

    monkeypatch.setattr(sidecar_main, "run_agent", run_agent)
    config_path, key_path = tmp_path / "sidecar.yaml", tmp_path / "ssh-privatekey"
    settings = sidecar_main.SidecarSettings(
        config_path, key_path, "nft", "127.0.0.1", 0, 0.02, "info", wait_for_config=True)
    outcome: list[int] = []
    thread = threading.Thread(target=lambda: outcome.append(sidecar_main.run(settings)))
    thread.start()
    try:
        wait_for(lambda: HOLD_CHAIN in fake.tables["filter"], 5, "the hold")
        assert EGRESS_CHAIN not in fake.tables["nat"]
        config_path.write_text(yaml.safe_dump(sidecar_doc()))
        wait_for(lambda: HOLD_CHAIN not in fake.tables["filter"], 5, "the hold to go")
        assert len(fake.tables["nat"][EGRESS_CHAIN]) == 2  # in before the hold went
        egress = next(i for i, r in enumerate(fake.restores) if f":{EGRESS_CHAIN}" in r)
        release = next(i for i, r in enumerate(fake.restores) if f"-X {HOLD_CHAIN}" in r)
        assert egress < release
        assert not started.is_set()  # still waiting for the key
        key_path.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key())
        wait_for(started.is_set, 5, "the agent to start")
    finally:
        config_path.touch()
        key_path.touch()
        thread.join(10)
    assert outcome == [0]
