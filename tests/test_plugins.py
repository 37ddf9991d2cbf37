"""Third-party plugins: an in-process host for speed, then real packages pip-installed into the venv.

The install tests build two throw-away packages in a temporary folder, ``pip install`` them (no
network: ``--no-index --no-deps --no-build-isolation``), exercise the ``onnxq`` console script in
subprocesses, and uninstall them again, even when a test fails. Package and module names carry a
random suffix; a file lock serialises these tests across concurrent pytest runs sharing the venv
(they register the same method name, ``halfrange``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import textwrap
import types
import uuid
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxq
from onnxq.errors import OnnxqError, UnknownNameError
from onnxq.hookspecs import hookimpl
from onnxq.host import Host
from onnxq.method import RangeMethod

TEST_DIST_PREFIX = "onnxq-test-plugin-"


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _activation_scales(model: onnx.ModelProto) -> dict[str, float]:
    """Scale of each activation QuantizeLinear, keyed by the tensor it quantizes."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.input[0]: float(inits[n.input[1]]) for n in model.graph.node if n.op_type == "QuantizeLinear"}


def _assert_half_of(half: onnx.ModelProto, full: onnx.ModelProto) -> None:
    """Every activation scale of ``half`` is exactly half the matching scale of ``full`` (symmetric int8)."""
    a, b = _activation_scales(half), _activation_scales(full)
    assert a.keys() == b.keys() and a
    for k in a:
        assert a[k] == pytest.approx(0.5 * b[k], rel=1e-6), k


class HalfRange(RangeMethod):
    """Clip every activation at half its observed max-abs (a deliberately simple calibrator)."""

    name = "halfrange"
    summary = "test plugin: clip activations at 0.5 x max-abs"
    needs_histogram = False

    def threshold(self, stats, ctx) -> float:
        return 0.5 * stats.amax


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    for k, v in attrs.items():
        setattr(mod, k, v)
    return mod


# ---------------------------------------------------------------------------------------------
# in-process host (fast)
# ---------------------------------------------------------------------------------------------

def test_register_module_and_quantize(tiny_model, tiny_feeds):
    @hookimpl
    def register_methods(register):
        register(HalfRange)

    host = Host(load_entry_points=False)
    assert host.methods == {} and host.plugins == []
    rec = host.register_module("myplug", _module("myplug_mod", register_methods=register_methods))
    assert rec.ok and rec.error == "" and rec.provides == ["method:halfrange"]
    assert host.method("halfrange") is HalfRange

    from onnxq.plugins import minmax

    host.register_module("minmax", minmax)
    half = onnxq.optimize(tiny_model, method="halfrange", target="trt", data=tiny_feeds, host=host, show_progress=False, cache_dir=None)
    full = onnxq.optimize(tiny_model, method="minmax", target="trt", data=tiny_feeds, host=host, show_progress=False, cache_dir=None)
    assert half.report.method == ["halfrange"]
    _assert_half_of(half.model, full.model)
    # the plugin's model is a valid, runnable QDQ model
    onnx.checker.check_model(half.model, full_check=True)
    import onnxruntime as ort

    sess = ort.InferenceSession(half.model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, tiny_feeds[0])
    assert y.shape == (8, 4) and np.all(np.isfinite(y))


def test_failing_registration_is_contained_and_rolled_back():
    class Good(HalfRange):
        name = "good-from-broken"

    @hookimpl
    def register_methods(register):
        register(Good)  # registered, then the plugin fails: the registration must be undone
        raise RuntimeError("boom during registration")

    host = Host(load_entry_points=False)
    rec = host.register_module("halfbroken", _module("halfbroken_mod", register_methods=register_methods))
    assert not rec.ok and rec.error == "RuntimeError: boom during registration"
    assert "good-from-broken" not in host.methods
    assert rec.provides == []  # nothing it registered survived, so it lists nothing as provided
    assert host.broken() == [rec]
    with pytest.raises(UnknownNameError) as info:
        host.method("good-from-broken")
    msg = str(info.value)
    assert "unknown method 'good-from-broken'" in msg and "halfbroken (RuntimeError: boom during registration)" in msg
    assert "\n" not in msg


def test_name_of_a_rolled_back_plugin_is_free_again():
    class Good(HalfRange):
        name = "contested"

    @hookimpl
    def broken(register):
        register(Good)
        raise RuntimeError("boom")

    @hookimpl
    def fine(register):
        register(Good)

    host = Host(load_entry_points=False)
    assert not host.register_module("first", _module("a", register_methods=broken)).ok
    rec = host.register_module("second", _module("b", register_methods=fine))
    assert rec.ok, rec.error
    assert host.method("contested") is Good


def test_failing_report_hook_does_not_lose_the_run(tiny_model, tiny_feeds, caplog):
    """A plugin whose report_sections raises is skipped with a warning; other sections still arrive."""

    @hookimpl
    def register_methods(register):
        register(HalfRange)

    @hookimpl
    def good_section(report):
        return {"good": {"bits": report["bits"]}}

    @hookimpl
    def bad_section(report):
        raise KeyError("no such field")

    @hookimpl
    def no_args_section():
        return {"noargs": True}

    host = Host(load_entry_points=False)
    host.register_module("methods", _module("m", register_methods=register_methods))
    host.register_module("good", _module("g", report_sections=good_section))
    host.register_module("bad", _module("b", report_sections=bad_section))
    host.register_module("noargs", _module("n", report_sections=no_args_section))
    with caplog.at_level("WARNING", logger="onnxq"):
        res = onnxq.optimize(tiny_model, method="halfrange", data=tiny_feeds, host=host, show_progress=False, cache_dir=None)
    assert res.report.extra["good"] == {"bits": 8} and res.report.extra["noargs"] is True
    assert "bad" not in res.report.extra
    assert any("bad" in r.getMessage() and "KeyError" in r.getMessage() for r in caplog.records), caplog.text


def test_plugin_validation_errors_are_recorded():
    class NoName(RangeMethod):
        pass

    class NotAMethod:
        name = "not-a-method"

    @hookimpl
    def reg_noname(register):
        register(NoName)

    @hookimpl
    def reg_wrong(register):
        register(NotAMethod)

    @hookimpl
    def reg_half(register):
        register(HalfRange)

    host = Host(load_entry_points=False)
    r1 = host.register_module("noname", _module("a", register_methods=reg_noname))
    r2 = host.register_module("wrong", _module("b", register_methods=reg_wrong))
    r3 = host.register_module("first", _module("c", register_methods=reg_half))
    r4 = host.register_module("second", _module("d", register_methods=reg_half))
    assert not r1.ok and "has no name" in r1.error
    assert not r2.ok and "not a QuantMethod subclass" in r2.error
    assert r3.ok
    assert not r4.ok and "already provided by plugin 'first'" in r4.error
    assert host.method("halfrange") is HalfRange
    assert [p.name for p in host.broken()] == ["noname", "wrong", "second"]


def test_plugin_reader_and_report_section(tiny_model, tiny_feeds):
    """A plugin can add a data reader and a report section."""
    from onnxq.calib.readers import Batch, DataReader

    class ListReader(DataReader):
        name = "mylist"
        summary = "test reader"

        @classmethod
        def accepts(cls, spec: str) -> bool:
            return spec == "mylist"

        def __iter__(self):
            for k, f in enumerate(tiny_feeds):
                yield Batch(dict(f), None, source=f"mylist {k}")

    @hookimpl
    def register_data_readers(register):
        register(ListReader)

    @hookimpl
    def register_methods(register):
        register(HalfRange)

    @hookimpl
    def report_sections(report):
        return {"myplug": {"layers_seen": report["layers"]}}

    host = Host(load_entry_points=False)
    rec = host.register_module("myplug", _module("p", register_data_readers=register_data_readers, register_methods=register_methods,
                                                 report_sections=report_sections))
    assert rec.ok and rec.provides == ["method:halfrange", "reader:mylist"]
    res = onnxq.optimize(tiny_model, method="halfrange", data="mylist", host=host, show_progress=False, cache_dir=None)
    assert res.report.extra["myplug"] == {"layers_seen": 2}
    direct = onnxq.optimize(tiny_model, method="halfrange", data=tiny_feeds, host=host, show_progress=False, cache_dir=None)
    assert _activation_scales(res.model) == _activation_scales(direct.model)


def test_specname_implementations_are_called():
    """The host dispatches through pluggy: a function of another name implements a hook with ``specname``."""

    @hookimpl(specname="register_methods")
    def add_halfrange(register):
        register(HalfRange)

    @hookimpl(specname="report_sections")
    def my_section(report):
        return {"specname_section": report["bits"]}

    host = Host(load_entry_points=False)
    rec = host.register_module("specname", _module("specname_mod", add_halfrange=add_halfrange, my_section=my_section))
    assert rec.ok, rec.error
    assert rec.provides == ["method:halfrange"] and host.method("halfrange") is HalfRange
    assert host.report_sections({"bits": 8}) == {"specname_section": 8}


def test_specname_registration_failure_is_rolled_back():
    class Good(HalfRange):
        name = "good-from-specname"

    @hookimpl(specname="register_methods")
    def methods_then_fail(register):
        register(Good)
        raise RuntimeError("boom in a specname hook")

    host = Host(load_entry_points=False)
    rec = host.register_module("specbroken", _module("specbroken_mod", methods_then_fail=methods_then_fail))
    assert not rec.ok and rec.error == "RuntimeError: boom in a specname hook"
    assert "good-from-specname" not in host.methods and rec.provides == []


def test_failing_command_hook_does_not_cost_other_plugins_their_commands(caplog):
    import click

    @hookimpl
    def bad_commands(cli):
        raise RuntimeError("no commands today")

    @hookimpl(specname="register_commands")
    def good_commands(cli):
        @cli.command("hello-from-test")
        def hello():
            """Say hello."""

    group = click.Group("onnxq")
    host = Host(load_entry_points=False)
    host.register_module("good", _module("good_mod", good_commands=good_commands))
    host.register_module("bad", _module("bad_mod", register_commands=bad_commands))
    with caplog.at_level("WARNING", logger="onnxq"):
        host.register_commands(group)
    assert "hello-from-test" in group.commands
    assert any("plugin 'bad' (local)" in r.getMessage() and "RuntimeError: no commands today" in r.getMessage() for r in caplog.records), caplog.text


@pytest.fixture
def hostile_entry_point(tmp_path, monkeypatch):
    """Add an entry point whose module runs ``SOURCE`` at import to the real ones; the host is reloaded around the test."""
    from importlib import metadata

    from onnxq import host as host_mod

    made: list[str] = []

    def make(source: str) -> str:
        mod = f"onnxq_hostile_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{mod}.py").write_text(textwrap.dedent(source))
        made.append(mod)
        real = host_mod.metadata.entry_points

        def entry_points(**kw):
            eps = list(real(**kw))
            return eps + [metadata.EntryPoint(name=mod, value=mod, group=host_mod.GROUP)]

        monkeypatch.setattr(host_mod.metadata, "entry_points", entry_points)
        host_mod.reset_host()
        return mod

    monkeypatch.syspath_prepend(str(tmp_path))
    yield make
    host_mod.reset_host()
    for mod in made:
        sys.modules.pop(mod, None)


@pytest.mark.parametrize("exit_call", ["sys.exit()", "sys.exit(3)", "raise SystemExit('bye')"])
def test_plugin_calling_sys_exit_at_import_is_contained(hostile_entry_point, run_cli, exit_call):
    """A plugin that exits at import is a broken plugin like any other: --version, plugins and methods still work."""
    ep = hostile_entry_point(f"import sys\n{exit_call}\n")
    code, out, err = run_cli(["--version"])
    assert code == 0 and out.startswith("onnxq, version"), (code, out, err)
    code, out, err = run_cli(["plugins", "--json"])
    assert code == 0, err
    rec = {p["name"]: p for p in json.loads(out)}
    assert rec[ep]["ok"] is False and rec[ep]["error"].startswith("SystemExit")
    assert rec["minmax"]["ok"] is True
    code, out, err = run_cli(["methods"])
    assert code == 0 and "minmax" in out and f"plugin '{ep}' failed to load: SystemExit" in out, (code, out, err)


REGISTER_COMMANDS_FAILS = """
    from onnxq.hookspecs import hookimpl
    from onnxq.method import RangeMethod


    class Doomed(RangeMethod):
        name = "doomed-by-commands"
        summary = "registered before the plugin's command hook fails"
        needs_histogram = False

        def threshold(self, stats, ctx):
            return stats.amax


    @hookimpl
    def register_methods(register):
        register(Doomed)


    @hookimpl
    def register_commands(cli):
        @cli.command("half-added")
        def half_added():
            pass
        raise RuntimeError("no commands today")
"""


def test_plugin_whose_register_commands_raises_is_listed_as_broken_and_named(hostile_entry_point, run_cli, caplog):
    ep = hostile_entry_point(REGISTER_COMMANDS_FAILS)
    with caplog.at_level("WARNING", logger="onnxq"):
        code, out, err = run_cli(["plugins"])
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.startswith(ep))
    assert re.search(r"\sBROKEN\s+register_commands: RuntimeError: no commands today$", row), row
    # the warning names the plugin, on one line
    warning = [r.getMessage() for r in caplog.records if "no commands today" in r.getMessage()]
    assert len(warning) == 1 and f"plugin '{ep}'" in warning[0] and "\n" not in warning[0], caplog.text
    # what it registered is rolled back, the command it half-added too; everything else still works
    code, out, err = run_cli(["methods"])
    assert code == 0 and "minmax" in out and "doomed-by-commands" not in out
    code, out, err = run_cli(["half-added"])
    assert code == 2 and "No such command" in err


def test_each_plugin_registers_once():
    """Registering a second plugin does not call the first one's hooks again."""
    calls = []

    @hookimpl
    def first(register):
        calls.append("first")
        register(HalfRange)

    @hookimpl
    def second(register):
        calls.append("second")

    host = Host(load_entry_points=False)
    assert host.register_module("a", _module("a_mod", register_methods=first)).ok
    assert host.register_module("b", _module("b_mod", register_methods=second)).ok
    assert calls == ["first", "second"]


def test_backend_and_target_registration(tiny_model, tiny_feeds):
    from dataclasses import replace

    from onnxq.backends.ort import OrtBackend
    from onnxq.graph.targets import BUILTIN_PROFILES, get_profile

    class Copy(OrtBackend):
        name = "ort-copy"
        summary = "test backend"

    per_tensor = replace(BUILTIN_PROFILES["ort"], name="ort-per-tensor", weight_per_channel=False)

    @hookimpl
    def register_backends(register):
        register(Copy)

    @hookimpl
    def register_targets(register):
        register(per_tensor)

    host = Host(load_entry_points=False)
    rec = host.register_module("bt", _module("bt_mod", register_backends=register_backends, register_targets=register_targets))
    assert rec.ok and rec.provides == ["backend:ort-copy", "target:ort-per-tensor"]
    assert host.backend("ort-copy") is Copy
    assert host.target("ort-per-tensor", 7) == per_tensor.with_bits(7)
    assert host.target("trt") == get_profile("trt")  # built-ins without a host registration still resolve
    with pytest.raises(UnknownNameError, match=r"unknown backend 'nope' \(available: ort-copy\)"):
        host.backend("nope")
    with pytest.raises(UnknownNameError, match=r"unknown target 'nope' \(available: ort-per-tensor\)"):
        host.target("nope")


def test_backend_and_target_validation():
    @hookimpl
    def not_a_backend(register):
        register(HalfRange)

    @hookimpl
    def not_a_profile(register):
        register(HalfRange)

    host = Host(load_entry_points=False)
    r1 = host.register_module("b", _module("b_mod", register_backends=not_a_backend))
    r2 = host.register_module("t", _module("t_mod", register_targets=not_a_profile))
    assert not r1.ok and r1.error == "PluginError: backend 'halfrange' is not a Backend subclass"
    assert not r2.ok and r2.error == "PluginError: target 'halfrange' is not a TargetProfile"


def test_builtin_backends_and_targets_come_from_the_hook():
    host = Host()
    rec = next(p for p in host.plugins if "backend:ort" in p.provides)
    assert rec.module == "onnxq.backends.builtin" and rec.distribution == "onnxq"
    assert {"backend:trt", "target:ort", "target:trt", "target:ort-s8"} <= set(rec.provides)
    assert list(host.targets) == ["ort", "trt", "ort-s8"]


# ---------------------------------------------------------------------------------------------
# real installed packages
# ---------------------------------------------------------------------------------------------

def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=300)


def _installed_test_dists() -> list[str]:
    from importlib import metadata

    names = set()
    for d in metadata.distributions():
        name = (d.metadata["Name"] or "").lower().replace("_", "-")
        if name.startswith(TEST_DIST_PREFIX):
            names.add(name)
    return sorted(names)


def _uninstall(dist: str) -> None:
    proc = _pip("uninstall", "-y", "-q", dist)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def install_lock():
    """Serialise the install tests across pytest runs that share this venv; clear leftovers of killed runs."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed in this environment (needed to build the test plugin packages)")
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock, and leave other runs' packages alone
        yield
        return

    lock_path = Path(tempfile.gettempdir()) / f"onnxq-test-plugins-{Path(sys.prefix).resolve().as_posix().replace('/', '_')}.lock"
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            for stale in _installed_test_dists():  # left by a run that was killed before its cleanup
                _uninstall(stale)
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class InstalledPlugin:
    """A throw-away plugin package, pip-installed into the running venv."""

    def __init__(self, root: Path, kind: str, module_source: str) -> None:
        suffix = uuid.uuid4().hex[:10]
        self.dist = f"{TEST_DIST_PREFIX}{kind}-{suffix}"
        self.module = f"onnxq_test_plugin_{kind}_{suffix}"
        self.entry_point = f"{kind}plug_{suffix}"
        self.folder = root / self.dist
        (self.folder / self.module).mkdir(parents=True)
        (self.folder / "pyproject.toml").write_text(textwrap.dedent(f"""\
            [build-system]
            requires = ["setuptools"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "{self.dist}"
            version = "0.0.1"
            dependencies = ["onnxq"]

            [project.entry-points.onnxq]
            {self.entry_point} = "{self.module}"

            [tool.setuptools]
            packages = ["{self.module}"]
            """))
        (self.folder / self.module / "__init__.py").write_text(textwrap.dedent(module_source).replace("SUFFIX", suffix))
        self.installed = False

    def install(self) -> None:
        proc = _pip("install", "--no-deps", "--no-build-isolation", "--no-index", "--disable-pip-version-check", "-q", str(self.folder))
        assert proc.returncode == 0, f"pip install failed:\n{proc.stdout}\n{proc.stderr}"
        self.installed = True

    def uninstall(self) -> None:
        if self.installed:
            self.installed = False
            _uninstall(self.dist)


@contextlib.contextmanager
def _installed(root: Path, kind: str, source: str):
    plugin = InstalledPlugin(root, kind, source)
    try:
        plugin.install()
        yield plugin
    finally:
        plugin.uninstall()


GOOD_PLUGIN = '''
"""A third-party onnxq plugin used by onnxq's tests."""

import click

from onnxq.hookspecs import hookimpl
from onnxq.method import RangeMethod


class HalfRange(RangeMethod):
    """Clip every activation at half its observed max-abs."""

    name = "halfrange"
    summary = "test plugin: clip activations at 0.5 x max-abs"
    needs_histogram = False

    def threshold(self, stats, ctx):
        return 0.5 * stats.amax


@hookimpl
def register_methods(register):
    register(HalfRange)


@hookimpl
def register_commands(cli):
    @cli.command("hello-SUFFIX")
    def hello():
        """Say hello (test plugin)."""
        click.echo("hello from plugin SUFFIX")


@hookimpl
def report_sections(report):
    return {"plugin_SUFFIX": {"methods": list(report["method"])}}
'''

BROKEN_PLUGIN = '''
"""A plugin that cannot be imported."""

raise ImportError("onnxq test plugin SUFFIX needs a library that is not installed")
'''


@pytest.fixture(scope="module")
def good_plugin(install_lock, tmp_path_factory):
    with _installed(tmp_path_factory.mktemp("plugin-src"), "good", GOOD_PLUGIN) as plugin:
        yield plugin


@pytest.fixture(scope="module")
def broken_plugin(install_lock, tmp_path_factory):
    with _installed(tmp_path_factory.mktemp("plugin-src"), "broken", BROKEN_PLUGIN) as plugin:
        yield plugin


def _one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("onnxq: error: ") and "Traceback" not in stderr
    return lines[0]


def test_installed_plugin_is_listed(good_plugin, run_proc, onnxq_exe):
    proc = run_proc([onnxq_exe, "methods"])
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^halfrange\s+test plugin: clip activations at 0\.5 x max-abs$", proc.stdout, re.M), proc.stdout
    assert {"minmax", "trt-entropy"} <= {line.split()[0] for line in proc.stdout.splitlines()[2:] if line.strip()}
    proc = run_proc([onnxq_exe, "plugins", "--json"])
    assert proc.returncode == 0, proc.stderr
    rec = {p["name"]: p for p in json.loads(proc.stdout)}[good_plugin.entry_point]
    assert rec["ok"] is True and rec["provides"] == ["method:halfrange"]
    assert rec["distribution"] == good_plugin.dist and rec["version"] == "0.0.1" and rec["module"] == good_plugin.module


def test_installed_plugin_quantizes(good_plugin, run_proc, onnxq_exe, digits_model, digits_calib, tmp_path, session_of, digits_eval_arrays):
    out = tmp_path / "half.onnx"
    proc = run_proc([onnxq_exe, "optimize", digits_model, "-p", "halfrange", "--target", "trt", "--data", digits_calib,
                     "--output", out, "--no-cache", "--json"])
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["report"]["method"] == ["halfrange"]
    suffix = good_plugin.module.rsplit("_", 1)[-1]
    assert doc["report"]["extra"][f"plugin_{suffix}"] == {"methods": ["halfrange"]}  # the plugin's report_sections hook ran
    model = onnx.load(str(out))
    assert {p.key: p.value for p in model.metadata_props}["onnxq.method"] == "halfrange"
    onnx.checker.check_model(model, full_check=True)
    (logits,) = session_of(out).run(None, {"input": digits_eval_arrays[0][:50]})
    assert logits.shape == (50, 10) and np.all(np.isfinite(logits))
    # it really ran the plugin's calibrator: every activation scale is half of minmax's
    full = onnxq.optimize(digits_model, method="minmax", target="trt", data=str(digits_calib), cache_dir=None, show_progress=False)
    _assert_half_of(model, full.model)


def test_installed_plugin_adds_a_command(good_plugin, run_proc, onnxq_exe):
    suffix = good_plugin.module.rsplit("_", 1)[-1]
    proc = run_proc([onnxq_exe, f"hello-{suffix}"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"hello from plugin {suffix}"


def test_broken_plugin_is_reported_and_contained(broken_plugin, run_proc, onnxq_exe, digits_model, digits_calib, tmp_path):
    ep = broken_plugin.entry_point
    suffix = ep.rsplit("_", 1)[-1]
    error = f"ImportError: onnxq test plugin {suffix} needs a library that is not installed"

    proc = run_proc([onnxq_exe, "plugins"])
    assert proc.returncode == 0, proc.stderr
    row = next(line for line in proc.stdout.splitlines() if line.startswith(ep))
    assert re.match(rf"^{ep}\s+{broken_plugin.dist} 0\.0\.1\s+BROKEN\s+{re.escape(error)}$", row), row
    assert re.search(r"^minmax\s+onnxq \S+\s+ok\b", proc.stdout, re.M)

    proc = run_proc([onnxq_exe, "plugins", "--json"])
    rec = {p["name"]: p for p in json.loads(proc.stdout)}[ep]
    assert rec["ok"] is False and rec["error"] == error and rec["provides"] == []

    proc = run_proc([onnxq_exe, "methods"])
    assert proc.returncode == 0, proc.stderr
    assert "minmax" in proc.stdout and f"(plugin '{ep}' failed to load: {error})" in proc.stdout

    out = tmp_path / "q.onnx"
    proc = run_proc([onnxq_exe, "optimize", digits_model, "-p", "minmax", "--data", digits_calib, "--output", out, "--no-cache", "--quiet"])
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()

    proc = run_proc([onnxq_exe, "optimize", digits_model, "-p", "brokenmethod", "--data", digits_calib, "--output", tmp_path / "b.onnx"])
    assert proc.returncode == 1
    line = _one_error_line(proc.stderr)
    assert "unknown method 'brokenmethod'" in line and f"{ep} ({error})" in line
    assert not (tmp_path / "b.onnx").exists()


BACKEND_PLUGIN = '''
\"\"\"A third-party plugin adding a backend (ONNX Runtime under another name) and a target (per-tensor weights).\"\"\"

from dataclasses import replace

from onnxq.backends.ort import OrtBackend, OrtRunner
from onnxq.graph.targets import BUILTIN_PROFILES
from onnxq.hookspecs import hookimpl


class CopyRunner(OrtRunner):
    def details(self):
        return {"runner": "ort-copy SUFFIX"}


class OrtCopy(OrtBackend):
    name = "ort-copy"
    summary = "test plugin: ONNX Runtime under another name"
    targets = ("ort-per-tensor",)

    def runner(self, model, name, reference=False):
        return CopyRunner(model, name, self.threads, self.latency_repeats)


@hookimpl
def register_backends(register):
    register(OrtCopy)


@hookimpl(specname="register_targets")
def per_tensor_target(register):
    register(replace(BUILTIN_PROFILES["ort"], name="ort-per-tensor", weight_per_channel=False, description="test plugin: per-tensor weights"))
'''


@pytest.fixture(scope="module")
def backend_plugin(install_lock, tmp_path_factory):
    with _installed(tmp_path_factory.mktemp("plugin-src"), "backend", BACKEND_PLUGIN) as plugin:
        yield plugin


def _weight_scale_shapes(model: onnx.ModelProto) -> list[tuple[int, ...]]:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [inits[n.input[1]].shape for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].ndim > 1]


def test_installed_plugin_adds_a_backend_and_a_target(backend_plugin, run_proc, onnxq_exe, digits_model, digits_calib, digits_eval, tmp_path):
    suffix = backend_plugin.module.rsplit("_", 1)[-1]
    proc = run_proc([onnxq_exe, "plugins", "--json"])
    assert proc.returncode == 0, proc.stderr
    rec = {p["name"]: p for p in json.loads(proc.stdout)}[backend_plugin.entry_point]
    assert rec["ok"] is True and rec["provides"] == ["backend:ort-copy", "target:ort-per-tensor"], rec

    # the plugin's target: per-tensor weight scales where the built-in ort target has one per channel
    out = tmp_path / "digits.ort-per-tensor.onnx"
    proc = run_proc([onnxq_exe, "optimize", digits_model, "-p", "minmax", "--target", "ort-per-tensor", "--data", digits_calib,
                     "--output", out, "--no-cache", "--json"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["report"]["target"] == "ort-per-tensor"
    shapes = _weight_scale_shapes(onnx.load(str(out)))
    assert shapes and all(s == () for s in shapes), shapes
    per_channel = onnxq.optimize(digits_model, method="minmax", target="ort", data=str(digits_calib), cache_dir=None, show_progress=False)
    assert any(s != () for s in _weight_scale_shapes(per_channel.model))

    # the plugin's backend runs the comparison: same metrics as the built-in ort backend, its own rows
    docs = {}
    for backend in ("ort-copy", "ort"):
        proc = run_proc([onnxq_exe, "compare", digits_model, out, "--data", digits_eval, "--backend", backend, "--json"])
        assert proc.returncode == 0, proc.stderr
        docs[backend] = json.loads(proc.stdout)["evaluations"]
    assert [e["name"] for e in docs["ort-copy"]] == ["fp32", out.name]
    assert all(e["extra"] == {"runner": f"ort-copy {suffix}"} for e in docs["ort-copy"])
    assert [e["outputs"] for e in docs["ort-copy"]] == [e["outputs"] for e in docs["ort"]]
    assert docs["ort-copy"][1]["outputs"]["logits"]["accuracy"] > 0.9

    proc = run_proc([onnxq_exe, "compare", "--help"])
    assert re.search(r"--backend \[ort\|trt\|ort-copy\]", proc.stdout), proc.stdout
    proc = run_proc([onnxq_exe, "compare", digits_model, out, "--data", digits_eval, "--backend", "nope"])
    assert proc.returncode == 2 and "'nope' is not one of 'ort', 'trt', 'ort-copy'" in proc.stderr


def test_onnxq_works_after_uninstall(good_plugin, broken_plugin, run_proc, onnxq_exe):
    """Runs last in this module: uninstall both packages, then onnxq is back to the built-ins."""
    good_plugin.uninstall()
    broken_plugin.uninstall()
    assert not any(d in _installed_test_dists() for d in (good_plugin.dist, broken_plugin.dist))
    proc = run_proc([onnxq_exe, "methods"])
    assert proc.returncode == 0, proc.stderr
    assert "halfrange" not in proc.stdout and "failed to load" not in proc.stdout
    assert "trt-entropy" in proc.stdout
    proc = run_proc([onnxq_exe, "plugins", "--json"])
    plugins = json.loads(proc.stdout)
    assert all(p["ok"] for p in plugins), plugins
    assert not any(p["name"] in (good_plugin.entry_point, broken_plugin.entry_point) for p in plugins)
