"""`make gpu-check` rehearsed on CPU: the same script end to end at tiny shapes (Triton interpreter for the
scan parts, PyTorch for the model), with the packages the GPU machine lacks made unimportable, so the one
prepared device run cannot fail for a reason a CPU catches."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ABSENT_ON_DEVICE = ("deepspeed", "lm_eval", "datasets", "wandb", "mamba_ssm", "causal_conv1d")
BLOCKER = f"""import sys
class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT_ON_DEVICE!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (absent on the GPU machine)")
sys.meta_path.insert(0, _Absent())
"""


@pytest.mark.slow
def test_gpu_check_rehearsal_writes_a_complete_report(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCKER)  # also reaches the script's pytest subprocess
    root = SCRIPT.parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "POLAR_KERNELS")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "site"), str(root)])
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-rehearsal", "--out-dir", str(out)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tmp_path = out
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = report["parts"]
    assert report["rehearsal"] and set(parts) == {"tests", "scan", "train", "niah", "probe", "mqar"}
    assert all(parts[p]["status"] == "ok" for p in ("tests", "scan", "train", "niah", "probe", "mqar")), parts
    scan = parts["scan"]["rows"]
    assert {(r["variant"], r["pass_"]) for r in scan} >= {(v, p) for v in ("baseline", "polar") for p in ("fwd", "bwd")}
    assert all(r["ms"] > 0 and r["gbps"] > 0 for r in scan)
    assert parts["train"]["tokens_per_s"] > 0 and parts["train"]["top_kernels"]
    assert [r["tokens"] for r in parts["niah"]["rows"]] == [64, 96]
    assert parts["probe"]["max_abs_diff_last_channels"] == 0.0
    assert [r["cell"] for r in parts["mqar"]["rows"]] == ["default-L1", "both-L1", "both-reference-L1"]
    assert all(0 <= r["average"] <= 100 and r["tokens_per_s"] > 0 for r in parts["mqar"]["rows"])
    assert "## scan: ok" in (tmp_path / "gpu_check.md").read_text()


def test_rehearsal_blocker_hides_device_absent_packages(tmp_path):
    """The blocker works (else the rehearsal would not show a missing-package failure)."""
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", "import deepspeed"], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "absent on the GPU machine" in proc.stderr


def test_gpu_check_refuses_unknown_parts_and_a_missing_gpu(capsys):
    gpu_check = load_script()
    with pytest.raises(SystemExit):
        gpu_check.main(["--cpu-rehearsal", "--skip", "scna"])
    assert "unknown part(s) scna" in capsys.readouterr().err
    if not __import__("torch").cuda.is_available():
        with pytest.raises(SystemExit):
            gpu_check.main([])
        assert "no CUDA device here" in capsys.readouterr().err
