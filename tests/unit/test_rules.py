"""Golden files for the sidecar's nat rules (``sidecar.rules.render_egress_rules``).

Each case is a pair in ``tests/golden/sidecar-rules/``:

- ``<case>.yaml``: a sidecar config document (what the operator writes for one pod);
- ``<case>.rules``: the iptables-restore text that config produces on an empty nat table
  (``render_egress_rules`` + ``core.iptables.restore_text`` against an empty ObservedTable).

Cases are discovered from the ``*.yaml`` files: add a YAML file to add a case.
The hold chain (filter table, no input) has one golden file, ``tests/golden/sidecar-hold/``.

Regenerate after an intended change with the environment variable ``REGEN_GOLDEN=1``::

    REGEN_GOLDEN=1 .venv/bin/pytest tests/unit/test_rules.py

which rewrites every ``.rules`` file from its ``.yaml`` and deletes ``.rules`` files whose
``.yaml`` is gone. Review the diff before committing it. Without the variable, a missing,
orphaned or outdated ``.rules`` file fails the run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from k8s_ext_connector.core.config import SidecarConfig, parse_document
from k8s_ext_connector.core.iptables import ObservedTable, apply, restore_text
from k8s_ext_connector.sidecar.rules import (
    EGRESS_CHAIN,
    HOLD_CHAIN,
    OWNED_PREFIX,
    release_hold,
    render_egress_rules,
    render_hold_rules,
    served,
)
from tests.golden_files import REGEN, GoldenDir
from tests.unit.fake_iptables import FakeIptables

GOLDEN = GoldenDir(Path(__file__).resolve().parents[1] / "golden" / "sidecar-rules",
                   ".yaml", ".rules", minimum_cases=5)
HOLD_GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "sidecar-hold" / "hold.rules"
CASES = GOLDEN.cases()


def _config(case: Path) -> SidecarConfig:
    return SidecarConfig.from_dict(parse_document(case.read_text(), str(case)))


def _render(config: SidecarConfig) -> str:
    text = restore_text(render_egress_rules(config), ObservedTable())
    assert text is not None  # an empty table always needs the chain and its jump
    return text


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_golden(case: Path) -> None:
    GOLDEN.check(case, _render(_config(case)))


def test_no_stale_goldens() -> None:
    GOLDEN.check_no_stale()


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_golden_applies_and_reruns_as_a_no_op(case: Path) -> None:
    config = _config(case)
    fake = FakeIptables()
    fake.add("nat", "OUTPUT", "-j KUBE-SERVICES").add("nat", "KUBE-SERVICES", "-j RETURN")
    fake.restore(case.with_suffix(".rules").read_text())
    desired = render_egress_rules(config)
    assert apply(fake, desired) is False
    nat = fake.tables["nat"]
    served_rules = served(config).config.rules
    assert len(nat[EGRESS_CHAIN]) == sum(len(rule.intercept) for rule in served_rules)
    assert nat["OUTPUT"][0] == desired.jumps[0].spec
    assert nat["KUBE-SERVICES"] == ["-j RETURN"]


def test_rendered_chain_set_shape() -> None:
    config = _config(GOLDEN.path / "seed.yaml")
    chain_set = render_egress_rules(config)
    assert chain_set.table == "nat"
    assert list(chain_set.chains) == [EGRESS_CHAIN]
    assert chain_set.owned_prefix == OWNED_PREFIX
    (jump,) = chain_set.jumps
    assert jump.chain == "OUTPUT"
    assert jump.spec.endswith(f"-j {EGRESS_CHAIN}")
    assert "-m comment --comment" in jump.spec
    for spec in chain_set.chains[EGRESS_CHAIN]:
        assert "-m comment --comment" in spec
        assert spec.endswith(f"-j REDIRECT --to-ports {config.listen_port}")


def test_gateway_ssh_endpoints_are_never_redirected() -> None:
    for case in CASES:
        config = _config(case)
        specs = " ".join(render_egress_rules(config).chains[EGRESS_CHAIN])
        for gateway in config.gateways():
            assert f"-d {gateway.address}/32 -p tcp -m tcp --dport {gateway.port} " not in specs


def test_hold_golden() -> None:
    rendered = restore_text(render_hold_rules(), ObservedTable())
    assert rendered is not None
    if REGEN:
        HOLD_GOLDEN.write_text(rendered)
    assert rendered == HOLD_GOLDEN.read_text(), "hold.rules outdated: REGEN_GOLDEN=1, review"


def test_hold_leads_output_and_release_removes_only_it() -> None:
    fake = FakeIptables().add("filter", "OUTPUT", "-j KUBE-FIREWALL")
    fake.restore(HOLD_GOLDEN.read_text())
    assert apply(fake, render_hold_rules()) is False  # rerun: no-op
    assert fake.tables["filter"]["OUTPUT"][0] == render_hold_rules().jumps[0].spec
    assert fake.tables["filter"][HOLD_CHAIN][-1].endswith("-j REJECT --reject-with tcp-reset")
    assert apply(fake, release_hold()) is True
    assert fake.tables["filter"]["OUTPUT"] == ["-j KUBE-FIREWALL"]
    assert HOLD_CHAIN not in fake.tables["filter"]
    assert apply(fake, release_hold()) is False


def test_ipv6_destinations_are_left_out_and_the_rest_rendered() -> None:
    config = _config(GOLDEN.path / "ipv6-left-out.yaml")
    specs = render_egress_rules(config).chains[EGRESS_CHAIN]
    assert [spec.split()[1] for spec in specs] == [
        "10.96.0.14/32", "10.96.0.10/32", "192.168.122.139/32"]
