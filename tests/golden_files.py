"""Golden-file cases shared by every golden test: discovery, comparison, regeneration.

A case is ``<name><input suffix>`` with its expected output ``<name><output suffix>`` in
one directory. ``REGEN_GOLDEN=1`` rewrites outputs from the current code (and removes
orphans); without it a missing, orphaned or outdated output fails. Review the diff of a
regeneration before committing it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REGEN = os.environ.get("REGEN_GOLDEN") == "1"


@dataclass(frozen=True)
class GoldenDir:
    path: Path
    input_suffix: str
    output_suffix: str
    minimum_cases: int = 1

    def cases(self) -> list[Path]:
        return sorted(p for p in self.path.glob(f"*{self.input_suffix}")
                      if not p.name.endswith(self.output_suffix))

    def stem(self, case: Path) -> str:
        return case.name[: -len(self.input_suffix)]

    def output(self, case: Path) -> Path:
        return self.path / f"{self.stem(case)}{self.output_suffix}"

    def check(self, case: Path, rendered: str) -> None:
        golden = self.output(case)
        if REGEN:
            golden.write_text(rendered)
        assert golden.exists(), f"{golden.name} is missing: run with REGEN_GOLDEN=1 to create it"
        assert rendered == golden.read_text(), (
            f"{golden.name} is outdated: run with REGEN_GOLDEN=1 and review the diff")

    def check_no_stale(self) -> None:
        cases = self.cases()
        assert len(cases) >= self.minimum_cases, f"golden cases went missing from {self.path}"
        inputs = {self.stem(p) for p in cases}
        outputs = {p.name[: -len(self.output_suffix)]
                   for p in self.path.glob(f"*{self.output_suffix}")}
        if REGEN:
            for stem in outputs - inputs:
                (self.path / f"{stem}{self.output_suffix}").unlink()
            outputs &= inputs
        assert not outputs - inputs, f"outputs without an input: {sorted(outputs - inputs)}"
        if not REGEN:
            assert not inputs - outputs, f"inputs without an output: {sorted(inputs - outputs)}"
        expected = {f"{s}{self.input_suffix}" for s in inputs} | {
            f"{s}{self.output_suffix}" for s in outputs}
        others = {p.name for p in self.path.iterdir()} - expected
        assert not others, f"unexpected files in {self.path}: {sorted(others)}"
