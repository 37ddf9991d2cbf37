"""The layering of onnxq, checked by walking every import (docs/architecture.md, "Layers").

Two rules:

* a module imports only from its own layer or lower ones (imports inside functions count: a
  lazy import is still a dependency; ``if TYPE_CHECKING:`` imports are exempt because they never
  run);
* no module reads another module's private names (``from onnxq.x import _y``, or ``x._y`` on an
  imported onnxq module), in onnxq and in the contributed plugin packages alike.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "onnxq"

#: bottom to top; a prefix names a module or a whole package
LAYERS: list[tuple[str, ...]] = [
    ("onnxq.errors", "onnxq.qparams", "onnxq.options"),
    ("onnxq.runtime",),
    ("onnxq.graph",),
    ("onnxq.calib",),
    ("onnxq.search",),
    ("onnxq.method", "onnxq.hookspecs", "onnxq.host", "onnxq.tasks"),
    ("onnxq.plugins",),
    ("onnxq.backends",),
    ("onnxq.evaluate",),
    ("onnxq.pipeline",),
    ("onnxq.report", "onnxq.cli", "onnxq.compat", "onnxq.testing", "onnxq.__main__", "onnxq"),
]


def layer_of(module: str) -> int:
    """The layer index of ``module`` (longest matching prefix wins; ``onnxq`` itself is the top)."""
    best, best_len = None, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    assert best is not None, f"{module} is in no layer: add it to LAYERS and docs/architecture.md"
    return best


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_lines(tree: ast.Module) -> set[int]:
    """Line numbers inside ``if TYPE_CHECKING:`` blocks."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
            if name == "TYPE_CHECKING":
                for child in node.body:
                    lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute module of a (possibly relative) ``from ... import``."""
    if level == 0:
        return target or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports(path: Path, root: Path):
    """Yield ``(lineno, imported module, imported names, local aliases of onnxq modules)`` of one file."""
    module = module_name(path, root)
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    skip = _type_checking_lines(tree)
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, [], {(a.asname or a.name): a.name}
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path.name == "__init__.py", node.level, node.module)
            aliases = {(a.asname or a.name): f"{target}.{a.name}" for a in node.names}
            yield node.lineno, target, [a.name for a in node.names], aliases


def _private_attribute_reads(path: Path, onnxq_aliases: dict[str, str]):
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in onnxq_aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            yield node.lineno, f"{onnxq_aliases[node.value.id]}.{node.attr}"


def _is_onnxq_module(name: str) -> bool:
    return name == "onnxq" or name.startswith("onnxq.")


def _is_module(dotted: str) -> bool:
    rel = Path(*dotted.split("."))
    return (ROOT / rel).with_suffix(".py").exists() or (ROOT / rel / "__init__.py").exists()


def _violations_in(path: Path, root: Path, check_layers: bool) -> list[str]:
    module = module_name(path, root)
    own = layer_of(module) if check_layers else None
    rel = path.relative_to(root)
    found: list[str] = []
    onnxq_aliases: dict[str, str] = {}
    for lineno, target, names, aliases in imports(path, root):
        if not _is_onnxq_module(target):
            continue
        for local, full in aliases.items():
            if _is_onnxq_module(full) and _is_module(full):
                onnxq_aliases[local] = full
        if check_layers:
            candidates = [f"{target}.{n}" for n in names if _is_module(f"{target}.{n}")] or [target]
            for dep in candidates:
                if layer_of(dep) > own:  # type: ignore[operator]
                    found.append(f"{rel}:{lineno}: {module} (layer {own}) imports {dep} (layer {layer_of(dep)})")
        for n in names:
            if n.startswith("_") and not n.startswith("__") and target != module:
                found.append(f"{rel}:{lineno}: {module} imports the private name {target}.{n}")
    for lineno, name in _private_attribute_reads(path, onnxq_aliases):
        owner = name.rsplit(".", 1)[0]
        if owner != module:
            found.append(f"{rel}:{lineno}: {module} reads the private name {name}")
    return found


def test_every_module_is_in_a_layer() -> None:
    for path in PACKAGE.rglob("*.py"):
        layer_of(module_name(path, ROOT))


def test_no_module_imports_a_higher_layer_or_a_private_name() -> None:
    found = [v for path in sorted(PACKAGE.rglob("*.py")) for v in _violations_in(path, ROOT, check_layers=True)]
    assert not found, "layering violations:\n" + "\n".join(found)


def test_contrib_packages_use_only_public_names() -> None:
    found: list[str] = []
    for package in sorted((ROOT / "plugins_contrib").glob("*/*/__init__.py")):
        src_root = package.parent.parent
        for path in sorted(package.parent.rglob("*.py")):
            found += _violations_in(path, src_root, check_layers=False)
    assert not found, "private onnxq names used by contributed packages:\n" + "\n".join(found)


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The walk itself works: a lazy upward import and a private-name import are both caught."""
    pkg = tmp_path / "onnxq" / "graph"
    pkg.mkdir(parents=True)
    (tmp_path / "onnxq" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    bad = pkg / "bad.py"
    bad.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from onnxq.pipeline import optimize\n"
        "def f():\n    from onnxq.pipeline import optimize\n    from onnxq.calib.statistics import _split\n"
    )
    found = _violations_in(bad, tmp_path, check_layers=True)
    assert any("imports onnxq.pipeline" in v and ":5:" in v for v in found), found
    assert any("private name onnxq.calib.statistics._split" in v for v in found), found
    assert not any(":3:" in v for v in found), found
