"""The test suite's own rules: test modules stand alone (shared helpers live in tests/support,
fixtures in conftest.py), so one test file can be read, moved or deleted without breaking another."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).parent


def test_test_modules_import_no_other_test_module_nor_conftest() -> None:
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module:
                module = node.module
            elif isinstance(node, ast.Import):
                module = node.names[0].name
            else:
                continue
            last = module.rsplit(".", 1)[-1]
            if module.startswith("tests.") and (last.startswith("test_") or last == "conftest"):
                offenders.append(f"{path.relative_to(TESTS)}:{node.lineno} imports {module}")
    assert not offenders, "move what is shared into tests/support (fixtures into conftest.py):\n" + "\n".join(offenders)
