"""The plugin host: loads plugins from the ``onnxq`` entry-point group and keeps the registries.

Each entry point is loaded inside its own ``try``: a plugin that fails to import or to register
is recorded with its error (``onnxq plugins`` lists it) and never breaks other commands; asking
for something it would have provided names the broken plugin.

Hooks are called through pluggy's hook callers, one plugin at a time: besides the project-wide
``Host.pm`` every plugin gets a plugin manager of its own, whose ``pm.hook.<name>(...)`` reaches
only that plugin. So ``@hookimpl(specname=...)``, argument subsets and wrappers work as pluggy
documents them, and what a failing plugin registered is rolled back without touching the others.
(``PluginManager.subset_hook_caller`` would do the same from ``Host.pm`` but puts plugins in a set,
and a plugin object need not be hashable.)
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
from onnxq.graph.targets import BUILTIN_PROFILES, TargetProfile, get_profile
from onnxq.method import QuantMethod
from onnxq.runtime.runner import Backend
from onnxq.tasks import TaskLoss

log = logging.getLogger(__name__)
GROUP = "onnxq"
#: the package whose ``BUILTIN_PLUGINS`` names the built-in plugin modules (loaded by name, like entry points)
BUILTIN_PACKAGE = "onnxq.plugins"

#: registration hooks: hook name -> (kind shown in ``provides``, registry attribute, what a registered object must be)
REGISTRATION_HOOKS: dict[str, tuple[str, str, type]] = {
    "register_methods": ("method", "methods", QuantMethod),
    "register_data_readers": ("reader", "readers", DataReader),
    "register_backends": ("backend", "backends", Backend),
    "register_task_losses": ("task", "tasks", TaskLoss),
    "register_targets": ("target", "targets", TargetProfile),
}


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
        self.backends: dict[str, type[Backend]] = {}
        self.tasks: dict[str, type[TaskLoss]] = {}
        self.targets: dict[str, TargetProfile] = {}
        self._origin: dict[str, str] = {}
        #: (plugin record, a plugin manager holding only that plugin), in load order
        self._dispatch: list[tuple[PluginRecord, pluggy.PluginManager]] = []
        if load_entry_points:
            self.load_entry_points()

    # -- loading -------------------------------------------------------------------------
    def load_entry_points(self) -> None:
        eps = list(metadata.entry_points(group=GROUP))
        names = {ep.value for ep in eps}
        # built-ins without an entry point (a source tree without installed metadata, or metadata
        # older than the checkout) are loaded by module name, before everything else
        builtins = importlib.import_module(BUILTIN_PACKAGE).BUILTIN_PLUGINS
        for mod in builtins:
            if mod not in names:
                self._load(_builtin_name(mod), mod, "onnxq", _version("onnxq"), lambda m=mod: importlib.import_module(m))
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
            own = _single_plugin_manager(obj, f"{dist}:{name}")
            self._call_registration(own, record)
            self._dispatch.append((record, own))
            record.ok = True
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # any failure of a third-party plugin is contained here, sys.exit() at import included
            record.error = _describe(exc)
            record.provides.clear()  # whatever it registered before failing was rolled back
            log.debug("plugin %s failed:\n%s", name, traceback.format_exc())
            self._restore(before)
            try:
                self.pm.unregister(name=f"{dist}:{name}")
            except Exception:
                pass
        return record

    def _snapshot(self) -> dict[str, dict[str, Any]]:
        tables = {attr: dict(getattr(self, attr)) for _, attr, _ in REGISTRATION_HOOKS.values()}
        return {**tables, "_origin": dict(self._origin)}

    def _restore(self, snap: dict[str, dict[str, Any]]) -> None:
        for attr, table in snap.items():
            setattr(self, attr, dict(table))

    def _call_registration(self, own: pluggy.PluginManager, record: PluginRecord) -> None:
        def reg(kind: str, table: dict[str, Any], base: type):
            def register(item: Any) -> None:
                key = getattr(item, "name", "")
                if not key:
                    raise PluginError(f"{kind} {item!r} has no name")
                if base is TargetProfile:
                    if not isinstance(item, TargetProfile):
                        raise PluginError(f"{kind} '{key}' is not a TargetProfile")
                elif not (isinstance(item, type) and issubclass(item, base)):
                    raise PluginError(f"{kind} '{key}' is not a {base.__name__} subclass")
                if key in table and self._origin.get(f"{kind}:{key}") != record.name:
                    raise PluginError(f"{kind} '{key}' is already provided by plugin '{self._origin[f'{kind}:{key}']}'")
                table[key] = item
                self._origin[f"{kind}:{key}"] = record.name
                record.provides.append(f"{kind}:{key}")

            return register

        for hook, (kind, attr, base) in REGISTRATION_HOOKS.items():
            getattr(own.hook, hook)(register=reg(kind, getattr(self, attr), base))

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

    def backend(self, name: str) -> type[Backend]:
        try:
            return self.backends[name]
        except KeyError:
            raise self._unknown("backend", name, list(self.backends)) from None

    def target(self, name: str, bits: int = 8, block_size: int | None = None) -> TargetProfile:
        """The registered target profile ``name`` at ``bits`` (see :func:`onnxq.graph.targets.get_profile`)."""
        if name not in self.targets and name not in BUILTIN_PROFILES:
            raise self._unknown("target", name, list(self.targets) or list(BUILTIN_PROFILES))
        return get_profile(name, bits, block_size, self.targets)

    def _call_each(self, hook: str, what: str, on_failure: Any = None, **kwargs: Any) -> list[Any]:
        """Call ``hook`` plugin by plugin, the last loaded first (pluggy's order); a plugin whose hook raises is skipped with a warning.

        ``on_failure(record, error)`` is called for each plugin whose hook raised.
        Returns the results of the plugins that succeeded, in call order.
        """
        results: list[Any] = []
        for record, own in reversed(list(self._dispatch)):
            results += self._call_one(record, own, hook, what, on_failure, **kwargs)
        return results

    def report_sections(self, report: dict[str, Any]) -> dict[str, Any]:
        """Extra report sections from every plugin; a plugin whose hook fails is skipped with a warning."""
        extra: dict[str, Any] = {}
        for result in self._call_each("report_sections", "add its report section", report=report):
            if result:
                extra.update(result)
        return extra

    def register_commands(self, cli: Any) -> None:
        """Let every plugin add commands to the ``cli`` click group.

        A plugin whose hook fails is disabled as if it had failed to load: listed as broken with its
        error (``register_commands: ...``), its commands and registrations rolled back, a warning
        naming it. The other plugins keep theirs.
        """
        for record, own in reversed(list(self._dispatch)):
            before = dict(cli.commands)

            def disable(rec: PluginRecord, exc: BaseException, before: dict[str, Any] = before) -> None:
                # the commands it added before failing go; commands of plugins called earlier stay
                cli.commands.clear()
                cli.commands.update(before)
                self._disable(rec, f"register_commands: {_describe(exc)}")

            self._call_one(record, own, "register_commands", "add commands", disable, cli=cli)

    def _call_one(self, record: PluginRecord, own: pluggy.PluginManager, hook: str, what: str, on_failure: Any, **kwargs: Any) -> list[Any]:
        """:meth:`_call_each` for one plugin."""
        try:
            return getattr(own.hook, hook)(**kwargs)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            log.warning("plugin '%s' (%s) failed to %s: %s", record.name, record.distribution, what, _describe(exc))
            log.debug("%s of %s failed:\n%s", hook, record.name, traceback.format_exc())
            if on_failure is not None:
                on_failure(record, exc)
            return []

    def _disable(self, record: PluginRecord, error: str) -> None:
        """Turn a loaded plugin into a broken one: its registrations and hooks are removed."""
        record.ok = False
        record.error = error
        for kind_key in list(record.provides):
            kind, _, key = kind_key.partition(":")
            for k, attr, _base in REGISTRATION_HOOKS.values():
                if k == kind and self._origin.get(kind_key) == record.name:
                    getattr(self, attr).pop(key, None)
                    self._origin.pop(kind_key, None)
        record.provides.clear()
        self._dispatch = [(r, own) for r, own in self._dispatch if r is not record]
        try:
            self.pm.unregister(name=f"{record.distribution}:{record.name}")
        except Exception:
            pass


def _single_plugin_manager(plugin: Any, name: str) -> pluggy.PluginManager:
    """A plugin manager with onnxq's hookspecs and only ``plugin``: its hook callers reach that plugin alone."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(plugin, name=name)
    return pm


def _describe(exc: BaseException) -> str:
    """One line for a plugin's failure: ``SystemExit: 3``, ``ImportError: no module named x``."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}".strip().rstrip(":")


def _builtin_name(module: str) -> str:
    """The plugin name of a built-in module loaded without its entry point ("onnxq.tasks.builtin" -> "tasks")."""
    parts = module.split(".")
    return parts[-2] if parts[-1] == "builtin" else parts[-1]


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
