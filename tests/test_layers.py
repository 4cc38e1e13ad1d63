"""The package's layout, checked: import-linter's contracts (pyproject.toml), no import cycles (function-level
imports included), no module importing another module's underscore names, and a cheap `import`."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sae_lens_vision_steer"


def test_import_linter_contracts_hold():
    import importlinter  # noqa: F401  (in the [dev] extra: a missing linter must fail, not skip)
    # in a subprocess: import-linter configures logging, which would silence later tests' caplog
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(config_filename='pyproject.toml'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]  # 0: every contract kept
    assert "Contracts: 3 kept, 0 broken." in out.stdout


def test_no_import_cycles():
    import grimp  # import-linter's graph builder
    graph = grimp.build_graph("sae_lens_vision_steer", exclude_type_checking_imports=True)
    # a cycle is a module that reaches itself: find one with a depth-first search over direct imports
    edges = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m: str, path: list[str]) -> bool:
        state[m] = 1
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                cycle.extend(path[path.index(n):] + [m, n] if n in path else [m, n])
                return True
            if n in edges and state.get(n) is None and visit(n, path + [m]):
                return True
        state[m] = 2
        return False

    for m in sorted(edges):
        if state.get(m) is None and visit(m, []):
            break
    assert not cycle, f"import cycle: {' -> '.join(cycle)}"


def test_no_module_imports_another_modules_underscore_names():
    found = []
    for path in sorted([*PACKAGE.rglob("*.py"), *(ROOT / "tests").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {alias.name}")
    assert not found, found


def test_importing_the_package_is_cheap():
    code = ("import sys, sae_lens_vision_steer as s; heavy = [m for m in ('torch', 'transformer_lens', 'sae_lens', "
            "'open_clip', 'transformers', 'timm') if m in sys.modules]; print(heavy, s.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.startswith("[] "), out.stdout


def test_the_public_names_resolve_lazily():
    import sae_lens_vision_steer as s

    for name in s.__all__:
        assert getattr(s, name) is not None, name
    with pytest.raises(AttributeError):
        s.no_such_name  # noqa: B018
    with pytest.warns(DeprecationWarning, match="ActivationStore"):
        assert s.ActivationCache is s.ActivationStore


def test_importing_installs_no_warnings_filter_of_ours():
    code = ("import warnings, sae_lens_vision_steer.sae.metadata, sae_lens_vision_steer.training.trainer, "
            "sae_lens_vision_steer.evaluation; print([f for f in warnings.filters if f[1] is not None and "
            "'model_from_pretrained_kwargs' in f[1].pattern])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout


def test_vision_steer_help_imports_no_model_library():
    code = ("import sys, contextlib, io\nfrom sae_lens_vision_steer.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
            "assert 'reproduce' in out.getvalue()\n"
            "print([m for m in ('torch', 'transformer_lens', 'sae_lens', 'open_clip') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
