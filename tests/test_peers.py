"""The carried peers (benchmarks/peers.py) load on a machine like the GPU one: mamba_ssm's Triton SSD from the
registry's sdist without its package ``__init__`` (which imports the compiled extension), and a missing folder
says how to build it. (fla-core's functions are loaded by the gpu_check rehearsal, tests/test_gpu_check.py.)"""

import json
import subprocess
import sys
from pathlib import Path

from tests.built import PEERS, require_built
from tests.test_gpu_check import device_like_env

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import peers  # noqa: E402

PROBE = f"""
import json, sys
sys.path.insert(0, {str(ROOT / "benchmarks")!r})
import peers
functions, errors = peers.load(only="mamba_ssm")
ssd = sys.modules["mamba_ssm.ops.triton.ssd_combined"]
init_ran = hasattr(sys.modules["mamba_ssm"], "__file__")  # the bare package has none; a run __init__ would
print(json.dumps(dict(functions=sorted(functions), errors=errors, init_ran=init_ran,
                      extension="selective_scan_cuda" in sys.modules, ssd_file=ssd.__file__)))
"""


def test_mamba_ssm_triton_ssd_loads_without_its_cuda_extension(tmp_path):
    """Catches a loader that runs mamba_ssm/__init__.py (it imports selective_scan_cuda, absent on the device,
    so the SSD peer row would be lost) or picks up an installed mamba_ssm instead of the carried release."""
    require_built(PEERS, "peers")
    proc = subprocess.run([sys.executable, "-c", PROBE], env=device_like_env(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["functions"] == ["mamba_ssd"] and out["errors"] == {}
    assert not out["init_ran"] and not out["extension"]
    assert f"/{peers.TARGET_PREFIX}" in out["ssd_file"]


def test_a_missing_folder_names_the_build_command(tmp_path):
    """Catches a device run that silently drops the peer rows: each missing peer gets a line saying how to build."""
    functions, errors = peers.load(tmp_path / "absent")
    assert functions == {} and set(errors) == {"fla", "mamba_ssm"}
    assert all("python benchmarks/peers.py" in e for e in errors.values())
