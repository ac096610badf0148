"""Git-ignored builds a few tests need: the device's Triton 3.6 (``make triton36``) and the carried peer packages
(``make peers``). ``make test`` builds both first and sets ``POLAR_REQUIRE_BUILT=1``, so there a missing build
fails the test; a bare ``pytest`` run without them skips it, naming the make target."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRITON36 = ROOT / ".venv-triton36"
PEERS = ROOT / ".peers"


def require_built(path: Path, make_target: str) -> Path:
    """``path`` if it exists; else fail under ``make test`` (which builds it) and skip elsewhere."""
    if path.exists():
        return path
    message = f"{path.relative_to(ROOT)} is missing: run `make {make_target}`"
    if os.environ.get("POLAR_REQUIRE_BUILT") == "1":
        pytest.fail(message)
    pytest.skip(message)
