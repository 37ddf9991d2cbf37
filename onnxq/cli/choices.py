"""Click choices read from the plugin host's registries, so that a plugin's backend or target is offered like a built-in."""

from __future__ import annotations

from typing import Any

import click


class RegistryChoice(click.Choice):
    """``click.Choice`` over the names in one of the host's registries (``"backends"``, ``"targets"``).

    The names are read when click first needs them (parsing, ``--help``), from the process-wide
    host; a wrong value is click's one-line usage error listing what is available.
    """

    def __init__(self, registry: str) -> None:
        self.registry = registry
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        from onnxq.host import get_host

        return tuple(getattr(get_host(), self.registry))

    def to_info_dict(self) -> dict[str, Any]:
        return {**super().to_info_dict(), "registry": self.registry}
