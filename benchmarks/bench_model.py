"""CPU throughput and peak memory: polar-mamba's MambaLM vs transformers' MambaForCausalLM, our Mamba2LM vs
transformers' Mamba2ForCausalLM, and our scans.

What it measures (fp32, torch's default thread count, the config of the issue: d_model 256, 4 layers,
vocab 4096, batch 4, seq 512):

* Models: forward without grad and forward+backward (cross-entropy on the logits) of our ``MambaLM``
  (baseline and polarized with 1 ones + 1 zeros channel) and of transformers' ``MambaForCausalLM``
  (without mamba_ssm it runs its PyTorch per-token loop) loaded from our ``save_pretrained`` export, so
  both hold identical weights. Times are medians after warm-up; tokens/s = batch * seq / time; peak
  memory is the rise of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs) over its RSS
  once the model and inputs exist. Every measurement runs in a fresh subprocess so peaks don't mix.
* Speedups of ours over transformers (same variant) against the issue's goals: forward+backward >= 50x,
  forward >= 2x.
* Mamba-2 (docs/mamba2.md): our ``Mamba2LM`` (baseline, N 64, heads of 64) against transformers'
  ``Mamba2ForCausalLM`` from the same export (without mamba_ssm its PyTorch chunked SSD), time and peak
  memory as ratios (transformers / ours); no goal: both run the chunked algorithm.
* Scans: ``kernels.scan_ref.selective_scan_chunked`` vs the ``selective_scan_sequential`` oracle on that
  config's scan shapes (batch 4, d_inner 512, seq 512, N 16, and 1 + 16 + 1 polarized), fwd and fwd+bwd.

Prints markdown tables and writes benchmarks/results/bench_model.{json,md} (``--quick``: *_quick.*).
Run: HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python benchmarks/bench_model.py [--quick] [--variants mamba2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # so `models` and `kernels` import without PYTHONPATH
RESULTS = ROOT / "benchmarks" / "results"
ISSUE_HF_SECONDS = {"fwd": 0.86, "fwdbwd": 120.0}  # transformers' fallback, measured in the issue
GOALS = {"fwd": 2.0, "fwdbwd": 50.0}  # required speedup of ours over transformers
VARIANTS = {  # name -> (preset, overrides); d_model, n_layer and vocab come from the command line
    "baseline": ("mamba-tiny", {}),
    "polar": ("mamba-tiny", {"polarize.ones": 1, "polarize.zeros": 1}),
    "mamba2": ("mamba2-tiny", {"ssm.d_state": 64, "ssm.head_dim": 64, "ssm.chunk_size": 256}),
}
GOAL_VARIANTS = ("baseline", "polar")  # the speedup goals are Mamba-1's (transformers' per-token loop)


# Measurement (runs inside a worker subprocess) ---------------------------------------------------
def _status_kib(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _timed(fn, warmup: int, repeat: int) -> dict:
    """Median seconds of ``fn`` and the peak RSS rise (MiB) over the RSS before the first call."""
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _status_kib("VmRSS")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(times), "times": times, "peak_mib": (_status_kib("VmHWM") - base) / 1024}


def _model_fn(spec: dict):
    """The call to time for a model row: forward (no grad) or forward + CE loss + backward."""
    from models.hf import from_pretrained

    if spec["impl"] == "ours":
        model = from_pretrained(spec["dir"])
    else:
        from transformers import AutoModelForCausalLM  # MambaForCausalLM or Mamba2ForCausalLM, from config.json

        model = AutoModelForCausalLM.from_pretrained(spec["dir"], dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec["vocab"], (spec["batch"], spec["seq"] + 1), generator=g)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    logits = lambda: model(input_ids=inputs, use_cache=False).logits if spec["impl"] == "hf" else model(inputs).logits

    if spec["mode"] == "fwd":
        model.eval()

        def fn():
            with torch.no_grad():
                logits()
    else:
        model.train()

        def fn():
            model.zero_grad(set_to_none=True)
            F.cross_entropy(logits().float().flatten(0, 1), labels.flatten()).backward()
    return fn


def _scan_fn(spec: dict):
    """The call to time for a scan row, on random inputs of the model's scan shapes."""
    from kernels import scan_ref

    scan = getattr(scan_ref, f"selective_scan_{spec['impl']}")
    b, d, L, N, k = spec["batch"], spec["d_inner"], spec["seq"], spec["d_state"], spec["polar"]
    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=g)
    args = dict(
        u=rnd(b, d, L), delta=0.5 * rnd(b, d, L), A=-torch.arange(1.0, N + 1).repeat(d, 1),
        B=rnd(b, N + 2 * k, L), C=rnd(b, N + 2 * k, L), D=torch.ones(d), z=rnd(b, d, L),
    )
    kw = dict(delta_bias=torch.full((d,), -4.0), delta_softplus=True, n_ones=k, n_zeros=k)
    if spec["mode"] == "fwd":
        def fn():
            with torch.no_grad():
                scan(**args, **kw)
    else:
        for t in args.values():
            t.requires_grad_(True)
        gy = rnd(b, d, L)

        def fn():
            scan(**args, **kw).backward(gy)
    return fn


def worker(spec: dict) -> dict:
    fn = _scan_fn(spec) if spec["kind"] == "scan" else _model_fn(spec)
    return _timed(fn, spec["warmup"], spec["repeat"])


def run_worker(spec: dict) -> dict:
    """Run one measurement in a fresh interpreter; its last stdout line is the JSON result."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                          text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"worker {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Orchestration -------------------------------------------------------------------------------------
def machine_info() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    import transformers

    return {
        "cpu": model.group(1) if model else platform.processor(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg()[0],  # other work on the machine skews the timings
    }


def export_models(args, tmp: Path) -> dict[str, dict]:
    """Build each variant once (seeded), save_pretrained it, and check both libraries agree on it."""
    from transformers import AutoModelForCausalLM

    from models.build import build_model
    from models.config import ModelConfig
    from models.hf import save_pretrained

    out = {}
    for name, (preset, overrides) in VARIANTS.items():
        torch.manual_seed(0)
        cfg = ModelConfig.preset(preset, d_model=args.d_model, n_layer=args.n_layer, vocab_size=args.vocab,
                                 **overrides)
        ours = build_model(cfg).eval()
        folder = save_pretrained(ours, tmp / name)
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        ids = torch.randint(0, args.vocab, (1, 64))
        with torch.no_grad():
            diff = (ours(ids).logits - hf(input_ids=ids, use_cache=False).logits).abs().max().item()
        out[name] = {"dir": str(folder), "d_inner": cfg.d_inner, "d_state": cfg.ssm.d_state,
                     "params": ours.num_parameters(), "max_abs_logit_diff": diff}
    return out


def bench_models(args, exports: dict) -> list[dict]:
    rows = []
    hf_variants = ["baseline", "mamba2"] + (["polar"] if args.hf_polar else [])
    plan = [("ours", v) for v in args.variants] + [("hf", v) for v in hf_variants if v in args.variants]
    for impl, variant in plan:
        row = {"impl": impl, "variant": variant}
        for mode in ("fwd", "fwdbwd"):
            slow = impl == "hf" and mode == "fwdbwd" and variant in GOAL_VARIANTS
            spec = {"kind": "model", "impl": impl, "mode": mode, "dir": exports[variant]["dir"], "vocab": args.vocab,
                    "batch": args.batch, "seq": args.seq,
                    "warmup": args.hf_warmup if slow else args.warmup,
                    "repeat": args.hf_repeat if slow else args.repeat}
            print(f"  {impl:4s} {variant:8s} {mode:6s} ...", end=" ", flush=True)
            row[mode] = run_worker(spec)
            print(f"{row[mode]['seconds']:.3f} s, peak +{row[mode]['peak_mib']:.0f} MiB", flush=True)
        rows.append(row)
    for row in rows:
        ref = next((r for r in rows if r["impl"] == "hf" and r["variant"] == row["variant"]), None)
        ref = ref or next(r for r in rows if r["impl"] == "hf")  # hf/baseline (listed first)
        row["vs"] = f"hf/{ref['variant']}"
        for mode in ("fwd", "fwdbwd"):
            row[mode]["tokens_per_s"] = args.batch * args.seq / row[mode]["seconds"]
            row[mode]["speedup"] = ref[mode]["seconds"] / row[mode]["seconds"]
            row[mode]["memory_ratio"] = ref[mode]["peak_mib"] / max(row[mode]["peak_mib"], 1e-9)
            if _issue_config(args):
                row[mode]["speedup_vs_issue"] = ISSUE_HF_SECONDS[mode] / row[mode]["seconds"]
        goal_row = row["impl"] == "ours" and row["variant"] in GOAL_VARIANTS
        row["meets_goals"] = all(row[m]["speedup"] >= GOALS[m] for m in GOALS) if goal_row else None
    return rows


def bench_scans(args, exports: dict) -> list[dict]:
    rows = []
    for variant, polar in (("baseline", 0), ("polar", 1)):
        if variant not in args.variants:
            continue
        row = {"variant": variant}
        for impl in ("chunked", "sequential"):
            for mode in ("fwd", "fwdbwd"):
                slow = impl == "sequential"
                spec = {"kind": "scan", "impl": impl, "mode": mode, "batch": args.batch, "seq": args.seq,
                        "d_inner": exports[variant]["d_inner"], "d_state": exports[variant]["d_state"],
                        "polar": polar, "warmup": 1 if args.warmup else 0,
                        "repeat": args.scan_slow_repeat if slow else args.repeat}
                print(f"  scan {variant:8s} {impl:10s} {mode:6s} ...", end=" ", flush=True)
                row[f"{impl}_{mode}"] = run_worker(spec)
                print(f"{row[f'{impl}_{mode}']['seconds']:.3f} s", flush=True)
        for mode in ("fwd", "fwdbwd"):
            row[f"speedup_{mode}"] = row[f"sequential_{mode}"]["seconds"] / row[f"chunked_{mode}"]["seconds"]
        rows.append(row)
    return rows


# Reporting -----------------------------------------------------------------------------------------
def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _issue_config(args) -> bool:
    return (args.batch, args.seq, args.d_model, args.n_layer, args.vocab) == (4, 512, 256, 4, 4096)


def render(args, info: dict, exports: dict, model_rows: list[dict], scan_rows: list[dict]) -> str:
    names = {"ours": "polar-mamba MambaLM", "hf": "transformers MambaForCausalLM"}
    mrows = []
    for r in (r for r in model_rows if r["variant"] in GOAL_VARIANTS):
        f, fb = r["fwd"], r["fwdbwd"]
        ours = r["impl"] == "ours"
        mrows.append([
            f"{names[r['impl']]} ({r['variant']})",
            f"{f['seconds']:.3f}", f"{f['tokens_per_s']:,.0f}", f"{f['peak_mib']:.0f}",
            f"{fb['seconds']:.3f}", f"{fb['tokens_per_s']:,.0f}", f"{fb['peak_mib']:.0f}",
            f"{f['speedup']:.1f}x" if ours else "1x", f"{fb['speedup']:.1f}x" if ours else "1x",
            ("pass" if r["meets_goals"] else "FAIL") if ours else "-",
        ])
    srows = [[
        f"{r['variant']} (N={'1+16+1' if r['variant'] == 'polar' else '16'})",
        f"{r['chunked_fwd']['seconds']:.4f}", f"{r['sequential_fwd']['seconds']:.4f}", f"{r['speedup_fwd']:.1f}x",
        f"{r['chunked_fwdbwd']['seconds']:.4f}", f"{r['sequential_fwdbwd']['seconds']:.4f}",
        f"{r['speedup_fwdbwd']:.1f}x",
    ] for r in scan_rows]
    ours = [r for r in model_rows if r["impl"] == "ours" and r["variant"] in GOAL_VARIANTS]
    m2 = [r for r in model_rows if r["variant"] == "mamba2"]
    m2rows = [[f"{'polar-mamba Mamba2LM' if r['impl'] == 'ours' else 'transformers Mamba2ForCausalLM'}",
               *(f"{r[m][k]:.3f}" if k == "seconds" else f"{r[m][k]:.0f}" for m in ("fwd", "fwdbwd")
                 for k in ("seconds", "peak_mib")),
               *(f"{r[m][k]:.2f}x" for m in ("fwd", "fwdbwd") for k in ("speedup", "memory_ratio"))]
              for r in m2]
    issue = ", ".join(f"{r['variant']} {r['fwd'].get('speedup_vs_issue', 0):.1f}x fwd / "
                      f"{r['fwdbwd'].get('speedup_vs_issue', 0):.0f}x fwd+bwd" for r in ours)
    diffs = ", ".join(f"{k} {v['max_abs_logit_diff']:.1e}" for k, v in exports.items())
    header = [
        f"## Model throughput (CPU, fp32; d_model {args.d_model}, {args.n_layer} layers, vocab {args.vocab}, "
        f"batch {args.batch}, seq {args.seq})",
        "",
        f"{info['cpu']}, {info['cores']} cores, torch {info['torch']} with {info['torch_threads']} threads, "
        f"transformers {info['transformers']} (PyTorch fallback scan); load average before/after "
        f"{info['loadavg_start']:.1f}/{info['loadavg_end']:.1f}. Timed calls (median) / warm-ups: "
        f"{args.repeat} / {args.warmup}, transformers Mamba-1 fwd+bwd {args.hf_repeat} / {args.hf_warmup}. "
        f"Peak = rise of peak RSS during the calls, MiB. Same weights: max |logit diff| ours vs transformers "
        f"(seq 64): {diffs}.",
        "",
    ]
    mamba1 = [
        f"Speedup = transformers s / ours s (same variant when measured, else baseline); "
        f"goals: fwd >= {GOALS['fwd']:g}x, fwd+bwd >= {GOALS['fwdbwd']:g}x.",
        "",
        _table(["model", "fwd s", "fwd tok/s", "fwd peak MiB", "fwd+bwd s", "fwd+bwd tok/s", "fwd+bwd peak MiB",
                "fwd speedup", "fwd+bwd speedup", "goals"], mrows),
        "",
    ] + ([f"Vs the issue's reference (transformers {ISSUE_HF_SECONDS['fwd']} s fwd, {ISSUE_HF_SECONDS['fwdbwd']:g} s "
          f"fwd+bwd, measured at the default config): {issue}.", ""] if _issue_config(args) and ours else [])
    mamba2 = [
        f"## Mamba-2: Mamba2LM vs transformers' Mamba2ForCausalLM (same export; d_model {args.d_model}, "
        f"{args.n_layer} layers, N {exports['mamba2']['d_state']}, batch {args.batch}, seq {args.seq})",
        "",
        "Ratios are transformers / ours (time: > 1 means ours is faster; memory: > 1 means ours peaks lower).",
        "",
        _table(["model", "fwd s", "fwd peak MiB", "fwd+bwd s", "fwd+bwd peak MiB", "fwd time ratio",
                "fwd memory ratio", "fwd+bwd time ratio", "fwd+bwd memory ratio"], m2rows),
        "",
    ]
    scans = [
        f"## Selective scan: chunked vs sequential (batch {args.batch}, d_inner {exports['baseline']['d_inner']}, "
        f"seq {args.seq})",
        "",
        _table(["scan", "chunked fwd s", "sequential fwd s", "fwd speedup", "chunked fwd+bwd s",
                "sequential fwd+bwd s", "fwd+bwd speedup"], srows),
        "",
    ]
    return "\n".join(header + (mamba1 if mrows else []) + (mamba2 if m2rows else []) + (scans if srows else []))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=1, help="warm-up calls before timing (not transformers fwd+bwd)")
    p.add_argument("--repeat", type=int, default=5, help="timed calls per measurement (median reported)")
    p.add_argument("--hf-warmup", type=int, default=0, help="warm-up calls for transformers fwd+bwd (~2 min each)")
    p.add_argument("--hf-repeat", type=int, default=1, help="timed calls for transformers fwd+bwd")
    p.add_argument("--scan-slow-repeat", type=int, default=3, help="timed calls for the sequential scan")
    p.add_argument("--hf-polar", action="store_true",
                   help="also time transformers on the polarized export (another ~2 min fwd+bwd)")
    p.add_argument("--variants", type=lambda v: v.split(","), default=list(VARIANTS),
                   help=f"comma-separated model rows (default {','.join(VARIANTS)}); scans follow baseline/polar")
    p.add_argument("--quick", action="store_true", help="smoke run: seq 64, 1 timed call, no warm-up")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one measurement, JSON spec
    args = p.parse_args(argv)
    if unknown := set(args.variants) - set(VARIANTS):
        p.error(f"--variants: unknown {sorted(unknown)}; choose from {','.join(VARIANTS)}")
    if args.quick:
        args.seq, args.warmup, args.repeat, args.hf_warmup, args.hf_repeat, args.scan_slow_repeat = 64, 0, 1, 0, 1, 1
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    t0 = time.perf_counter()
    info = machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        print("exporting models ...", flush=True)
        exports = export_models(args, Path(tmp))
        print("models:", flush=True)
        model_rows = bench_models(args, exports)
        print("scans:", flush=True)
        scan_rows = bench_scans(args, exports)
    info["loadavg_end"] = os.getloadavg()[0]
    report = render(args, info, exports, model_rows, scan_rows)
    info["wall_seconds"] = time.perf_counter() - t0
    print("\n" + report + f"\nTotal benchmark wall time: {info['wall_seconds']:.0f} s")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = "bench_model_quick" if args.quick else "bench_model"
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"}
    data = {"machine": info, "settings": settings, "exports": exports, "models": model_rows, "scans": scan_rows,
            "goals": GOALS, "issue_reference_seconds": ISSUE_HF_SECONDS}
    (args.out_dir / f"{stem}.json").write_text(json.dumps(data, indent=2) + "\n")
    (args.out_dir / f"{stem}.md").write_text(report)
    print(f"wrote {args.out_dir / stem}.json and .md")


if __name__ == "__main__":
    main()
