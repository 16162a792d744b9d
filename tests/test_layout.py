"""The shape of the code, checked: layers point down (the import contracts in .importlinter),
no import cycles, no private name used outside its module, no module that grew into two."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports")
needs_linter = pytest.mark.skipif(LINT is None, reason="import-linter is in the dev extra")


def _lint(tree: Path):
    env = {**os.environ, "PYTHONPATH": str(tree)}  # the copy under test, not the installed package
    return subprocess.run([LINT, "--config", str(ROOT / ".importlinter"), "--no-cache"], cwd=tree,
                          env=env, capture_output=True, text=True, timeout=120)


@needs_linter
def test_the_layer_contracts_hold():
    run = _lint(ROOT)
    assert run.returncode == 0, run.stdout[-3000:]
    assert "0 broken" in run.stdout


@needs_linter
@pytest.mark.parametrize("module, line, contract", [
    ("index/bits.py", "import hashret.engine", "layers point down"),         # an upward import
    ("engine/core.py", "import hashret.training", "layers point down"),      # siblings
    ("index/hash_index.py", "import hashret.index.sharded", "no import cycles"),
])
def test_a_broken_contract_fails(tmp_path, module, line, contract):
    shutil.copytree(ROOT / "hashret", tmp_path / "hashret",
                    ignore=shutil.ignore_patterns("__pycache__", "packaged"))
    with open(tmp_path / "hashret" / module, "a") as fh:
        fh.write(f"\n{line}  # noqa\n")
    run = _lint(tmp_path)
    assert run.returncode != 0
    broken = [ln for ln in run.stdout.splitlines() if ln.endswith("BROKEN")]
    assert any(contract in ln for ln in broken), run.stdout[-3000:]


def _private_uses(root: Path):
    """``from hashret.x import _name`` and ``x._name`` (x a hashret module) outside module x."""
    out = []
    for f in sorted(root.rglob("*.py")):
        tree = ast.parse(f.read_text(encoding="utf-8"))
        here = ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        modules = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hashret"):
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__") and node.module != here:
                        out.append(f"{f.relative_to(ROOT)}:{node.lineno}: {node.module}.{a.name}")
                    modules[a.asname or a.name] = node.module
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("hashret"):
                        modules[a.asname or a.name.split(".")[0]] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in modules):
                out.append(f"{f.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}")
    return out


def test_no_private_name_is_used_outside_its_module():
    assert _private_uses(ROOT / "hashret") + _private_uses(ROOT / "benchmarks") == []


def test_the_private_name_check_can_fail(tmp_path, monkeypatch):
    pkg = tmp_path / "hashret"
    pkg.mkdir()
    (pkg / "a.py").write_text("from hashret.engine.inputs import _hidden\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert _private_uses(pkg) == ["hashret/a.py:1: hashret.engine.inputs._hidden"]


def test_no_module_grew_past_about_700_lines():
    # scans.py (the jitted scans, one trade with a long design note) is the longest, ~740
    long = {str(f.relative_to(ROOT)): n for f in ROOT.joinpath("hashret").rglob("*.py")
            if (n := len(f.read_text(encoding="utf-8").splitlines())) > 750}
    assert long == {}, "split these by trade: " + ", ".join(f"{f} ({n})" for f, n in long.items())
