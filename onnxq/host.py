"""The plugin host: loads plugins from the ``onnxq`` entry-point group and keeps the registries.

Each entry point is loaded inside its own ``try``: a plugin that fails to import or to register
is recorded with its error (``onnxq plugins`` lists it) and never breaks other commands; asking
for something it would have provided names the broken plugin.
"""

from __future__ import annotations

import importlib
import logging
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from onnxq import hookspecs
from onnxq.calib.readers import DataReader
from onnxq.errors import PluginError, UnknownNameError
from onnxq.method import QuantMethod
from onnxq.tasks import TaskLoss

log = logging.getLogger(__name__)
GROUP = "onnxq"


@dataclass
class PluginRecord:
    """One plugin as the host saw it."""

    name: str
    module: str
    distribution: str
    version: str
    ok: bool
    error: str = ""
    provides: list[str] = field(default_factory=list)


class Host:
    """Plugin manager plus the registries filled by the registration hooks."""

    def __init__(self, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: list[PluginRecord] = []
        self.methods: dict[str, type[QuantMethod]] = {}
        self.readers: dict[str, type[DataReader]] = {}
        self.backends: dict[str, Any] = {}
        self.tasks: dict[str, type[TaskLoss]] = {}
        self._origin: dict[str, str] = {}
        if load_entry_points:
            self.load_entry_points()

    # -- loading -------------------------------------------------------------------------
    def load_entry_points(self) -> None:
        eps = list(metadata.entry_points(group=GROUP))
        names = {ep.value for ep in eps}
        if not any(ep.value.startswith("onnxq.") for ep in eps):
            # running from a source tree without installed metadata: load the built-ins directly
            from onnxq.plugins import BUILTIN_PLUGINS

            for mod in BUILTIN_PLUGINS:
                if mod not in names:
                    self._load(mod.rsplit(".", 1)[-1], mod, "onnxq", _version("onnxq"), lambda m=mod: importlib.import_module(m))
        for ep in sorted(eps, key=lambda e: (not e.value.startswith("onnxq."), e.name)):
            dist = ep.dist.name if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else "?"
            self._load(ep.name, ep.value, dist, version, ep.load)

    def register_module(self, name: str, module: Any, distribution: str = "local") -> PluginRecord:
        """Register an already-imported plugin object (used by tests and embedding code)."""
        return self._load(name, getattr(module, "__name__", name), distribution, "", lambda: module)

    def _load(self, name: str, module: str, dist: str, version: str, loader) -> PluginRecord:
        record = PluginRecord(name, module, dist, version, ok=False)
        self.plugins.append(record)
        before = self._snapshot()
        try:
            obj = loader()
            self.pm.register(obj, name=f"{dist}:{name}")
            self._call_registration(obj, record)
            record.ok = True
        except Exception as exc:  # any failure of a third-party plugin is contained here
            record.error = f"{type(exc).__name__}: {exc}".strip()
            record.provides.clear()  # whatever it registered before failing was rolled back
            log.debug("plugin %s failed:\n%s", name, traceback.format_exc())
            self._restore(before)
            try:
                self.pm.unregister(name=f"{dist}:{name}")
            except Exception:
                pass
        return record

    def _snapshot(self):
        return dict(self.methods), dict(self.readers), dict(self.backends), dict(self.tasks), dict(self._origin)

    def _restore(self, snap) -> None:
        self.methods, self.readers, self.backends, self.tasks, self._origin = (dict(x) for x in snap)

    def _call_registration(self, obj: Any, record: PluginRecord) -> None:
        def reg(kind: str, table: dict[str, Any], base: type | None):
            def register(cls: Any) -> None:
                key = getattr(cls, "name", "")
                if not key:
                    raise PluginError(f"{kind} {cls!r} has no name")
                if base is not None and not (isinstance(cls, type) and issubclass(cls, base)):
                    raise PluginError(f"{kind} '{key}' is not a {base.__name__} subclass")
                if key in table and self._origin.get(f"{kind}:{key}") != record.name:
                    raise PluginError(f"{kind} '{key}' is already provided by plugin '{self._origin[f'{kind}:{key}']}'")
                table[key] = cls
                self._origin[f"{kind}:{key}"] = record.name
                record.provides.append(f"{kind}:{key}")

            return register

        for hook, kind, table, base in (
            ("register_methods", "method", self.methods, QuantMethod),
            ("register_data_readers", "reader", self.readers, DataReader),
            ("register_backends", "backend", self.backends, None),
            ("register_task_losses", "task", self.tasks, TaskLoss),
        ):
            impl = getattr(obj, hook, None)
            if impl is not None:
                impl(register=reg(kind, table, base))

    # -- lookups -------------------------------------------------------------------------
    def broken(self) -> list[PluginRecord]:
        return [p for p in self.plugins if not p.ok]

    def _unknown(self, kind: str, name: str, known: list[str]) -> UnknownNameError:
        hint = ""
        if self.broken():
            hint = "; broken plugins that may provide it: " + ", ".join(f"{p.name} ({p.error})" for p in self.broken())
        return UnknownNameError(f"unknown {kind} '{name}' (available: {', '.join(sorted(known)) or 'none'}){hint}")

    def method(self, name: str) -> type[QuantMethod]:
        try:
            return self.methods[name]
        except KeyError:
            raise self._unknown("method", name, list(self.methods)) from None

    def reader(self, name: str) -> type[DataReader]:
        try:
            return self.readers[name]
        except KeyError:
            raise self._unknown("data reader", name, list(self.readers)) from None

    def task(self, name: str) -> type[TaskLoss]:
        try:
            return self.tasks[name]
        except KeyError:
            raise self._unknown("task", name, list(self.tasks)) from None

    def reader_for(self, spec: str) -> type[DataReader]:
        """The first reader that accepts ``spec`` (readers named 'kind:rest' are matched by name)."""
        kind, sep, _ = spec.partition(":")
        if sep and kind in self.readers and kind != "python":
            return self.readers[kind]
        for cls in self.readers.values():
            try:
                if cls.accepts(spec):
                    return cls
            except OSError:
                continue
        from onnxq.errors import DataError

        raise DataError(f"no data reader understands '{spec}' (a folder or file of .npz/.npy, an image folder, module:function, or random)")

    def report_sections(self, report: dict[str, Any]) -> dict[str, Any]:
        """Extra report sections from every plugin; a plugin whose hook fails is skipped with a warning."""
        extra: dict[str, Any] = {}
        for impl in reversed(self.pm.hook.report_sections.get_hookimpls()):  # pluggy's call order
            if impl.hookwrapper or getattr(impl, "wrapper", False):
                continue
            try:
                result = impl.function(**{k: v for k, v in {"report": report}.items() if k in impl.argnames})
            except Exception as exc:  # a broken report hook must not lose a finished run
                log.warning("plugin '%s' failed to add its report section: %s: %s", impl.plugin_name, type(exc).__name__, exc)
                log.debug("report_sections of %s failed:\n%s", impl.plugin_name, traceback.format_exc())
                continue
            if result:
                extra.update(result)
        return extra


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "source"


_HOST: Host | None = None


def get_host() -> Host:
    """The process-wide host (plugins are loaded once)."""
    global _HOST
    if _HOST is None:
        _HOST = Host()
    return _HOST


def reset_host() -> None:
    """Forget the loaded plugins (tests use this after installing a plugin)."""
    global _HOST
    _HOST = None
