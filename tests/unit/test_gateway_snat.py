"""The gateway's source-IP SNAT guard: pure rendering, golden files, the first-jump diff,
and the agent (apply, reload, periodic repair, stop) on a fake iptables. No root needed.

Golden cases are pairs in ``tests/golden/gateway-snat/``:

- ``<case>.yaml``: a gateway config document (what the operator writes for one node);
- ``<case>.rules``: what that config produces on an empty nat table, as
  ``iptables-restore --noflush`` text, followed by the ``ip6tables-restore`` text when the
  config has an IPv6 source IP.

Add a YAML file to add a case. Regenerate after an intended change with
``REGEN_GOLDEN=1 .venv/bin/pytest tests/unit/test_gateway_snat.py`` and review the diff.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import asyncssh
import pytest

from k8s_ext_connector import cli
from k8s_ext_connector.core.config import GatewayConfig, SourceIPConfig, parse_document
from k8s_ext_connector.core.errors import ConfigError
from k8s_ext_connector.core.iptables import (
    ChainSet,
    Family,
    IptablesError,
    Jump,
    ObservedTable,
    apply,
    remove,
    restore_text,
)
from k8s_ext_connector.gateway import main as gateway_main
from k8s_ext_connector.gateway.agent import GatewayAgent
from k8s_ext_connector.gateway.rules import (
    INGRESS_CHAIN,
    SNAT_CHAIN,
    SNAT_OWNED_PREFIX,
    SNAT_TABLE,
    family_of,
    render_snat_rules,
)
from tests.golden_files import GoldenDir
from tests.polling import wait_for_async
from tests.ports import free_port
from tests.unit.fake_iptables import FakeIptables

pytestmark = pytest.mark.timeout(60)

GOLDEN = GoldenDir(Path(__file__).resolve().parents[1] / "golden" / "gateway-snat",
                   ".yaml", ".rules", minimum_cases=4)
CASES = GOLDEN.cases()
HEADERS: dict[Family, str] = {"ipv4": "# iptables-restore --noflush\n",
                              "ipv6": "# ip6tables-restore --noflush\n"}

# What kindnet (KIND-MASQ-AGENT) and kube-proxy put in nat POSTROUTING: never ours to touch.
KINDNET = {
    "POSTROUTING": [
        '-m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
        '-m addrtype ! --dst-type LOCAL -m comment --comment "kind-masq-agent: ensure nat '
        'POSTROUTING directs all non-LOCAL destination traffic to our custom KIND-MASQ-AGENT '
        'chain" -j KIND-MASQ-AGENT',
    ],
    "KUBE-POSTROUTING": ["-m mark ! --mark 0x4000/0x4000 -j RETURN",
                         "-j MASQUERADE --random-fully"],
    "KIND-MASQ-AGENT": [
        '-d 10.244.0.0/16 -m comment --comment "kind-masq-agent: local traffic is not '
        'subject to MASQUERADE" -j RETURN',
        '-m comment --comment "kind-masq-agent: outbound traffic is subject to MASQUERADE '
        '(must be last in chain)" -j MASQUERADE',
    ],
}
CNI_RESYNC = "-m addrtype ! --dst-type LOCAL -j MASQUERADE"


def _config(case: Path) -> GatewayConfig:
    return GatewayConfig.from_dict(parse_document(case.read_text(), str(case)))


def _seed() -> GatewayConfig:
    return _config(GOLDEN.path / "seed.yaml")


def _families(config: GatewayConfig) -> list[Family]:
    v6 = any(family_of(source.source_ip) == "ipv6" for source in config.sources)
    return ["ipv4", "ipv6"] if v6 else ["ipv4"]


def _render(config: GatewayConfig, family: Family) -> str:
    text = restore_text(render_snat_rules(config, family), ObservedTable())
    assert text is not None  # an empty table always needs the chain and its jump
    return text


def _sections(case: Path) -> dict[Family, str]:
    text = GOLDEN.output(case).read_text()
    sections: dict[Family, str] = {}
    for family, header in HEADERS.items():
        if header in text:
            sections[family] = text.split(header, 1)[1].split("# ip", 1)[0]
    return sections


def _kindnet_node() -> FakeIptables:
    fake = FakeIptables()
    for chain, specs in KINDNET.items():
        fake.add("nat", chain, *specs)
    return fake


# ---- the pure render and its golden files ------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_golden(case: Path) -> None:
    config = _config(case)
    GOLDEN.check(case, "".join(HEADERS[f] + _render(config, f) for f in _families(config)))


def test_no_stale_goldens() -> None:
    GOLDEN.check_no_stale()


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_golden_on_a_kindnet_node_puts_the_jump_first_and_reruns_as_a_no_op(case: Path) -> None:
    config = _config(case)
    for family, text in _sections(case).items():
        fake = _kindnet_node()
        fake.restore(text)
        desired = render_snat_rules(config, family)
        assert apply(fake, desired) is False
        nat = fake.tables["nat"]
        assert nat["POSTROUTING"] == [desired.jumps[0].spec, *KINDNET["POSTROUTING"]]
        for chain in ("KUBE-POSTROUTING", "KIND-MASQ-AGENT"):
            assert nat[chain] == KINDNET[chain]


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_one_same_address_snat_per_source_ip_of_the_family(case: Path) -> None:
    config = _config(case)
    for family in ("ipv4", "ipv6"):
        host = "/128" if family == "ipv6" else "/32"
        specs = render_snat_rules(config, family).chains[SNAT_CHAIN]
        addresses = [s.source_ip for s in config.sources if family_of(s.source_ip) == family]
        assert len(specs) == len(addresses)
        for spec, address in zip(specs, addresses, strict=True):
            assert spec.startswith(f"-s {address}{host} -m comment --comment ")
            assert spec.endswith(f" -j SNAT --to-source {address}")
            # Nothing else to match: whatever leaves from the source IP keeps it.
            for option in ("-d ", "-p ", "-o ", "--dport", "-m conntrack", "-m mark"):
                assert option not in spec


def test_chain_set_shape() -> None:
    chain_set = render_snat_rules(_seed())
    assert chain_set.table == SNAT_TABLE == "nat"
    assert list(chain_set.chains) == [SNAT_CHAIN]
    assert chain_set.owned_prefix == SNAT_OWNED_PREFIX
    (jump,) = chain_set.jumps
    assert jump.chain == "POSTROUTING"
    assert jump.first
    # The jump matches everything (the chain decides), so it must be first to see it all.
    assert jump.spec.startswith("-m comment --comment ")
    assert jump.spec.endswith(f"-j {SNAT_CHAIN}")
    assert all("-m comment --comment" in spec for spec in chain_set.chains[SNAT_CHAIN])


def test_the_other_family_renders_an_empty_chain() -> None:
    assert render_snat_rules(_seed(), "ipv6").chains == {SNAT_CHAIN: ()}


# ---- the diff: the jump stays first, without churn ---------------------------------------


def _applied(config: GatewayConfig) -> FakeIptables:
    fake = _kindnet_node()
    assert apply(fake, render_snat_rules(config)) is True
    return fake


def test_a_rule_inserted_above_the_jump_moves_the_jump_back_on_top_and_nothing_else() -> None:
    desired = render_snat_rules(_seed())
    jump = desired.jumps[0].spec
    fake = _applied(_seed())
    fake.tables["nat"]["POSTROUTING"].insert(0, CNI_RESYNC)  # a CNI resync inserts above us
    text = restore_text(desired, ObservedTable.parse(fake.save("nat")))
    # Only the jump moves: our chain is not rewritten, no other rule is touched.
    assert text == f"*nat\n-D POSTROUTING {jump}\n-I POSTROUTING 1 {jump}\nCOMMIT\n"
    assert apply(fake, desired) is True
    assert fake.tables["nat"]["POSTROUTING"] == [jump, CNI_RESYNC, *KINDNET["POSTROUTING"]]
    assert fake.tables["nat"][SNAT_CHAIN] == list(desired.chains[SNAT_CHAIN])
    assert apply(fake, desired) is False


def test_already_first_is_a_no_op_whatever_follows() -> None:
    fake = _applied(_seed())
    fake.tables["nat"]["POSTROUTING"].append(CNI_RESYNC)  # appended below us: fine
    restores = len(fake.restores)
    assert apply(fake, render_snat_rules(_seed())) is False
    assert len(fake.restores) == restores


def test_a_duplicate_jump_further_down_leaves_one_jump_on_top_in_one_transaction() -> None:
    desired = render_snat_rules(_seed())
    jump = desired.jumps[0].spec
    fake = _applied(_seed())
    fake.tables["nat"]["POSTROUTING"].append(jump)
    # "-D" by rule text deletes the first match (the one on top, as the fake does too), so
    # both go and one comes back on top.
    text = restore_text(desired, ObservedTable.parse(fake.save("nat")))
    assert text == (f"*nat\n-D POSTROUTING {jump}\n-D POSTROUTING {jump}\n"
                    f"-I POSTROUTING 1 {jump}\nCOMMIT\n")
    assert apply(fake, desired) is True
    assert fake.tables["nat"]["POSTROUTING"] == [jump, *KINDNET["POSTROUTING"]]
    assert apply(fake, desired) is False


def test_leftovers_of_a_crashed_run_are_replaced() -> None:
    fake = _kindnet_node()
    # An older version's chain and jump, and our chain with a stale rule, below kindnet's.
    fake.add("nat", "EXTCONN-SNAT-OLD", "-j RETURN")
    fake.add("nat", SNAT_CHAIN, "-s 192.0.2.1/32 -j SNAT --to-source 192.0.2.1")
    fake.add("nat", "POSTROUTING", "-j EXTCONN-SNAT-OLD", f"-j {SNAT_CHAIN}")
    desired = render_snat_rules(_seed())
    assert apply(fake, desired) is True
    nat = fake.tables["nat"]
    assert "EXTCONN-SNAT-OLD" not in nat
    assert nat[SNAT_CHAIN] == list(desired.chains[SNAT_CHAIN])
    assert nat["POSTROUTING"] == [desired.jumps[0].spec, *KINDNET["POSTROUTING"]]


def test_reload_rewrites_the_chain_and_leaves_the_jump_where_it_is() -> None:
    fake = _applied(_seed())
    one = GatewayConfig(sources=(SourceIPConfig("192.168.122.201"),))
    desired = render_snat_rules(one)
    text = restore_text(desired, ObservedTable.parse(fake.save("nat")))
    assert text is not None
    assert "POSTROUTING" not in text
    apply(fake, desired)
    assert fake.tables["nat"][SNAT_CHAIN] == list(desired.chains[SNAT_CHAIN])
    assert len(fake.tables["nat"][SNAT_CHAIN]) == 1


def test_remove_leaves_the_nodes_masquerade_untouched() -> None:
    fake = _applied(_seed())
    assert remove(fake, SNAT_TABLE, SNAT_OWNED_PREFIX) is True
    assert fake.tables["nat"] == _kindnet_node().tables["nat"]


# ---- core.iptables: ``first`` jumps in general --------------------------------------------


def test_several_first_jumps_lead_in_order_and_other_jumps_go_below_them() -> None:
    chains = {"EXTCONN-A": ("-j RETURN",), "EXTCONN-B": ("-j RETURN",), "EXTCONN-C": ()}
    desired = ChainSet(
        table="nat",
        chains=chains,
        jumps=(
            Jump("POSTROUTING", "-j EXTCONN-A", first=True),
            Jump("POSTROUTING", "-j EXTCONN-C"),
            Jump("POSTROUTING", "-j EXTCONN-B", first=True),
        ),
    )
    fake = FakeIptables().add("nat", "POSTROUTING", "-j FOREIGN")
    apply(fake, desired)
    assert fake.tables["nat"]["POSTROUTING"] == [
        "-j EXTCONN-A", "-j EXTCONN-B", "-j EXTCONN-C", "-j FOREIGN"]
    assert apply(fake, desired) is False
    # Leading jumps in place, a non-first one missing: it goes right below them.
    fake.tables["nat"]["POSTROUTING"].remove("-j EXTCONN-C")
    apply(fake, desired)
    assert fake.tables["nat"]["POSTROUTING"][:3] == ["-j EXTCONN-A", "-j EXTCONN-B", "-j EXTCONN-C"]
    # Swapped leading jumps are put back in order.
    fake.tables["nat"]["POSTROUTING"][:2] = ["-j EXTCONN-B", "-j EXTCONN-A"]
    apply(fake, desired)
    assert fake.tables["nat"]["POSTROUTING"][:2] == ["-j EXTCONN-A", "-j EXTCONN-B"]
    assert apply(fake, desired) is False


def test_a_jump_that_need_not_be_first_stays_where_it_is() -> None:
    desired = ChainSet(table="nat", chains={"EXTCONN-A": ()},
                       jumps=(Jump("POSTROUTING", "-j EXTCONN-A"),))
    fake = FakeIptables().add("nat", "POSTROUTING", "-j FOREIGN", "-j EXTCONN-A")
    fake.add("nat", "EXTCONN-A")
    assert apply(fake, desired) is False


# ---- the agent: applied with ingress, followed on reload, repaired, removed at stop ------

SOURCE_A, SOURCE_B = "127.0.0.2", "127.0.0.3"


def _agent_config(*sources: str) -> GatewayConfig:
    port = free_port(SOURCE_A)
    return GatewayConfig(sources=tuple(SourceIPConfig(s) for s in sources), ssh_port=port)


def _snat_sources(fake: FakeIptables) -> list[str]:
    return [spec.split()[1] for spec in fake.tables["nat"].get(SNAT_CHAIN, [])]


def test_agent_applies_follows_reloads_repairs_and_removes_the_guard() -> None:
    fake = _kindnet_node()
    fake.add("nat", "EXTCONN-SNAT-OLD", "-j RETURN")  # a leftover of an older version
    fake.add("nat", "POSTROUTING", "-j EXTCONN-SNAT-OLD")

    async def body() -> None:
        first = _agent_config(SOURCE_A)
        agent = GatewayAgent(first, asyncssh.generate_private_key("ssh-ed25519"),
                             firewalls={"ipv4": fake}, rules_check_interval=0.05)
        await agent.start()
        jump = render_snat_rules(first).jumps[0].spec
        nat = fake.tables["nat"]
        assert _snat_sources(fake) == [f"{SOURCE_A}/32"]
        assert nat["POSTROUTING"] == [jump, *KINDNET["POSTROUTING"]]
        assert "EXTCONN-SNAT-OLD" not in nat
        assert INGRESS_CHAIN in fake.tables["filter"]  # the ingress chain is applied too

        # Checks that find nothing to repair write nothing (no churn).
        restores, saves = len(fake.restores), fake.saves
        await wait_for_async(lambda: fake.saves >= saves + 6, what="three rounds of checks")
        assert len(fake.restores) == restores

        # A CNI resync inserts above the jump: the next check moves it back on top.
        fake.tables["nat"]["POSTROUTING"].insert(0, CNI_RESYNC)
        await wait_for_async(lambda: fake.tables["nat"]["POSTROUTING"][0] == jump,
                             what="the jump on top")
        assert fake.tables["nat"]["POSTROUTING"] == [jump, CNI_RESYNC, *KINDNET["POSTROUTING"]]

        # Reload: a source IP added, then the first one removed.
        await agent.apply(_agent_config(SOURCE_A, SOURCE_B))
        assert _snat_sources(fake) == [f"{SOURCE_A}/32", f"{SOURCE_B}/32"]
        await agent.apply(_agent_config(SOURCE_B))
        assert _snat_sources(fake) == [f"{SOURCE_B}/32"]

        await agent.stop()
        assert SNAT_CHAIN not in fake.tables["nat"]
        assert INGRESS_CHAIN not in fake.tables["filter"]
        assert fake.tables["nat"]["POSTROUTING"] == [CNI_RESYNC, *KINDNET["POSTROUTING"]]
        # The check is over: nothing can bring the rules back after stop.
        assert agent._check is not None
        assert agent._check.done()
        assert agent._rules_config is None

    asyncio.run(body())


def test_agent_without_the_guard_installs_no_snat_and_removes_a_leftover() -> None:
    fake = _kindnet_node()
    fake.add("nat", SNAT_CHAIN, f"-s {SOURCE_A}/32 -j SNAT --to-source {SOURCE_A}")
    fake.add("nat", "POSTROUTING", f"-j {SNAT_CHAIN}")

    async def body() -> None:
        agent = GatewayAgent(_agent_config(SOURCE_A), asyncssh.generate_private_key("ssh-ed25519"),
                             firewalls={"ipv4": fake}, snat_guard=False)
        await agent.start()
        assert fake.tables["nat"] == _kindnet_node().tables["nat"]
        assert INGRESS_CHAIN in fake.tables["filter"]
        await agent.stop()

    asyncio.run(body())


class _BrokenAfter(FakeIptables):
    broken = False

    def save(self, table: str) -> str:
        if self.broken:
            raise IptablesError("iptables-nft-save -t nat failed: test")
        return super().save(table)


def test_a_failing_check_is_logged_and_retried(caplog: pytest.LogCaptureFixture) -> None:
    fake = _BrokenAfter()

    async def body() -> None:
        config = _agent_config(SOURCE_A)
        agent = GatewayAgent(config, asyncssh.generate_private_key("ssh-ed25519"),
                             firewalls={"ipv4": fake}, rules_check_interval=0.02)
        await agent.start()
        jump = render_snat_rules(config).jumps[0].spec
        fake.broken = True
        await wait_for_async(lambda: caplog.text.count("checking iptables rules failed") >= 2,
                             what="two failed checks, logged")
        fake.tables["nat"]["POSTROUTING"].insert(0, CNI_RESYNC)
        fake.broken = False
        await wait_for_async(lambda: fake.tables["nat"]["POSTROUTING"][0] == jump,
                             what="the check working again")
        await agent.stop()

    with caplog.at_level(logging.ERROR, logger="k8s_ext_connector.gateway.agent"):
        asyncio.run(body())


class _NoNat(FakeIptables):
    """A node whose kernel cannot provide this family's nat table (no ip6table_nat)."""

    def save(self, table: str) -> str:
        if table == "nat":
            raise IptablesError("ip6tables-legacy-save -t nat failed: table does not exist")
        return super().save(table)


def test_a_family_without_a_nat_table_is_skipped_while_it_has_no_source_ip() -> None:
    v4, v6 = FakeIptables(), _NoNat()

    async def body() -> None:
        agent = GatewayAgent(_agent_config(SOURCE_A), asyncssh.generate_private_key("ssh-ed25519"),
                             firewalls={"ipv4": v4, "ipv6": v6})
        await agent.start()
        assert _snat_sources(v4) == [f"{SOURCE_A}/32"]
        assert INGRESS_CHAIN in v6.tables["filter"]
        await agent.stop()  # the IPv6 nat removal fails, is logged, and the rest goes
        assert SNAT_CHAIN not in v4.tables["nat"]
        assert INGRESS_CHAIN not in v4.tables["filter"]
        assert INGRESS_CHAIN not in v6.tables["filter"]

    asyncio.run(body())


def test_an_ipv6_source_ip_without_an_ipv6_nat_table_is_an_error() -> None:
    async def body() -> None:
        config = GatewayConfig(sources=(SourceIPConfig("2001:db8::200"),))
        agent = GatewayAgent(config, asyncssh.generate_private_key("ssh-ed25519"),
                             firewalls={"ipv4": FakeIptables(), "ipv6": _NoNat()})
        with pytest.raises(IptablesError, match="table does not exist"):
            await agent.apply(config)
        await agent.stop()

    asyncio.run(body())


# ---- the gateway command's options -------------------------------------------------------


def test_the_guard_is_on_by_default_and_checked_every_10_seconds(tmp_path: Path) -> None:
    args = ["gateway", "--config", str(tmp_path / "c.yaml"), "--host-key", str(tmp_path / "k")]
    settings = gateway_main.settings_from(cli.build_parser().parse_args(args))
    assert settings.snat_guard is True
    assert settings.rules_check_interval == 10.0
    off = gateway_main.settings_from(
        cli.build_parser().parse_args([*args, "--no-snat-guard", "--rules-check-interval", "2"]))
    assert (off.snat_guard, off.rules_check_interval) == (False, 2.0)


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_a_bad_check_interval_is_refused(tmp_path: Path, value: str) -> None:
    args = ["gateway", "--config", str(tmp_path / "c.yaml"), "--host-key", str(tmp_path / "k"),
            "--rules-check-interval", value]
    with pytest.raises(ConfigError, match=r"--rules-check-interval: .*: must be > 0"):
        gateway_main.settings_from(cli.build_parser().parse_args(args))
