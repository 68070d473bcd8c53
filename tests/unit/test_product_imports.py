"""The shipped package does not depend on test tooling (issue 11: "no product code imports
the emulator"). The lab still lives in the product package and drives the testbed's
control plane; moving it out is issue 12's."""

from __future__ import annotations

import ast
from pathlib import Path

PRODUCT = Path(__file__).resolve().parents[2] / "src" / "k8s_ext_connector"


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_no_product_module_imports_the_emulator() -> None:
    offenders = {
        str(path.relative_to(PRODUCT)): sorted(m for m in _imports(path) if "emulator" in m)
        for path in PRODUCT.rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_only_the_lab_imports_the_testbed() -> None:
    importers = {
        str(path.relative_to(PRODUCT))
        for path in PRODUCT.rglob("*.py")
        if any(m.startswith("k8s_ext_connector_testbed") for m in _imports(path))
    }
    assert all(name.startswith("lab/") for name in importers), importers
