"""`make gpu-check` rehearsed on CPU, and the guarantees that make its one device run count.

The rehearsal runs the same script end to end at tiny shapes (Triton interpreter for our kernels, PyTorch for
the model), with the packages the GPU machine lacks made unimportable, so the prepared run cannot fail for a
reason a CPU catches. The runner is shown to survive a part that hangs and one that raises, and the profiler
table to read an attribute the profiler's events really have.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tests.built import PEERS, require_built

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
PARTS = ("bandwidth", "scan", "peers", "ssd", "train", "niah", "mqar", "tests", "probe")


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ABSENT_ON_DEVICE = ("deepspeed", "lm_eval", "datasets", "wandb", "mamba_ssm", "causal_conv1d", "selective_scan_cuda")
# mamba_ssm is absent on the device too, except the carried sources benchmarks/peers.py unpacks into a
# temporary "polar-peers-*" target: imports from there pass, so the rehearsal shows its CUDA extension is not needed.
BLOCKER = f"""import sys
class _Absent:
    def find_spec(self, name, path=None, target=None):
        carried = path is not None and all("polar-peers-" in str(p) for p in path)
        if name.split(".")[0] in {ABSENT_ON_DEVICE!r} and not carried:
            raise ModuleNotFoundError(f"No module named {{name!r}} (absent on the GPU machine)")
sys.meta_path.insert(0, _Absent())
"""


def device_like_env(tmp_path) -> dict:
    (tmp_path / "site").mkdir(exist_ok=True)
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCKER)  # reaches every part's process and pytest's
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "POLAR_KERNELS", "OUT")}
    env["PYTHONPATH"] = str(tmp_path / "site")  # the script finds the project itself, as `python3` on the device
    return env


@pytest.mark.slow
def test_gpu_check_rehearsal_writes_a_complete_report(tmp_path):
    """Catches anything the device run would trip on that a CPU can show: a part that raises, a device-absent
    import (deepspeed, mamba_ssm's CUDA extension), a peer that does not load from the carried folder, a report
    missing a part."""
    require_built(PEERS, "peers")
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-rehearsal", "--out-dir", str(out)], cwd=tmp_path,
                          env=device_like_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    parts = report["parts"]
    assert report["rehearsal"] and tuple(parts) == PARTS
    assert all(parts[p]["status"] == "ok" and parts[p]["elapsed_s"] <= parts[p]["budget_s"] for p in PARTS), parts
    assert sorted(os.listdir(out)) == ["gpu_check.json", "gpu_check.md"]  # nothing else comes back from $OUT
    assert report["known"]["copy_gbps"] > 0
    scan = parts["scan"]["rows"]
    passes = {"inference fwd", "training fwd", "bwd", "training fwd+bwd"}
    assert {(r["variant"], r["pass"]) for r in scan} >= {(v, p) for v in ("baseline N4", "polar 1+4+1") for p in passes}
    shipped = [r for r in scan if not r["variant"].startswith("polar, ")]
    # the byte model counts at least the ideal bytes (a tensor it missed would flatter the bandwidth)
    assert all(r["ms"] > 0 and r["moved MB"] >= r["ideal MB"] and r["% copy ideal"] is not None for r in shipped)
    # the training forward saves states: it moves more than the inference forward
    by = {(r["variant"], r["pass"]): r for r in scan}
    assert by["polar 1+4+1", "training fwd"]["moved MB"] >= by["polar 1+4+1", "inference fwd"]["moved MB"]
    assert parts["peers"]["loaded"] == ["fla_conv", "fla_linear_ce", "fla_rms_norm"] and parts["ssd"]["loaded"]
    ours = [r for r in parts["peers"]["rows"] if r["ours ms"] and r["torch ms"] and r["ours/torch"]]
    assert {r["op"] for r in ours} == {"causal_conv1d", "add_rmsnorm", "linear_cross_entropy"}
    assert parts["train"]["tokens_per_s"] > 0 and all(r["ms"] > 0 for r in parts["train"]["rows"])
    assert [r["tokens"] for r in parts["niah"]["rows"]] == [64, 96]
    assert parts["probe"]["max_abs_diff_last_channels"] == 0.0
    assert [r["cell"] for r in parts["mqar"]["rows"]] == ["default-L1", "both-L1", "both-reference-L1"]
    text = (out / "gpu_check.md").read_text()
    assert all(f"## {p}: ok (" in text for p in PARTS)
    assert proc.stdout.count("# GPU check:") == len(PARTS)  # the markdown is printed after every part


FAKE_PARTS = """
import json, shutil, time

def fine(ctx):
    return dict(rows=[dict(value=1)], known=dict(copy_gbps=1.0))

def hang(ctx):
    # what the runner wrote before this part started, copied aside: it must already hold the first part
    shutil.copy(OUT / "gpu_check.json", OUT.parent / "before_hang.json")
    shutil.copy(OUT / "gpu_check.md", OUT.parent / "before_hang.md")
    ctx.emit(dict(rows=[dict(value=2)]))  # measured before the hang: kept
    time.sleep(600)

def boom(ctx):
    raise RuntimeError("this part raises")

def after(ctx):
    return dict(summary=f"saw copy_gbps={ctx.known['copy_gbps']}")
"""


def test_a_hanging_and_a_raising_part_cost_only_themselves(tmp_path):
    """Catches a check that comes back empty: a part that hangs (a stuck kernel) must be killed at its budget
    and one that raises recorded, while the other parts' JSON and markdown are already written and the
    process ends by itself within the run's budget."""
    out = tmp_path / "out"
    parts_file = tmp_path / "fake_parts.py"
    parts_file.write_text(f"from pathlib import Path\nOUT = Path({str(out)!r})\n" + FAKE_PARTS)
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(SCRIPT.parent)!r})
        import gpu_check
        from gpu_check import Part
        f = {str(parts_file)!r}
        parts = [Part("fine", 20, f + ":fine"), Part("hang", 3, f + ":hang"), Part("boom", 20, f + ":boom"),
                 Part("after", 20, f + ":after")]
        sys.exit(gpu_check.run(parts, gpu_check.Path({str(out)!r}), total_s=60))
    """))
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(driver)], capture_output=True, text=True, timeout=120)
    elapsed = time.time() - t0
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # not ok: a part hung, one raised
    assert elapsed < 60, elapsed
    before = json.loads((tmp_path / "before_hang.json").read_text())
    assert before["parts"]["fine"]["status"] == "ok" and before["parts"]["fine"]["rows"] == [{"value": 1}]
    assert "## fine: ok" in (tmp_path / "before_hang.md").read_text()
    parts = json.loads((out / "gpu_check.json").read_text())["parts"]
    assert parts["hang"]["status"] == "timeout" and parts["hang"]["rows"] == [{"value": 2}]
    assert parts["hang"]["elapsed_s"] < 3 + 5 and parts["hang"]["budget_s"] == 3
    assert parts["boom"]["status"] == "error" and "RuntimeError: this part raises" in parts["boom"]["error"]
    assert parts["after"]["status"] == "ok" and parts["after"]["summary"] == "saw copy_gbps=1.0"
    text = (out / "gpu_check.md").read_text()
    assert "## hang: timeout (" in text and "## boom: error (" in text and "## after: ok (" in text
    assert "[gpu-check] hang: budget 3 s" in proc.stdout and "[gpu-check] hang: timeout in" in proc.stdout


def test_the_run_budget_leaves_parts_out_instead_of_overrunning(tmp_path):
    """Catches a run that outlives its budget: a part the time left cannot hold is skipped with the reason."""
    gpu_check = load(SCRIPT)
    parts = [gpu_check.Part("late", 100, f"{tmp_path}/never.py:late")]
    assert gpu_check.run(parts, tmp_path, total_s=2) == 0
    late = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]["late"]
    assert late["status"] == "skipped" and late["note"].startswith("no time left")


def test_the_budgets_fit_in_seven_minutes():
    """Catches a part budget added or raised past the 7 minutes the device run promises."""
    gpu_check = load(SCRIPT)
    assert sum(p.budget_s for p in gpu_check.PARTS) <= gpu_check.TOTAL_S < 7 * 60
    assert gpu_check.PARTS[-1].name == "probe"  # the >2^31 probe runs last


def test_report_goes_to_OUT_by_default(tmp_path):
    """Catches a device run whose report lands outside $OUT (only $OUT comes back from the GPU machine)."""
    env = dict(os.environ, OUT=str(tmp_path))
    skip = ",".join(PARTS)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-rehearsal", "--skip", skip], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["gpu_check.json", "gpu_check.md"]


def test_rehearsal_blocker_hides_device_absent_packages(tmp_path):
    """The blocker works (else the rehearsal would not show a missing-package failure)."""
    env = device_like_env(tmp_path)
    proc = subprocess.run([sys.executable, "-c", "import deepspeed"], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "absent on the GPU machine" in proc.stderr


def test_gpu_check_refuses_unknown_parts_and_a_missing_gpu(capsys):
    gpu_check = load(SCRIPT)
    with pytest.raises(SystemExit):
        gpu_check.main(["--cpu-rehearsal", "--skip", "scna"])
    assert "unknown part(s) scna" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            gpu_check.main([])
        assert "no CUDA device here" in capsys.readouterr().err


def test_top_kernels_reads_the_profilers_own_events():
    """Catches the empty top-kernels table: the check read ``cuda_time_total``, which the profiler's averaged
    events (FunctionEventAvg) do not have, through a getattr default of 0. The extraction now reads the
    attribute strictly, on the profiler's own objects: the CPU column must sum to the profiled time, the
    device column must exist (0 on CPU), and a missing name must raise."""
    parts = load(ROOT / "benchmarks" / "gpu_check_parts.py")
    from torch.profiler import ProfilerActivity, profile

    a = torch.randn(256, 256)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            (a @ a).relu_()
    events = prof.key_averages()
    rows, total = parts.top_kernels(events, "self_cpu_time_total")
    assert rows and all(r["ms"] > 0 for r in rows) and "aten::mm" in {r["kernel"] for r in rows}
    assert total == pytest.approx(sum(e.self_cpu_time_total for e in events) / 1e3, abs=0.01)
    rows, total = parts.top_kernels(events, "self_device_time_total")  # what a CUDA run reads
    assert rows == [] and total == 0
    with pytest.raises(AttributeError):
        parts.top_kernels(events, "cuda_time_total")
