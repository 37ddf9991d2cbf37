"""Documentation examples run, and the hook names the docs mention exist."""

from __future__ import annotations

import importlib.util
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
CONTRIB_METHODS = {"lapq": "onnxq_lapq", "brecq": "onnxq_brecq", "plugin-template": "onnxq_plugin_template"}


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


def test_hooks_named_in_docs_exist():
    text = (ROOT / "docs" / "plugins.md").read_text() + (ROOT / "README.md").read_text()
    named = set(re.findall(r"\b(register_\w+|report_sections)\b", text))
    assert named, "docs name no hooks"
    for name in named:
        assert hasattr(hookspecs, name), f"docs mention hook '{name}' that hookspecs.py does not define"


@pytest.mark.parametrize("doc", ["README.md", "docs/plugins.md", "docs/architecture.md", "docs/methods.md"])
def test_docs_name_only_real_methods_in_commands(doc):
    from onnxq.host import get_host

    methods = set(get_host().methods)
    for m in re.findall(r"-p ([a-z0-9][a-z0-9-]*)", (ROOT / doc).read_text()):
        if m in ("half",):
            continue
        if m in CONTRIB_METHODS and importlib.util.find_spec(CONTRIB_METHODS[m]) is None:
            continue  # a plugins_contrib/ package that is not installed here
        assert m in methods, f"{doc} uses unknown method '{m}'"
