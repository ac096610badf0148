"""What the project is: its name, version and code license, as `pip show polar-mamba`, the model cards and the
Hub mixin's cards state them (the license text is LICENSE at the repository root)."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

NAME = "polar-mamba"
CODE_LICENSE = "Apache-2.0"


def code_version() -> str:
    """This checkout's version (pyproject.toml beside the code), else the installed package's."""
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if pyproject.is_file() and (m := re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.M)):
        return m[1]
    try:
        return importlib.metadata.version(NAME)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def code_line(url: str | None = None, version: str | None = None) -> str:
    """``polar-mamba 0.1.0 (code license Apache-2.0)`` (``version``: default this checkout's), linked to ``url``
    only when one is configured."""
    name = f"[{NAME}]({url})" if url else NAME
    return f"{name} {version or code_version()} (code license {CODE_LICENSE})"
