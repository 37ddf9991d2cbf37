"""Documentation examples run, and the hook names the docs mention exist."""

from __future__ import annotations

import importlib.util
import inspect
import re
import types
from pathlib import Path

import numpy as np
import pytest

from onnxq import hookspecs
from onnxq.host import Host
from onnxq.testing.models import conv_relu_model

ROOT = Path(__file__).resolve().parents[1]
#: methods of the plugins_contrib/ packages the docs may name, and their modules
CONTRIB_METHODS = {"lapq": "onnxq_lapq", "brecq": "onnxq_brecq", "plugin-template": "onnxq_plugin_template", "sparq": "onnxq_sparq",
                   "multipoint": "onnxq_multipoint", "pdquant": "onnxq_pdquant", "asvd": "onnxq_asvd", "pbllm": "onnxq_pbllm"}


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_plugin_example_in_docs_runs(monkeypatch):
    import sys

    from onnxq.pipeline import optimize

    code = python_blocks(ROOT / "docs" / "plugins.md")[0]
    module = types.ModuleType("docs_plugin_example")
    monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclasses resolve the module
    exec(compile(code, "docs/plugins.md", "exec"), module.__dict__)
    host = Host(load_entry_points=True)
    record = host.register_module("docs-example", module)
    assert record.ok, record.error
    rng = np.random.default_rng(0)
    data = [{"x": rng.standard_normal((4, 2, 6, 6)).astype(np.float32)}]
    result = optimize(conv_relu_model(), method="half", options={"fraction": 0.8}, data=data, host=host, show_progress=False)
    assert result.report.method == ["half"]


def _hookspecs() -> dict[str, object]:
    """Every function of onnxq/hookspecs.py marked ``@hookspec``."""
    marker = f"{hookspecs.PROJECT}_spec"
    return {name: fn for name, fn in vars(hookspecs).items() if callable(fn) and hasattr(fn, marker)}


def _signature(fn) -> str:
    """``name(arg: Ann, ...) -> Ret`` as written in hookspecs.py (annotations are strings there)."""
    sig = inspect.signature(fn)
    params = ", ".join(f"{p.name}: {p.annotation}" for p in sig.parameters.values())
    return f"{fn.__name__}({params}) -> {sig.return_annotation}"


def _documented_hooks() -> dict[str, tuple[list[str], str]]:
    """Each ``### `name(args)``` section of docs/plugins.md's "Hooks": (argument names, signature in its code block)."""
    text = (ROOT / "docs" / "plugins.md").read_text()
    hooks_part = text.split("\n## Hooks\n", 1)[1].split("\n## ", 1)[0]
    out = {}
    for m in re.finditer(r"^### `(\w+)\(([^)]*)\)`\n\n```python\ndef (.+?)\n```", hooks_part, flags=re.M | re.S):
        name, args, code = m.groups()
        out[name] = ([a.strip() for a in args.split(",") if a.strip()], code.strip())
    return out


def test_every_hookspec_is_documented_with_its_signature():
    """Each hookspec has a section whose heading names its arguments and whose code block is its exact signature."""
    documented = _documented_hooks()
    specs = _hookspecs()
    assert len(specs) >= 7
    for name, fn in specs.items():
        assert name in documented, f"hook '{name}' has no '### `{name}(...)`' section in docs/plugins.md"
        args, code = documented[name]
        assert args == list(inspect.signature(fn).parameters), f"docs heading of '{name}' lists {args}"
        assert code == _signature(fn), f"docs signature of '{name}' is\n  {code}\nbut hookspecs.py has\n  {_signature(fn)}"


def test_every_documented_hook_exists():
    documented = _documented_hooks()
    assert documented, "docs/plugins.md documents no hooks"
    specs = _hookspecs()
    for name in documented:
        assert name in specs, f"docs/plugins.md documents hook '{name}' that hookspecs.py does not define"


def test_backend_example_in_docs_registers_and_runs(tiny_model, tiny_feeds):
    """The "Backends and targets" example: its backend runs a model, its target quantizes one."""
    import sys

    from onnxq.pipeline import optimize

    code = next(b for b in python_blocks(ROOT / "docs" / "plugins.md") if "register_backends" in b and "class " in b)
    module = types.ModuleType("docs_backend_example")
    sys.modules[module.__name__] = module
    try:
        exec(compile(code, "docs/plugins.md", "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    host = Host(load_entry_points=False)
    record = host.register_module("docs-backend-example", module)
    assert record.ok, record.error
    assert record.provides == ["backend:ort-copy", "target:ort-per-tensor"]
    runner = host.backend("ort-copy")().runner(tiny_model, "fp32", reference=True)
    with runner:
        out = runner.infer(tiny_feeds[0])
    assert list(out) == runner.output_names and np.all(np.isfinite(next(iter(out.values()))))
    from onnxq.plugins import minmax

    host.register_module("minmax", minmax)
    result = optimize(tiny_model, method="minmax", target="ort-per-tensor", data=tiny_feeds, host=host, show_progress=False, cache_dir=None)
    assert result.report.target == "ort-per-tensor"
    scales = [i for i in result.model.graph.initializer if i.name.endswith("scale")]
    assert scales and all(len(i.dims) == 0 for i in scales), "per-tensor weights have scalar scales"


def test_hooks_named_in_docs_exist():
    text = (ROOT / "docs" / "plugins.md").read_text() + (ROOT / "README.md").read_text()
    named = set(re.findall(r"\b(register_\w+|report_sections)\b", text))
    assert named, "docs name no hooks"
    for name in named:
        assert hasattr(hookspecs, name), f"docs mention hook '{name}' that hookspecs.py does not define"


@pytest.mark.parametrize("doc", ["README.md", "docs/plugins.md", "docs/architecture.md", "docs/methods.md"])
def test_docs_name_only_real_methods_in_commands(doc):
    from onnxq.host import get_host

    methods = set(get_host().methods) | {"auto"}  # -p auto: the search over the methods (onnxq/pipeline/auto.py)
    for m in re.findall(r"-p ([a-z0-9][a-z0-9-]*)", (ROOT / doc).read_text()):
        if m in ("half",):
            continue
        if m in CONTRIB_METHODS and importlib.util.find_spec(CONTRIB_METHODS[m]) is None:
            continue  # a plugins_contrib/ package that is not installed here
        assert m in methods, f"{doc} uses unknown method '{m}'"
