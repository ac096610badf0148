"""One prepared device run (`make gpu-check`): everything the GPU path must show, in one JSON + markdown report.

Runs on a bare GPU machine with PyTorch and Triton (pytest, transformers, sentencepiece, safetensors if
there); needs no DeepSpeed, mamba_ssm, datasets or lm-eval, and skips what is absent with a note. Parts:

1. ``scan``: the Triton selective scan, forward and backward timed separately, at batch 8 and batch 1 ×
   d_inner 1536 × L 2048 (mamba-130m), baseline (N 16) and polarized (1 + 16 + 1), bf16, on tensors with
   the mixer's real strides; ms, GB/s of the ideal bytes (each input read once, each output written once) and
   % of the device's HBM bandwidth; plus a few (BLOCK_D, CHUNK, num_warps) alternatives to the shipped table.
2. ``train``: one mamba-130m-polar bf16 training step at batch 8 × 2048 on the model alone (forward with the
   chunked loss, backward, AdamW; DeepSpeed is not on the device): tokens/s, MFU (6·params·tokens/s over
   the bf16 dense peak) and the top CUDA kernels from torch.profiler.
3. ``niah``: prefill throughput (tokens/s) of mamba-130m-polar at 32k and 128k tokens (eval.niah.prefill).
4. ``probe``: a forward-only scan past 2^31 elements (int64 offsets): the last channels must equal the same
   scan run on those channels alone.
5. ``tests``: the ``gpu``-marked tests (compiled kernels vs the PyTorch references), via pytest, in the time
   left of the 8-minute budget.

``--cpu-rehearsal`` runs the same code on CPU at tiny shapes (kernels in the Triton interpreter where a part
times a kernel, the PyTorch path for the model), so the device run cannot fail for a reason a CPU catches;
the test suite runs it. Writes benchmarks/results/gpu_check.{json,md} (rehearsal: --out-dir).
Run: PYTHONPATH=. python benchmarks/gpu_check.py [--cpu-rehearsal] [--skip tests,probe]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # so `kernels` and `models` import without PYTHONPATH
RESULTS = ROOT / "benchmarks" / "results"
START = time.perf_counter()

PEAK_TFLOPS_BF16 = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "L4": 121}  # dense, spec sheets
PARTS = ("scan", "train", "niah", "probe", "mqar", "tests")  # figures first; the tests get the time left
BUDGET_S = 450  # the whole run must end within 8 minutes, compilation included
MQAR_BUDGET_S = 240  # configs/mqar/gpu-minutes.yaml's headline cells get at most this (and leave 60 s for the tests)
# The rehearsal's MQAR: the same protocol and code path at a size the interpreter-free CPU runs in seconds.
MQAR_REHEARSAL = {"model.d_model": 32, "model.vocab_size": 64, "data.vocab_size": 64, "optim.epochs": 1,
                  "data.train": [{"seq_len": 32, "num_kv_pairs": 4, "num_examples": 64}],
                  "data.eval": [{"seq_len": 32, "num_kv_pairs": 4, "num_examples": 16}],
                  "data.batch_size": 16, "data.eval_batch_size": 16, "sweep.n_layers": [1]}


@dataclass
class Shapes:
    """Every size the check uses; the rehearsal shrinks them all."""

    scan_batches: tuple = (8, 1)
    d_inner: int = 1536
    seq: int = 2048
    n_state: int = 16
    preset: str = "mamba-130m-polar"
    train_batch: int = 8
    train_seq: int = 2048
    niah_lengths: tuple = (32768, 131072)
    niah_chunk: int = 32768
    probe: tuple = (1, 5120, 2**19)  # b·d·L = 2.7e9 > 2^31
    repeat: int = 10
    warmup: bool = True  # one untimed call first (it compiles the kernels)
    sweep: tuple = ((16, 64, 8), (16, 32, 4), (8, 64, 8), (32, 32, 8))  # (BLOCK_D, CHUNK, warps), both passes
    test_timeout: int = 240


REHEARSAL = Shapes(scan_batches=(1,), d_inner=16, seq=37, n_state=4, preset="mamba-tiny-polar", train_batch=2,
                   train_seq=32, niah_lengths=(64, 96), niah_chunk=48, probe=(1, 32, 40), repeat=1, warmup=False,
                   sweep=((8, 16, 4),), test_timeout=240)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or 'cpu'}, {torch.get_num_threads()} threads; rehearsal)"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn, device, repeat: int, warmup: bool = True) -> float:
    """Median milliseconds of ``fn()``, after one warm-up call (which also compiles) when ``warmup``."""
    if warmup:
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def peak_gbps(device) -> float | None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_kernels import peak_bandwidth

    return peak_bandwidth(device)


def mixer_inputs(b, d, L, N, n_ones, n_zeros, dtype, device, dt_rank=48):
    """Scan inputs with the strides the Mamba mixer produces: (b, L, ·) buffers seen as (b, ·, L)."""
    nt = n_ones + N + n_zeros
    xz = torch.randn(b, L, 2 * d, device=device, dtype=dtype)
    u = torch.randn(b, L, d, device=device, dtype=dtype).transpose(1, 2)  # the conv's output (its own buffer)
    z = xz[..., d:].transpose(1, 2)
    proj = torch.randn(b, L, dt_rank + 2 * nt, device=device, dtype=dtype)
    delta = (torch.randn(b, L, d, device=device, dtype=dtype) * 0.5 - 3).transpose(1, 2)
    B, C = proj[..., dt_rank : dt_rank + nt].transpose(1, 2), proj[..., dt_rank + nt :].transpose(1, 2)
    A = -torch.exp(torch.randn(d, N, device=device) * 0.5)
    D, bias = torch.randn(d, device=device), torch.randn(d, device=device) * 0.3
    return [u, delta, A, B, C, D, z, bias]


def part_tests(shapes: Shapes, device, rehearsal: bool) -> dict:
    try:
        import pytest  # noqa: F401
    except ImportError:
        return dict(status="skipped", note="pytest is not installed here (carry it as a wheel to run these)")
    timeout = max(30, min(shapes.test_timeout, BUDGET_S - (time.perf_counter() - START)))
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_kernels_scan.py",
           "tests/test_kernels_ops.py", "tests/test_kernels_dispatch.py"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return dict(status="failed", note=f"stopped after {timeout:.0f} s (the run's 8-minute budget)",
                    summary=out.strip().splitlines()[-1] if out.strip() else "", seconds=round(timeout), failures=[])
    lines = proc.stdout.strip().splitlines()
    return dict(status="ok" if proc.returncode in (0, 5) else "failed", returncode=proc.returncode,
                summary=lines[-1] if lines else proc.stderr[-500:], seconds=round(time.perf_counter() - t0, 1),
                failures=[x for x in lines if x.startswith("FAILED")][:20])


def scan_bytes(b, d, L, nt, es):
    """Ideal bytes: forward reads u, Δ, z, B, C and writes y; backward reads u, Δ, z, B, C, gy and writes
    gu, gΔ, gz, gB, gC."""
    return (4 * b * d * L + 2 * b * nt * L) * es, (7 * b * d * L + 4 * b * nt * L) * es


def part_scan(shapes: Shapes, device, rehearsal: bool) -> dict:
    from kernels import scan_triton

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    es = torch.finfo(dtype).bits // 8
    peak = peak_gbps(device)
    rows = []

    def measure(b, n1, n0, label, config=None):
        d, L, N = shapes.d_inner, shapes.seq, shapes.n_state
        inputs = mixer_inputs(b, d, L, N, n1, n0, dtype, device)
        kw = dict(delta_softplus=True, n_ones=n1, n_zeros=n0)
        # every input requires a gradient, as in training (views keep the mixer's strides)
        leaves = [t.requires_grad_() for t in inputs]
        saved = dict(scan_triton.CONFIGS)
        if config is not None:
            for key in saved:
                scan_triton.CONFIGS[key] = config
        try:
            fwd = lambda: scan_triton.selective_scan(*leaves, **kw)
            y = fwd()
            gy = torch.randn_like(y)
            fwd_ms = timed_ms(fwd, device, shapes.repeat, shapes.warmup)
            bwd = lambda: torch.autograd.grad(y, leaves, gy, retain_graph=True)
            bwd_ms = timed_ms(bwd, device, shapes.repeat, shapes.warmup)
        finally:
            scan_triton.CONFIGS.update(saved)
        fb, bb = scan_bytes(b, d, L, n1 + N + n0, es)
        for kind, ms, nbytes in (("fwd", fwd_ms, fb), ("bwd", bwd_ms, bb)):
            gbps = nbytes / ms / 1e6
            rows.append(dict(shape=f"b{b} d{d} L{L}", variant=label, pass_=kind, ms=float(f"{ms:.4g}"),
                             gbps=float(f"{gbps:.4g}"), pct_peak=round(100 * gbps / peak, 1) if peak else None,
                             config=list(config or scan_triton.config("train" if kind == "fwd" else kind, dtype, d,
                                                                      None))))

    for b in shapes.scan_batches:
        measure(b, 0, 0, "baseline N16" if not rehearsal else "baseline")
        measure(b, 1, 1, "polar 1+16+1" if not rehearsal else "polar")
    for config in shapes.sweep:  # alternatives to the shipped table, batch 8 polarized
        measure(shapes.scan_batches[0], 1, 1, f"polar, sweep {config}", tuple(config))
    return dict(status="ok", dtype=str(dtype), peak_gbps=peak, rows=rows)


def part_train(shapes: Shapes, device, rehearsal: bool) -> dict:
    from models import MambaLM, ModelConfig

    note = "model alone (DeepSpeed is not installed here)"
    try:
        import deepspeed  # noqa: F401

        note = "model alone (the trainer's DeepSpeed engine is measured by benchmarks/bench_train.py)"
    except ImportError:
        pass
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = ModelConfig.preset(shapes.preset)
    model = MambaLM(cfg).to(device=device, dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (shapes.train_batch, shapes.train_seq + 1), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        model(ids[:, :-1], labels=ids[:, 1:], return_logits=False).loss.backward()
        opt.step()

    ms = timed_ms(step, device, max(1, shapes.repeat // 2), shapes.warmup)
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        step()
        sync(device)
    attr = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, attr, 0) or 0, reverse=True)
    total = sum(getattr(e, attr, 0) or 0 for e in events if not e.key.startswith("ProfilerStep")) or 1
    top = [dict(kernel=e.key[:90], ms=round((getattr(e, attr, 0) or 0) / 1e3, 3), calls=e.count)
           for e in events[:12]]
    tokens = shapes.train_batch * shapes.train_seq
    params = model.num_parameters()
    tflops = 6 * params * tokens / (ms / 1e3) / 1e12
    peak = next((v for k, v in PEAK_TFLOPS_BF16.items() if k in device_name(device)), None)
    return dict(status="ok", note=note, preset=shapes.preset, params=params, batch=shapes.train_batch,
                seq=shapes.train_seq, step_ms=round(ms, 2), tokens_per_s=round(tokens / ms * 1e3),
                tflops=round(tflops, 2), mfu=round(tflops / peak, 4) if peak else None, peak_tflops=peak,
                top_kernels=top, profiled_total_ms=round(total / 1e3, 2))


def part_niah(shapes: Shapes, device, rehearsal: bool) -> dict:
    from eval.niah import prefill
    from models import MambaLM, ModelConfig

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = ModelConfig.preset(shapes.preset)
    model = MambaLM(cfg).to(device=device, dtype=dtype).eval()
    rows = []
    for length in shapes.niah_lengths:
        ids = torch.randint(0, cfg.vocab_size, (1, length), device=device)
        with torch.no_grad():
            ms = timed_ms(lambda ids=ids: prefill(model, ids, shapes.niah_chunk), device, 1)
        rows.append(dict(tokens=length, chunk=shapes.niah_chunk, seconds=round(ms / 1e3, 3),
                         tokens_per_s=round(length / ms * 1e3)))
    return dict(status="ok", preset=shapes.preset, rows=rows)


def part_probe(shapes: Shapes, device, rehearsal: bool) -> dict:
    from kernels import scan_triton

    b, d, L = shapes.probe
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    u, delta, A, B, C, D, z, bias = mixer_inputs(b, d, L, 16 if not rehearsal else 4, 1, 1, dtype, device)
    kw = dict(delta_softplus=True, n_ones=1, n_zeros=1)
    with torch.no_grad():
        t0 = time.perf_counter()
        y = scan_triton.selective_scan(u, delta, A, B, C, D, z, bias, **kw)
        sync(device)
        seconds = time.perf_counter() - t0
        tail = slice(d - 16, d)  # the channels whose offsets pass 2^31 in the big run
        part = lambda t: t[:, tail].contiguous()
        want = scan_triton.selective_scan(part(u), part(delta), A[tail], B, C, D[tail], part(z), bias[tail], **kw)
        err = (y[:, tail].float() - want.float()).abs().max().item()
    elements = b * d * L
    ok = err == 0.0 and bool(torch.isfinite(y[:, tail]).all())
    return dict(status="ok" if ok else "failed", shape=f"b{b} d{d} L{L}", elements=elements,
                past_2_31=elements > 2**31, seconds=round(seconds, 3), max_abs_diff_last_channels=err)


def part_mqar(shapes: Shapes, device, rehearsal: bool, out_dir: Path = RESULTS) -> dict:
    """The headline MQAR cells of configs/mqar/gpu-minutes.yaml (the paper's protocol shrunk: default vs both
    polarized, exact and reference zero channel, 4 layers), one after another while the budget lasts."""
    from eval.mqar import load_mqar_config, train_cell

    config = ROOT / "configs" / "mqar" / "gpu-minutes.yaml"
    if not config.is_file():
        return dict(status="skipped", note=f"{config.relative_to(ROOT)} is not in this checkout")
    overrides = {"run.out_dir": str(out_dir / "mqar"), **(MQAR_REHEARSAL if rehearsal else {})}
    cfg = load_mqar_config(config, overrides)
    budget = min(MQAR_BUDGET_S, BUDGET_S - 60 - (time.perf_counter() - START))
    t0, rows, left = time.perf_counter(), [], []
    for variant in cfg.sweep.variants:
        for n_layer in cfg.sweep.n_layers:
            if time.perf_counter() - t0 > budget:
                left.append(f"{variant}-L{n_layer}")
                continue
            r = train_cell(cfg, variant, n_layer, force=True)
            rows.append(dict(cell=f"{variant}-L{n_layer}", average=round(100 * r["accuracy"]["average"], 2),
                             epochs=r.get("epochs"), seconds=r["train_seconds"], tokens_per_s=r["tokens_per_second"]))
    note = f"not run (budget of {budget:.0f} s spent): {', '.join(left)}" if left else ""
    return dict(status="ok", rows=rows, note=note, seconds=round(time.perf_counter() - t0, 1))


def markdown(report: dict) -> str:
    lines = [f"# GPU check: {report['device']}", "",
             f"torch {report['torch']}, triton {report['triton']}, {report['seconds']:.0f} s in all"
             + (" (CPU rehearsal: tiny shapes, not figures)" if report["rehearsal"] else ""), ""]
    for name, part in report["parts"].items():
        lines.append(f"## {name}: {part['status']}")
        if part.get("note"):
            lines.append(f"\n{part['note']}")
        if part["status"] == "error":
            lines.append(f"\n```\n{part['error']}\n```")
        if name == "tests" and "summary" in part:
            lines += ["", f"`{part['summary']}` ({part['seconds']} s)", *[f"- {f}" for f in part["failures"]]]
        if name == "scan" and part["status"] == "ok":
            lines += ["", "| shape | variant | pass | ms | GB/s (ideal bytes) | % HBM peak | BLOCK_D, CHUNK, warps |",
                      "|---|---|---|---:|---:|---:|---|"]
            lines += [f"| {r['shape']} | {r['variant']} | {r['pass_']} | {r['ms']} | {r['gbps']} | "
                      f"{r['pct_peak'] if r['pct_peak'] is not None else '—'} | {r['config']} |" for r in part["rows"]]
        if name == "train" and part["status"] == "ok":
            lines += ["", f"{part['preset']} ({part['params']:,} params), batch {part['batch']} × {part['seq']}: "
                      f"{part['step_ms']} ms/step, {part['tokens_per_s']:,} tokens/s, {part['tflops']} TFLOP/s, "
                      f"MFU {part['mfu'] if part['mfu'] is not None else '—'} (peak {part['peak_tflops']})", "",
                      "| top kernel | ms | calls |", "|---|---:|---:|"]
            lines += [f"| `{k['kernel']}` | {k['ms']} | {k['calls']} |" for k in part["top_kernels"]]
        if name == "mqar" and part["status"] == "ok":
            lines += ["", "| cell | average accuracy % | epochs | s | tokens/s |", "|---|---:|---:|---:|---:|"]
            lines += [f"| {r['cell']} | {r['average']} | {r['epochs']} | {r['seconds']} | {r['tokens_per_s']:,} |"
                      for r in part["rows"]]
        if name == "niah" and part["status"] == "ok":
            lines += ["", "| tokens | chunk | s | tokens/s |", "|---:|---:|---:|---:|"]
            lines += [f"| {r['tokens']} | {r['chunk']} | {r['seconds']} | {r['tokens_per_s']:,} |"
                      for r in part["rows"]]
        if name == "probe" and "shape" in part:
            lines += ["", f"{part['shape']} = {part['elements']:,} elements (past 2^31: {part['past_2_31']}), "
                      f"{part['seconds']} s; max |Δ| of the last 16 channels vs the same scan on them alone: "
                      f"{part['max_abs_diff_last_channels']}"]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--cpu-rehearsal", action="store_true", help="tiny shapes on CPU (Triton interpreter)")
    p.add_argument("--skip", default="", help=f"comma-separated parts to skip, of {','.join(PARTS)}")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    if unknown := skip - set(PARTS):
        p.error(f"--skip: unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    if args.cpu_rehearsal:
        os.environ["TRITON_INTERPRET"] = "1"
        device, shapes = torch.device("cpu"), REHEARSAL
    elif not torch.cuda.is_available():
        p.error("no CUDA device here: run on a GPU machine, or pass --cpu-rehearsal")
    else:
        device, shapes = torch.device("cuda"), Shapes()
    import triton

    t0 = START
    report = dict(device=device_name(device), rehearsal=args.cpu_rehearsal, torch=torch.__version__,
                  triton=triton.__version__, parts={})
    parts = dict(scan=part_scan, train=part_train, niah=part_niah, probe=part_probe,
                 mqar=functools.partial(part_mqar, out_dir=args.out_dir), tests=part_tests)
    for name, fn in parts.items():
        if name in skip:
            report["parts"][name] = dict(status="skipped", note="--skip")
            continue
        t = time.perf_counter()
        print(f"[gpu-check] {name} ...", flush=True)
        try:
            report["parts"][name] = fn(shapes, device, args.cpu_rehearsal)
        except Exception:  # one part failing must not lose the others' figures
            report["parts"][name] = dict(status="error", error=traceback.format_exc()[-1500:])
        report["parts"][name]["part_seconds"] = round(time.perf_counter() - t, 1)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["seconds"] = time.perf_counter() - t0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = markdown(report)
    (args.out_dir / "gpu_check.md").write_text(text + "\n")
    print(text)
    bad = [n for n, part in report["parts"].items() if part["status"] in ("error", "failed")]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
