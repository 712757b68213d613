"""Dependencies point one way: face -> passes / backends -> core. Checked on the source, so a
violation fails here with the file and line, not later as an import cycle."""

import ast
from pathlib import Path

import pytest

import sparsecomp

CORE = Path(sparsecomp.__file__).parent
ROOT = CORE.parent
# The face: may import everything (function-level imports of passes and backends live here).
FACE = {"__init__.py", "api.py", "cli.py", "loader.py", "dynamo.py"}


def _imports(path: Path, module_level_only: bool):
    """(line, absolute module name) of every import in `path`; relative imports resolved against
    the installed package name of the file's folder."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                yield node.lineno, node.module or ""
            # relative imports stay inside the file's own package: never a layering violation


def _violations(paths, forbidden: tuple[str, ...], module_level_only: bool) -> list[str]:
    found = []
    for path in paths:
        for line, mod in _imports(path, module_level_only):
            if any(mod == f or mod.startswith(f + ".") for f in forbidden):
                found.append(f"{path.relative_to(ROOT)}:{line} imports {mod}")
    return found


def _py(folder: Path):
    return sorted(folder.rglob("*.py"))


@pytest.mark.parametrize("folder, forbidden", [
    ("passes", ("sparsecomp.backends", "backends")),
    ("backends", ("sparsecomp.passes", "passes")),
])
def test_passes_and_backends_never_import_each_other(folder, forbidden):
    assert _violations(_py(ROOT / folder), forbidden, module_level_only=False) == []


def test_core_imports_nothing_above_it_at_module_level():
    core = [p for p in _py(CORE) if p.name not in FACE]
    above = ("sparsecomp.passes", "sparsecomp.backends", "sparsecomp.models", "passes", "backends", "models")
    assert _violations(core, above, module_level_only=True) == []


def test_the_check_sees_a_violation(tmp_path):
    """The scan itself works: a pass importing a backend is caught, with its line."""
    bad = tmp_path / "bad_pass.py"
    bad.write_text("import torch\n\ndef f():\n    from sparsecomp.backends.torch import lowering\n")
    real_root = globals()["ROOT"]
    try:
        globals()["ROOT"] = tmp_path
        assert _violations([bad], ("sparsecomp.backends",), module_level_only=False) == ["bad_pass.py:4 imports sparsecomp.backends.torch"]
        assert _violations([bad], ("sparsecomp.backends",), module_level_only=True) == []
    finally:
        globals()["ROOT"] = real_root


def test_the_report_and_errors_load_without_torch():
    """`report` and `errors` depend on nothing above them: importing them (what a tool reading a
    report's JSON needs) loads no torch."""
    import subprocess
    import sys

    code = "import sys, sparsecomp.report, sparsecomp.errors; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
