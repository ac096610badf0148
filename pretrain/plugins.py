"""Plugins: the modules named in ``$POLAR_PLUGINS`` (comma-separated import paths) are imported when `polar`
starts, in every process of a run (launchers pass the environment on), so code outside the package can
register hooks (``pretrain.hooks.register_callback``): the tests' fault injection, a site's extra logging."""

from __future__ import annotations

import importlib
import os

ENV = "POLAR_PLUGINS"


def load_plugins() -> list[str]:
    """Import each module named in ``$POLAR_PLUGINS``; returns their names."""
    names = [n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:  # a typo or a missing PYTHONPATH entry: one line, not a traceback
            raise RuntimeError(f"${ENV}: cannot import plugin '{name}': {e}") from e
    return names
