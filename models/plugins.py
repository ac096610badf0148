"""Plugins: code outside the package that registers an architecture (``models.registry.register_arch``), an
evaluation (``eval.registry.register``) or a training hook (``pretrain.hooks.register_callback``) when imported.

Two ways to name them: the modules in ``$POLAR_PLUGINS`` (comma-separated import paths, e.g. a module beside
your configs on ``PYTHONPATH``) and an installed package's ``polar_mamba.plugins`` entry points. The `polar`
CLI loads them before building its parser, in every process of a run (launchers pass the environment on), and
the registries load them on a lookup that would otherwise fail, so a plain Python session finds a plugin's
architecture too. Loading twice is harmless: Python imports a module once.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os

from models.typed_config import ConfigError

ENV = "POLAR_PLUGINS"
GROUP = "polar_mamba.plugins"


def load_plugins() -> list[str]:
    """Import every plugin module; returns the names from ``$POLAR_PLUGINS`` (then the entry points')."""
    names = [n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:  # a typo or a missing PYTHONPATH entry: one line, not a traceback
            raise ConfigError(f"${ENV}: cannot import plugin '{name}': {e}; is its folder on PYTHONPATH?") from None
    for entry in importlib.metadata.entry_points(group=GROUP):
        entry.load()
        names.append(entry.value)
    return names
