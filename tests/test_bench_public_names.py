"""The benchmarks use onnxq through public names that exist: every ``from onnxq... import name`` in
benchmarks/ (lazy imports too) names a public attribute or submodule of an onnxq module.

The suite itself takes minutes; this catches a renamed or removed onnxq name in a second.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def onnxq_imports(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, module, name) of every onnxq import in ``path``; name None for ``import onnxq.x``."""
    out: list[tuple[int, str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "onnxq":
            out += [(node.lineno, node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] == "onnxq"]
    return out


def test_benchmarks_import_only_public_onnxq_names_that_exist() -> None:
    problems: list[str] = []
    files = sorted(BENCH.rglob("*.py"))
    assert any(f.name == "bench.py" for f in files)
    for path in files:
        rel = path.relative_to(ROOT)
        for line, module, name in onnxq_imports(path):
            if name is not None and name.startswith("_"):
                problems.append(f"{rel}:{line}: private name {module}.{name}")
                continue
            try:
                mod = importlib.import_module(module)
            except ImportError as exc:
                problems.append(f"{rel}:{line}: {module} does not import ({exc})")
                continue
            if name is not None and not hasattr(mod, name):
                try:
                    importlib.import_module(f"{module}.{name}")
                except ImportError:
                    problems.append(f"{rel}:{line}: {module} has no {name}")
    assert not problems, "benchmarks import onnxq names that are private or gone:\n" + "\n".join(problems)
