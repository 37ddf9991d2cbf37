"""Selecting and composing methods: options routed to their method, and the calibrator rules.

Two rules keep a composition from silently dropping anything (docs/plugins.md, "Composing methods"):

* an option key that several selected methods accept must say which one (``easyquant.samples``);
* at most one selected method calibrates activations, unless each later one declares
  :attr:`~onnxq.method.QuantMethod.follows_calibrator` (``-p cfws -p easyquant``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from onnxq.errors import OptionError
from onnxq.host import Host
from onnxq.method import QuantMethod
from onnxq.options import describe_options, parse_options


def resolve_methods(methods: str | Sequence[str], options: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None, host: Host) -> list[QuantMethod]:
    """Instantiate the selected methods with validated options and check that they compose.

    ``options`` is one mapping or one mapping per method. In one mapping, ``method.key`` targets
    one method; a plain key goes to the one selected method that has it, and is an error when
    several do.
    """
    names = [methods] if isinstance(methods, str) else list(methods)
    if not names:
        raise OptionError("no method given")
    classes = [host.method(n) for n in names]
    per_method: list[dict[str, Any]] = [{} for _ in classes]
    if isinstance(options, Sequence) and not isinstance(options, (str, Mapping)):
        for i, o in enumerate(options):
            per_method[i].update(o)
    elif options:
        for key, value in options.items():
            target, dot, sub = key.partition(".")
            if dot and target in names:
                per_method[names.index(target)][sub] = value
                continue
            owners = [i for i, c in enumerate(classes) if key.replace("-", "_") in {o.name for o in describe_options(c.Options)}]
            if not owners:
                if len(classes) == 1:
                    per_method[0][key] = value  # let parse_options name the valid options
                    continue
                raise OptionError(f"no selected method has an option '{key}' (methods: {', '.join(names)})")
            if len(owners) > 1:
                who = [names[i] for i in owners]
                raise OptionError(f"option '{key}' belongs to several selected methods ({', '.join(who)}); "
                                  f"say which with a prefix, e.g. -o {who[0]}.{key} {value}")
            per_method[owners[0]][key] = value
    selected = [cls(parse_options(cls.Options, per_method[i], f"method '{cls.name}'")) for i, cls in enumerate(classes)]
    check_composition(selected)
    return selected


def check_composition(methods: Sequence[QuantMethod]) -> None:
    """Refuse two methods that would both set activation ranges (the second would be ignored)."""
    calibrating = [m for m in methods if m.calibrates]
    for later in calibrating[1:]:
        if later.follows_calibrator:
            continue
        first = calibrating[0]
        hint = ""
        if first.calibrator_option:
            hint = f"; to have {first.name} use {later.name}'s ranges: -p {first.name} -o {first.name}.{first.calibrator_option} {later.name}"
        raise OptionError(f"methods '{first.name}' and '{later.name}' both set activation ranges and only one can; select one{hint}")


def calibrator_of(methods: Sequence[QuantMethod]) -> QuantMethod | None:
    """The method whose :meth:`~onnxq.method.QuantMethod.choose_qparams` sets the run's ranges:
    the first calibrating one, else the first that replaces the default calibrator, else None."""
    return next((m for m in methods if m.calibrates), None) or next((m for m in methods if m.replaces_default_calibrator), None)


def check_applicable(bits: int, block_size: int | None) -> None:
    """Refuse a setting that would have no effect instead of ignoring it (``--block-size`` with 8 bits)."""
    if block_size is not None and bits != 4:
        raise OptionError(f"the block size (--block-size {block_size}) applies to 4-bit weight-only quantization only "
                          f"(--bits 4); with {bits} bits it would be ignored: drop it")
