"""Golden files for the gateway's ingress filter rules (``gateway.rules.render_ingress_rules``).

Each case is a pair in ``tests/golden/gateway-ingress/``:

- ``<case>.yaml``: a gateway config document (what the operator writes for one node);
- ``<case>.rules``: what that config produces on empty filter tables, as
  ``iptables-restore --noflush`` text, followed by the ``ip6tables-restore`` text when the
  config has an IPv6 source IP.

Add a YAML file to add a case. Regenerate after an intended change with
``REGEN_GOLDEN=1 .venv/bin/pytest tests/unit/test_gateway_rules.py`` and review the diff.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from k8s_ext_connector.core.config import GatewayConfig, parse_document
from k8s_ext_connector.core.iptables import Family, ObservedTable, apply, restore_text
from k8s_ext_connector.gateway.rules import (
    INGRESS_CHAIN,
    OWNED_PREFIX,
    family_of,
    render_ingress_rules,
)
from tests.golden_files import GoldenDir
from tests.unit.fake_iptables import FakeIptables

GOLDEN = GoldenDir(Path(__file__).resolve().parents[1] / "golden" / "gateway-ingress",
                   ".yaml", ".rules", minimum_cases=4)
CASES = GOLDEN.cases()
HEADERS: dict[Family, str] = {"ipv4": "# iptables-restore --noflush\n",
                              "ipv6": "# ip6tables-restore --noflush\n"}


def _config(case: Path) -> GatewayConfig:
    return GatewayConfig.from_dict(parse_document(case.read_text(), str(case)))


def _families(config: GatewayConfig) -> list[Family]:
    v6 = any(family_of(source.source_ip) == "ipv6" for source in config.sources)
    return ["ipv4", "ipv6"] if v6 else ["ipv4"]


def _render(config: GatewayConfig, family: Family) -> str:
    text = restore_text(render_ingress_rules(config, family), ObservedTable())
    assert text is not None  # an empty table always needs the chain and its jump
    return text


def _sections(case: Path) -> dict[Family, str]:
    text = GOLDEN.output(case).read_text()
    sections: dict[Family, str] = {}
    for family, header in HEADERS.items():
        if header in text:
            sections[family] = text.split(header, 1)[1].split("# ip", 1)[0]
    return sections


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_golden(case: Path) -> None:
    config = _config(case)
    GOLDEN.check(case, "".join(HEADERS[f] + _render(config, f) for f in _families(config)))


def test_no_stale_goldens() -> None:
    GOLDEN.check_no_stale()


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_golden_applies_and_reruns_as_a_no_op(case: Path) -> None:
    config = _config(case)
    for family, text in _sections(case).items():
        fake = FakeIptables()
        fake.add("filter", "INPUT", "-i lo -j ACCEPT").add("filter", "KUBE-FIREWALL", "-j RETURN")
        fake.restore(text)
        desired = render_ingress_rules(config, family)
        assert apply(fake, desired) is False
        assert fake.tables["filter"]["INPUT"] == [desired.jumps[0].spec, "-i lo -j ACCEPT"]
        assert fake.tables["filter"]["KUBE-FIREWALL"] == ["-j RETURN"]


def _verdict(specs: list[str], src: str, dst: str, proto: str = "tcp", port: int = 0,
             iface: str = "eth0") -> str:
    """First match of a NEW packet in the rendered chain (the matches the renderer uses)."""
    def opt(words: list[str], name: str) -> str | None:
        return words[words.index(name) + 1] if name in words else None

    for spec in specs:
        words = spec.split()
        source, dest = opt(words, "-s"), opt(words, "-d")
        if source and ipaddress.ip_address(src) not in ipaddress.ip_network(source):
            continue
        if dest and ipaddress.ip_address(dst) not in ipaddress.ip_network(dest):
            continue
        if opt(words, "-i") not in (None, iface) or opt(words, "-p") not in (None, proto):
            continue
        if opt(words, "--dport") not in (None, str(port)):
            continue
        return spec.rsplit("-j ", 1)[1]
    return "RETURN"


RESET = "REJECT --reject-with tcp-reset"


def test_source_ips_answer_ssh_to_the_cluster_and_ingress_ports_to_their_targets_only() -> None:
    config = _config(GOLDEN.path / "seed.yaml")
    specs = list(render_ingress_rules(config).chains[INGRESS_CHAIN])
    sip, target, pod, node, stranger = (
        "192.168.122.200", "192.168.122.139", "10.244.3.7", "192.168.122.11", "192.168.122.99")
    assert _verdict(specs, pod, sip, port=2022) == "ACCEPT"
    assert _verdict(specs, node, sip, port=2022) == "ACCEPT"
    assert _verdict(specs, sip, sip, port=2022, iface="lo") == "ACCEPT"
    assert _verdict(specs, target, sip, port=2022) == RESET
    assert _verdict(specs, stranger, sip, port=2022) == RESET
    assert _verdict(specs, target, sip, port=80) == "ACCEPT"
    for src in (pod, stranger, node):
        assert _verdict(specs, src, sip, port=80) == RESET
    for port in (22, 443, 10250, 30080):  # the node's own services, NodePorts bound locally
        assert _verdict(specs, target, sip, port=port) == RESET
        assert _verdict(specs, pod, sip, port=port) == RESET
    unreachable = "REJECT --reject-with icmp-port-unreachable"
    assert _verdict(specs, target, sip, proto="udp", port=53) == unreachable
    assert _verdict(specs, target, sip, proto="icmp") == unreachable
    # Anything not addressed to a source IP is not ours to judge.
    assert _verdict(specs, stranger, "192.168.122.10", port=22) == "RETURN"
    # Every refusal is of NEW connections only: replies and established ones pass.
    assert all("--ctstate NEW" in s for s in specs if "-j REJECT" in s)


def test_without_ssh_allow_from_ssh_answers_the_node_itself_only() -> None:
    config = _config(GOLDEN.path / "egress-only.yaml")
    assert config.ssh_allow_from == ()
    specs = list(render_ingress_rules(config).chains[INGRESS_CHAIN])
    sip = "192.168.122.200"
    assert _verdict(specs, sip, sip, port=2022, iface="lo") == "ACCEPT"
    assert _verdict(specs, "10.244.3.7", sip, port=2022) == RESET


def test_each_family_gets_its_own_networks() -> None:
    config = _config(GOLDEN.path / "ipv6.yaml")
    v4 = list(render_ingress_rules(config, "ipv4").chains[INGRESS_CHAIN])
    v6 = list(render_ingress_rules(config, "ipv6").chains[INGRESS_CHAIN])
    assert _verdict(v4, "10.244.0.9", "192.168.122.201", port=2022) == "ACCEPT"
    assert _verdict(v6, "fd00:10:244::9", "2001:db8::200", port=2022) == "ACCEPT"
    assert _verdict(v6, "2001:db8::139", "2001:db8::200", port=2022) == RESET
    assert _verdict(v6, "2001:db8::139", "2001:db8::200", proto="udp", port=9) == (
        "REJECT --reject-with icmp6-port-unreachable")
    assert not any("fd00" in spec for spec in v4)
    assert not any("10.244" in spec for spec in v6)


def test_chain_set_shape() -> None:
    chain_set = render_ingress_rules(_config(GOLDEN.path / "seed.yaml"))
    assert chain_set.table == "filter"
    assert list(chain_set.chains) == [INGRESS_CHAIN]
    assert chain_set.owned_prefix == OWNED_PREFIX
    (jump,) = chain_set.jumps
    assert jump.chain == "INPUT"
    assert "-m comment --comment" in jump.spec
    assert jump.spec.endswith(f"-j {INGRESS_CHAIN}")
    assert all("-m comment --comment" in spec for spec in chain_set.chains[INGRESS_CHAIN])


def test_the_other_family_renders_an_empty_chain() -> None:
    config = _config(GOLDEN.path / "seed.yaml")
    assert render_ingress_rules(config, "ipv6").chains == {INGRESS_CHAIN: ()}


def test_leftover_rules_of_an_earlier_config_are_replaced() -> None:
    fake = FakeIptables()
    fake.restore(_sections(GOLDEN.path / "several-peers-and-ports.yaml")["ipv4"])
    fake.add("filter", "EXTCONN-INGRESS-OLD", "-j RETURN")
    fake.add("filter", "INPUT", "-j EXTCONN-INGRESS-OLD")
    seed = render_ingress_rules(_config(GOLDEN.path / "seed.yaml"))
    assert apply(fake, seed) is True
    assert fake.tables["filter"][INGRESS_CHAIN] == list(seed.chains[INGRESS_CHAIN])
    assert "EXTCONN-INGRESS-OLD" not in fake.tables["filter"]
    assert fake.tables["filter"]["INPUT"] == [seed.jumps[0].spec]
