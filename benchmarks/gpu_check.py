"""One prepared device run (`make gpu-check`): every part in its own process under its own time budget, the
report written and printed after each part, so the run cannot come back empty.

Runs on a bare GPU machine with PyTorch and Triton (pytest, transformers if there); needs no DeepSpeed,
mamba_ssm, causal_conv1d or lm-eval. The peers (fla-core, mamba_ssm's Triton SSD) come from the carried
``.peers/`` folder (benchmarks/peers.py). Parts, in order, with their budgets (:data:`PARTS`), measured by
benchmarks/gpu_check_parts.py:

1. ``bandwidth``: the device's own copy bandwidth (every bandwidth row is also shown as % of it).
2. ``scan``: our Triton scan, inference forward, training forward and backward timed separately (b 8 and 1 ×
   d_inner 1536 × L 2048, baseline and polarized, bf16, the mixer's strides), ideal and moved bytes, the goals;
   the not-default one-3-D-tile inference forward beside the shipped one; the PyTorch reference; a few tile
   alternatives.
3. ``peers``: conv, add+RMSNorm, linear+CE: ours / fla-core 0.6.0 / PyTorch, same shapes, dtype and process.
4. ``ssd``: Mamba-2's SSD, our PyTorch path / mamba_ssm 2.3.2.post1's Triton kernels.
5. ``train``: one mamba-130m-polar bf16 training step at 8 × 2048: tokens/s, MFU, top kernels.
6. ``niah``: prefill throughput at 32k and 128k tokens.
7. ``mqar``: the headline cells of configs/mqar/gpu-minutes.yaml while its budget lasts.
8. ``tests``: the ``gpu``-marked kernel tests.
9. ``probe``: a forward scan just past 2^31 elements (bounded; last).

A part that raises is recorded with its traceback; one that passes its budget is killed (its process group)
and keeps the rows it emitted. The whole run ends by itself within :data:`TOTAL_S` (under 7 minutes).
Writes gpu_check.{json,md} to ``--out-dir`` (default ``$OUT`` when set, else benchmarks/results) after every
part, nothing else there. ``--cpu-rehearsal`` runs the same parts at tiny shapes on CPU (the Triton
interpreter for our kernels) with budgets × :data:`REHEARSAL_SCALE`; the test suite runs it.
Run: python3 benchmarks/gpu_check.py [--cpu-rehearsal] [--skip mqar,tests] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PARTS_FILE = Path(__file__).resolve().parent / "gpu_check_parts.py"
TOTAL_S = 400  # the whole run, every part's process start included; 20 s below the 7-minute promise
REHEARSAL_SCALE = 3  # CPU rehearsal: the interpreter and a shared CI machine are slower than any GPU


@dataclass(frozen=True)
class Part:
    """A named measurement: ``target`` ("file.py:function") runs in its own process for at most ``budget_s``."""

    name: str
    budget_s: float
    target: str = ""

    def __post_init__(self):
        if not self.target:
            object.__setattr__(self, "target", f"{PARTS_FILE}:part_{self.name}")


PARTS = (Part("bandwidth", 20), Part("scan", 75), Part("peers", 55), Part("ssd", 40), Part("train", 45),
         Part("niah", 30), Part("mqar", 35), Part("tests", 50), Part("probe", 30))


@dataclass
class Context:
    """What a part's process gets: the mode, its deadline, folders, and figures of earlier parts."""

    rehearsal: bool
    deadline: float  # time.time() at which the runner kills the part
    result_path: Path
    scratch: Path  # for files the report does not need (only --out-dir comes back from the device)
    peers: Path
    known: dict = field(default_factory=dict)

    @property
    def device(self):
        import torch

        return torch.device("cpu" if self.rehearsal else "cuda")

    def time_left(self) -> float:
        return self.deadline - time.time()

    def emit(self, result: dict) -> None:
        """Record the part's result so far (what the runner reports if the part is stopped)."""
        tmp = self.result_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, default=str))
        os.replace(tmp, self.result_path)


def run_child(target: str, ctx: Context) -> int:
    """In a part's process: run ``target(ctx)`` and record its result, or its traceback."""
    file, func = target.rsplit(":", 1)
    spec = importlib.util.spec_from_file_location(Path(file).stem, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        result = getattr(module, func)(ctx)
        ctx.emit({"status": "ok", **result})
        return 0
    except BaseException:
        partial = json.loads(ctx.result_path.read_text()) if ctx.result_path.exists() else {}
        ctx.emit({**partial, "status": "error", "error": traceback.format_exc()[-1500:]})
        return 1


def _tail(path: Path, chars: int = 1200) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def run_part(part: Part, timeout: float, rehearsal: bool, peers: Path, scratch: Path, known: dict) -> dict:
    """Run one part in its own process group; kill the group at ``timeout`` seconds."""
    result_path, log = scratch / f"{part.name}.json", scratch / f"{part.name}.log"
    context = scratch / f"{part.name}.context.json"
    context.write_text(json.dumps(known))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", part.target, "--result", str(result_path),
           "--context", str(context), "--deadline", str(time.time() + timeout), "--peers", str(peers),
           "--scratch", str(scratch)] + (["--cpu-rehearsal"] if rehearsal else [])
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
            status = None
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the part and anything it started (pytest)
            proc.wait()
            status = "timeout"
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    if status == "timeout":
        result.update(status="timeout", note=f"stopped at its budget of {timeout:.0f} s; rows measured before are "
                                             "kept", log_tail=_tail(log))
    elif not result:  # died without a word (a crash in native code)
        result = dict(status="error", error=f"exit code {proc.returncode}, no result\n{_tail(log)}")
    elif result["status"] == "error":
        result["log_tail"] = _tail(log)
    return result


def markdown(report: dict) -> str:
    """The report as markdown: one section per part (budget and elapsed), its summary, note and rows."""
    lines = [f"# GPU check: {report['device']}", "",
             f"torch {report['torch']}, triton {report['triton']}; {report['seconds']:.0f} s of the run's "
             f"{report['total_budget_s']:.0f} s" + (" (CPU rehearsal: tiny shapes, not figures)"
                                                     if report["rehearsal"] else ""), ""]
    for name, part in report["parts"].items():
        timing = f" ({part['elapsed_s']} s of {part['budget_s']} s)" if "elapsed_s" in part else ""
        lines.append(f"## {name}: {part['status']}{timing}")
        lines += [f"\n{part[k]}" for k in ("summary", "note") if part.get(k)]
        rows = part.get("rows") or []
        if rows:
            cols = list(dict.fromkeys(k for r in rows for k in r))
            cell = lambda v: "—" if v is None else str(v).replace("|", "\\|")
            lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
        for key in ("error", "log_tail"):
            if part.get(key):
                lines.append(f"\n```\n{part[key].strip()}\n```")
        lines.append("")
    return "\n".join(lines)


def write_report(report: dict, out_dir: Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = markdown(report)
    (out_dir / "gpu_check.md").write_text(text + "\n")
    return text


def run(parts, out_dir: Path, total_s: float, rehearsal: bool = False, peers: Path = ROOT / ".peers",
        skip=frozenset()) -> int:
    """Every part in order, each under min(its budget, the run's time left); the report after each. Returns the
    exit code: 1 when a part raised, failed or ran out of time."""
    start = time.time()
    import torch
    import triton

    device = f"cpu ({platform.processor() or 'cpu'}; rehearsal)" if rehearsal else "CUDA device"
    report = dict(device=device, rehearsal=rehearsal, torch=torch.__version__, triton=triton.__version__,
                  total_budget_s=total_s, seconds=0.0, known={}, parts={})
    print(f"[gpu-check] {len(parts)} parts, each in its own process: "
          + ", ".join(f"{p.name} {p.budget_s:.0f} s" for p in parts) + f"; the run ends within {total_s:.0f} s",
          flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    for part in parts:
        left = total_s - (time.time() - start)
        timeout = min(part.budget_s, left - 2)
        if part.name in skip or timeout < 3:
            report["parts"][part.name] = dict(status="skipped", note="--skip" if part.name in skip else
                                              f"no time left ({left:.0f} s of the run)")
            continue
        print(f"[gpu-check] {part.name}: budget {timeout:.0f} s ...", flush=True)
        t0 = time.time()
        result = run_part(part, timeout, rehearsal, peers, scratch, report["known"])
        result.update(budget_s=round(timeout), elapsed_s=round(time.time() - t0, 1))
        report["known"].update(result.pop("known", {}))
        report["device"] = report["known"].get("device", report["device"])
        report["parts"][part.name] = result
        report["seconds"] = time.time() - start
        print(f"[gpu-check] {part.name}: {result['status']} in {result['elapsed_s']} s (budget {timeout:.0f} s)",
              flush=True)
        print(write_report(report, out_dir), flush=True)
    report["seconds"] = time.time() - start
    write_report(report, out_dir)  # also when every part was skipped
    bad = [n for n, p in report["parts"].items() if p["status"] in ("error", "failed", "timeout")]
    print(f"[gpu-check] done in {time.time() - start:.0f} s" + (f"; not ok: {', '.join(bad)}" if bad else ""),
          flush=True)
    return 1 if bad else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--cpu-rehearsal", action="store_true", help="tiny shapes on CPU (Triton interpreter)")
    p.add_argument("--skip", default="", help=f"comma-separated parts to skip, of {','.join(x.name for x in PARTS)}")
    out = os.environ.get("OUT")
    p.add_argument("--out-dir", type=Path, default=Path(out) if out else RESULTS,
                   help="where gpu_check.{json,md} go (default: $OUT when set, else benchmarks/results)")
    p.add_argument("--peers", type=Path, default=ROOT / ".peers", help="the carried peer folder (benchmarks/peers.py)")
    # a part's own process (started by the runner)
    for hidden in ("--child", "--result", "--context", "--deadline", "--scratch"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.cpu_rehearsal:  # read when a kernel launches; the parts' processes inherit it
        os.environ["TRITON_INTERPRET"] = "1"
    if args.child:
        ctx = Context(args.cpu_rehearsal, float(args.deadline), Path(args.result), Path(args.scratch), args.peers,
                      json.loads(Path(args.context).read_text()))
        return run_child(args.child, ctx)
    skip = {s for s in args.skip.split(",") if s}
    if unknown := skip - {x.name for x in PARTS}:
        p.error(f"--skip: unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(x.name for x in PARTS)}")
    if not args.cpu_rehearsal:
        import torch

        if not torch.cuda.is_available():
            p.error("no CUDA device here: run on a GPU machine, or pass --cpu-rehearsal")
    scale = REHEARSAL_SCALE if args.cpu_rehearsal else 1
    return run([Part(x.name, x.budget_s * scale, x.target) for x in PARTS], args.out_dir, TOTAL_S * scale,
               args.cpu_rehearsal, args.peers, skip)


if __name__ == "__main__":
    raise SystemExit(main())
