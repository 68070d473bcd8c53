"""Golden files for the sidecar's nat rules (``sidecar.rules.render_egress_rules``).

Each case is a pair in ``tests/golden/sidecar-rules/``:

- ``<case>.yaml``: a sidecar config document (what the operator writes for one pod);
- ``<case>.rules``: the iptables-restore text that config produces on an empty nat table
  (``render_egress_rules`` + ``core.iptables.restore_text`` against an empty ObservedTable).

Cases are discovered from the ``*.yaml`` files: add a YAML file to add a case.

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
from k8s_ext_connector.sidecar.rules import EGRESS_CHAIN, OWNED_PREFIX, render_egress_rules
from tests.golden_files import GoldenDir
from tests.unit.fake_iptables import FakeIptables

GOLDEN = GoldenDir(Path(__file__).resolve().parents[1] / "golden" / "sidecar-rules",
                   ".yaml", ".rules", minimum_cases=4)
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
    assert len(nat[EGRESS_CHAIN]) == sum(len(rule.intercept) for rule in config.rules)
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
