"""Kernel benchmark: forward+backward time of each op per backend, achieved bandwidth, speedup, peak memory.

On CUDA, per op and shape (default: batch 8, d_inner 1536, seq 2048, N 16 + 1 + 1 for the scan and the conv;
the same tokens x d_model 768 for add+RMSNorm; 8192 tokens x vocab 50280 for linear+CE): the PyTorch
reference, our Triton kernels and mamba_ssm / causal_conv1d (when importable). GB/s counts the bytes an
ideal fused kernel must move (inputs read and outputs written, forward and backward) over the measured
time; % peak uses the device's HBM bandwidth from a small table (by GPU name). Linear+CE is matmul-bound:
it reports time and peak memory instead.

On CPU (no Triton, the interpreter is a test tool): the chunked PyTorch scan vs the sequential oracle,
and the chunked linear+CE vs plain ``F.cross_entropy(h @ W.T)`` (time and peak RSS rise of the first call,
via VmHWM reset through /proc/self/clear_refs after glibc's ``malloc_trim`` hands freed heap back, so
memory one measurement freed does not hide the next one's).

Prints one markdown table and writes benchmarks/results/bench_kernels.{json,md}.
Run: PYTHONPATH=. .venv/bin/python benchmarks/bench_kernels.py [--quick]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # so `kernels` imports without PYTHONPATH
RESULTS = ROOT / "benchmarks" / "results"

from kernels import conv_ref, dispatch, loss_ref, norm_ref, scan_ref  # noqa: E402

PEAK_GBPS = {  # HBM bandwidth by GPU name (vendor spec sheets), first match wins
    "H200": 4800, "H100 PCIe": 2000, "H100": 3350, "A100-SXM4-80GB": 2039, "A100": 1555,
    "L40S": 864, "L4": 300, "A10G": 600, "A10": 600, "RTX 4090": 1008, "V100": 900,
}


def peak_bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_GBPS.items() if k in name), None)


class PeakMemory:
    """Peak memory rise during the block: CUDA allocator peak, or process peak RSS (Linux) on CPU."""

    def __init__(self, device: torch.device):
        self.device, self.bytes = device, None

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap pages, so reuse shows as a rise
                Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
                self.base = self._status("VmRSS:")
            except OSError:  # not Linux/glibc: no CPU peak
                self.base = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.base
        elif self.base is not None:
            self.bytes = self._status("VmHWM:") - self.base


def timed(fn, device, warmup, repeat) -> tuple[float, int | None]:
    """Median seconds of ``fn()`` (forward + backward) and the peak memory rise of the first call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with PeakMemory(device) as mem:
        fn()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), mem.bytes


def fwd_bwd(fn, *inputs):
    """A closure running fn(*inputs) and backward through every float output."""
    def run():
        for t in inputs:
            if isinstance(t, torch.Tensor):
                t.grad = None
        outs = fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        sum(o.float().sum() for o in outs).backward()
    return run


def leaf(*shape, device, dtype, scale=1.0, shift=0.0):
    return (torch.randn(*shape, device=device) * scale + shift).to(dtype).requires_grad_()


def cases(device: torch.device, quick: bool):
    """(op, shape label, {impl: closure}, ideal bytes moved fwd+bwd or None)."""
    cuda = device.type == "cuda"
    bf16 = torch.bfloat16 if cuda else torch.float32
    if cuda:
        b, d, L, dm, T, V = (2, 768, 512, 768, 2048, 50280) if quick else (8, 1536, 2048, 768, 8192, 50280)
    else:
        b, d, L, dm, T, V = (2, 64, 64, 64, 4096, 4096) if quick else (2, 256, 256, 256, 8192, 16384)
    n1, N, n0 = 1, 16, 1
    nt = n1 + N + n0
    es = torch.finfo(bf16).bits // 8

    u, delta, z = (leaf(b, d, L, device=device, dtype=bf16, scale=s, shift=o) for s, o in ((1, 0), (0.5, -3), (1, 0)))
    Bm, Cm = leaf(b, nt, L, device=device, dtype=bf16), leaf(b, nt, L, device=device, dtype=bf16)
    A = (-torch.exp(torch.randn(d, N, device=device) * 0.5)).requires_grad_()
    D, bias = leaf(d, device=device, dtype=torch.float32), leaf(d, device=device, dtype=torch.float32)
    scan_in = (u, delta, A, Bm, Cm, D, z, bias)
    kw = dict(delta_softplus=True, n_ones=n1, n_zeros=n0)
    scan = {"torch (chunked)": fwd_bwd(lambda *a: scan_ref.selective_scan_chunked(*a, **kw), *scan_in)}
    if cuda:
        from kernels import scan_triton

        scan["triton"] = fwd_bwd(lambda *a: scan_triton.selective_scan(*a, **kw), *scan_in)
        stock = dispatch._probe(dispatch.CUDA_PACKAGES["selective_scan"])[0]
        if stock is not None:
            from kernels import scan_cuda

            stock_fn = stock.selective_scan_fn
            scan["mamba_ssm"] = fwd_bwd(lambda *a: scan_cuda.selective_scan(stock_fn, *a, **kw), *scan_in)
    else:
        scan = {"torch (sequential)": fwd_bwd(lambda *a: scan_ref.selective_scan_sequential(*a, **kw), *scan_in),
                **scan}
    # fwd reads u, Δ, z, B, C and writes y; bwd reads those + gy and writes gu, gΔ, gz, gB, gC
    yield "selective_scan", f"b{b} d{d} L{L} N{n1}+{N}+{n0} {str(bf16)[6:]}", scan, (4 + 9) * b * d * L * es \
        + (2 + 4) * b * nt * L * es

    if cuda:
        x, w, cb = leaf(b, d, L, device=device, dtype=bf16), leaf(d, 4, device=device, dtype=torch.float32), \
            leaf(d, device=device, dtype=torch.float32)
        from kernels import conv_triton

        conv = {"torch": fwd_bwd(lambda *a: conv_ref.causal_conv1d(*a), x, w, cb),
                "triton": fwd_bwd(lambda *a: conv_triton.causal_conv1d(*a), x, w, cb)}
        stock = dispatch._probe(dispatch.CUDA_PACKAGES["causal_conv1d"])[0]
        if stock is not None:
            conv["causal_conv1d"] = fwd_bwd(lambda *a: stock.causal_conv1d_fn(*a, activation="silu"), x, w, cb)
        yield "causal_conv1d", f"b{b} d{d} L{L} k4 {str(bf16)[6:]}", conv, 5 * b * d * L * es

        from kernels import norm_triton

        hx, res, nw = leaf(b * L, dm, device=device, dtype=bf16), leaf(b * L, dm, device=device, dtype=torch.float32), \
            leaf(dm, device=device, dtype=torch.float32)
        norm = {"torch": fwd_bwd(lambda *a: norm_ref.add_rmsnorm(*a, 1e-5), hx, res, nw),
                "triton": fwd_bwd(lambda *a: norm_triton.add_rmsnorm(*a, 1e-5), hx, res, nw)}
        # fwd: read x (es), residual (4), write out (4), new residual (4); bwd: read g (4), gres (4),
        # saved residual (4), write gx (es), gresidual (4)
        yield "add_rmsnorm", f"{b * L}x{dm} {str(bf16)[6:]}+fp32", norm, b * L * dm * (2 * es + 7 * 4)

    h, W = leaf(T, dm, device=device, dtype=bf16), leaf(V, dm, device=device, dtype=bf16, scale=0.02)
    labels = torch.randint(0, V, (T,), device=device)
    ce = {"torch (plain)": fwd_bwd(lambda a, b: F.cross_entropy((a @ b.T).float(), labels), h, W),
          "torch (chunked)": fwd_bwd(lambda a, b: loss_ref.linear_cross_entropy(a, b, labels), h, W)}
    if cuda:
        from kernels import loss_triton

        ce["triton (chunked)"] = fwd_bwd(lambda a, b: loss_triton.linear_cross_entropy(a, b, labels), h, W)
    yield "linear_cross_entropy", f"T{T} d{dm} V{V} {str(bf16)[6:]}", ce, None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small shapes, 1 warm-up, 2 timed calls")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5, help="timed calls per measurement (median reported)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    warmup, repeat = (1, 2) if args.quick else (args.warmup, args.repeat)
    torch.manual_seed(0)
    peak = peak_bandwidth(device)
    rows = []
    for op, shape, impls, nbytes in cases(device, args.quick):
        base = None
        for impl, fn in impls.items():
            seconds, mem = timed(fn, device, warmup, repeat)
            base = base or seconds  # the first impl of each op is the baseline
            gbps = nbytes / seconds / 1e9 if nbytes else None
            rows.append(dict(op=op, shape=shape, impl=impl, ms=seconds * 1e3, gbps=gbps,
                             pct_peak=100 * gbps / peak if gbps and peak else None,
                             speedup=base / seconds, peak_mem_mib=None if mem is None else mem / 2**20))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or 'cpu'}, " \
        f"{torch.get_num_threads()} threads)"
    fmt = lambda v, spec: "—" if v is None else format(v, spec)
    lines = [f"Kernels, forward+backward, {name}{' (--quick)' if args.quick else ''}; speedup vs the first row of "
             "each op", "",
             "| op | shape | impl | ms | GB/s | % peak | speedup | peak mem MiB |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['op']} | {r['shape']} | {r['impl']} | {r['ms']:.2f} | {fmt(r['gbps'], '.1f')} | "
              f"{fmt(r['pct_peak'], '.0f')} | {r['speedup']:.2f}x | {fmt(r['peak_mem_mib'], '.0f')} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(device=name, quick=args.quick, torch=torch.__version__, peak_gbps=peak, warmup=warmup, repeat=repeat)
    (args.out_dir / "bench_kernels.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    (args.out_dir / "bench_kernels.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
