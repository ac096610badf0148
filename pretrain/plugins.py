"""Plugins: modules named in ``POLAR_PLUGINS`` (comma-separated, importable from ``PYTHONPATH``) are imported
when the `polar` CLI starts, before its parser is built, so what they register at import (an evaluation with
``eval.registry.register``, ...) is there for every subcommand, and for the processes the CLI starts (they
inherit the variable). A module that does not import is a one-line error naming it."""

from __future__ import annotations

import importlib
import os

ENV = "POLAR_PLUGINS"


def plugin_modules() -> list[str]:
    return [m.strip() for m in os.environ.get(ENV, "").split(",") if m.strip()]


def load_plugins() -> list[str]:
    """Import every module of ``POLAR_PLUGINS``; returns their names."""
    names = plugin_modules()
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ImportError(f"{ENV}: cannot import plugin module {name!r} ({e}); is its folder on PYTHONPATH?") \
                from None
    return names
