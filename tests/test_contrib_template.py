"""The plugin template, copied and renamed as its README says, installs and runs as a new method.

Copies ``plugins_contrib/_template`` to a temporary folder, replaces ``plugin-template`` /
``plugin_template`` / ``PluginTemplate`` (file names and contents) with a fresh name, ``pip
install``\\ s it into the running venv (``--no-deps --no-build-isolation --no-index``: no network),
checks ``onnxq methods`` and ``onnxq optimize`` in subprocesses, and uninstalls it again, also when
the test fails. A file lock serialises this across concurrent pytest runs sharing the venv.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "plugins_contrib" / "_template"
DIST_PREFIX = "onnxq-tplcopy-"


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check"], capture_output=True, text=True, timeout=300)


def _installed_copies() -> list[str]:
    from importlib import metadata

    return sorted({(d.metadata["Name"] or "").lower() for d in metadata.distributions() if (d.metadata["Name"] or "").lower().startswith(DIST_PREFIX)})


def copy_and_rename(dest: Path, dashed: str) -> Path:
    """What the template's README tells a plugin author to do, in Python."""
    underscored = dashed.replace("-", "_")
    camel = "".join(p.capitalize() for p in dashed.split("-"))
    folder = dest / f"onnxq-{dashed}"
    shutil.copytree(TEMPLATE, folder, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", "build", "*.pyc"))
    for path in sorted(folder.rglob("*"), key=lambda p: -len(p.parts)):  # deepest first, so renames do not move parents early
        if path.is_file():
            text = path.read_text()
            new = text.replace("plugin-template", dashed).replace("plugin_template", underscored).replace("PluginTemplate", camel)
            if new != text:
                path.write_text(new)
        if "plugin_template" in path.name:
            path.rename(path.with_name(path.name.replace("plugin_template", underscored)))
    return folder


@pytest.fixture
def install_lock():
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed (needed to build the copied package)")
    import fcntl

    lock_path = Path(tempfile.gettempdir()) / f"onnxq-test-template-{Path(sys.prefix).resolve().as_posix().replace('/', '_')}.lock"
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            for stale in _installed_copies():  # left by a killed run
                _pip("uninstall", "-y", "-q", stale)
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def test_copied_template_installs_and_runs_as_a_new_method(install_lock, tmp_path, request, run_proc, onnxq_exe):
    name = "tplcopy-" + uuid.uuid4().hex[:8]
    folder = copy_and_rename(tmp_path, name)
    assert not list(folder.rglob("*plugin_template*"))
    leftovers = [p for p in folder.rglob("*") if p.is_file() and ("plugin-template" in p.read_text() or "plugin_template" in p.read_text())]
    assert not leftovers, leftovers

    dist = f"onnxq-{name}"
    installed = {"done": False}

    def uninstall() -> None:
        if installed["done"]:
            proc = _pip("uninstall", "-y", "-q", dist)
            assert proc.returncode == 0, proc.stdout + proc.stderr

    request.addfinalizer(uninstall)
    proc = _pip("install", "-q", "--no-deps", "--no-build-isolation", "--no-index", str(folder))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    installed["done"] = True

    listed = run_proc([onnxq_exe, "methods"])
    assert listed.returncode == 0, listed.stderr
    assert name in listed.stdout.split(), listed.stdout

    out = tmp_path / "out" / "out.onnx"
    out.parent.mkdir()
    run = run_proc([onnxq_exe, "optimize", REPO / "examples/digits/model.onnx", "-p", name, "-o", "fraction", "0.8",
                    "--data", REPO / "examples/digits/calib", "--output", out])
    assert run.returncode == 0, run.stdout + run.stderr
    assert out.is_file()
    import onnx

    model = onnx.load(str(out))
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    assert dict((p.key, p.value) for p in model.metadata_props).get("onnxq.method") == name


# ---------------------------------------------------------------------------------------------
# the contributed packages as plugins: listed when installed, never needed by onnxq itself
# ---------------------------------------------------------------------------------------------

CONTRIB = {"lapq": ("onnxq_lapq", "onnxq-lapq"), "brecq": ("onnxq_brecq", "onnxq-brecq"), "plugin-template": ("onnxq_plugin_template", "onnxq-plugin-template")}


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.mark.parametrize("method", sorted(CONTRIB))
def test_installed_contrib_package_is_listed_by_onnxq_plugins(method, run_cli):
    module, dist = CONTRIB[method]
    if not _installed(module):
        pytest.skip(f"{dist} is not installed (pip install -e plugins_contrib/...)")
    import json

    code, out, _ = run_cli(["plugins", "--json"])
    assert code == 0
    rec = next(p for p in json.loads(out) if p["module"] == module)
    assert rec["ok"] and rec["distribution"] == dist and f"method:{method}" in rec["provides"]


def _entry_points_without(monkeypatch, drop: set[str], extra=()):
    """Make the host see the installed entry points minus the modules in ``drop``, plus ``extra``."""
    from importlib import metadata

    real = metadata.entry_points(group="onnxq")
    kept = [ep for ep in real if ep.value.split(":")[0] not in drop] + list(extra)
    monkeypatch.setattr("onnxq.host.metadata.entry_points", lambda group=None: kept if group == "onnxq" else metadata.entry_points(group=group))


@pytest.mark.parametrize("gone", ["onnxq_lapq", "onnxq_brecq"])
def test_onnxq_works_without_a_contrib_package(monkeypatch, gone, tiny_model, tiny_feeds):
    """As after ``pip uninstall onnxq-lapq`` (or -brecq): the host loads the rest and quantizes."""
    import onnxq
    from onnxq.errors import UnknownNameError
    from onnxq.host import Host

    _entry_points_without(monkeypatch, {gone})
    host = Host()
    assert not host.broken() or all(p.module != gone for p in host.broken())
    name = {"onnxq_lapq": "lapq", "onnxq_brecq": "brecq"}[gone]
    assert name not in host.methods and "minmax" in host.methods
    with pytest.raises(UnknownNameError, match=f"unknown method '{name}'"):
        host.method(name)
    res = onnxq.optimize(tiny_model, method="minmax", data=tiny_feeds, host=host, show_progress=False, cache_dir=None)
    assert res.report.method == ["minmax"]


def test_a_stale_entry_point_of_an_uninstalled_package_is_contained(monkeypatch, tiny_model, tiny_feeds):
    """Metadata left behind by a half-removed package: listed as broken, everything else loads."""
    from importlib import metadata

    import onnxq
    from onnxq.host import Host

    stale = metadata.EntryPoint(name="brecq", value="onnxq_brecq_removed_" + uuid.uuid4().hex[:6], group="onnxq")
    _entry_points_without(monkeypatch, {"onnxq_brecq"}, [stale])
    host = Host()
    broken = [p for p in host.broken() if p.module == stale.value]
    assert len(broken) == 1 and "ModuleNotFoundError" in broken[0].error
    assert "brecq" not in host.methods
    for method, (module, _) in CONTRIB.items():
        if method != "brecq" and _installed(module):
            assert method in host.methods
    res = onnxq.optimize(tiny_model, method="minmax", data=tiny_feeds, host=host, show_progress=False, cache_dir=None)
    assert res.model is not None
