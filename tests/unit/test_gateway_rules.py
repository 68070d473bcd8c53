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

from pathlib import Path

import pytest

from k8s_ext_connector.core.config import GatewayConfig, parse_document
from k8s_ext_connector.core.iptables import Family, ObservedTable, apply, restore_text
from k8s_ext_connector.gateway.ingress import ingress_listeners
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


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_every_listener_accepts_its_peers_then_resets_new_connections(case: Path) -> None:
    config = _config(case)
    families = _families(config)
    listeners = sorted(ingress_listeners(config).items(),
                       key=lambda item: families.index(family_of(item[0].address)))
    specs = [spec for family in families
             for spec in render_ingress_rules(config, family).chains[INGRESS_CHAIN]]
    assert len(specs) == sum(len(listener.peers) + 1 for _, listener in listeners)
    position = 0
    for listen, listener in listeners:
        host = "/128" if ":" in listen.address else "/32"
        target = f"-d {listen.address}{host} -p tcp -m tcp --dport {listen.port} "
        for peer in specs[position:position + len(listener.peers)]:
            assert target in peer
            assert peer.endswith("-j ACCEPT")
            assert peer.split()[1].removesuffix(host) in listener.peers
        reject = specs[position + len(listener.peers)]
        assert reject.startswith(target + "-m conntrack --ctstate NEW ")
        assert reject.endswith("-j REJECT --reject-with tcp-reset")
        assert "-s " not in reject
        position += len(listener.peers) + 1


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
