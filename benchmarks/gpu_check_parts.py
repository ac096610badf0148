"""What the prepared device run measures: one function per part, each ``part_<name>(ctx) -> result dict``.

benchmarks/gpu_check.py runs every part in its own process under its own time budget; a part with several
rows calls ``ctx.emit(result)`` after each, so a part stopped at its budget still returns what it measured.
A result is ``status`` (default ok), optional ``summary``/``note`` lines, ``rows`` (one markdown table) and
``known`` (figures later parts use: the copy bandwidth); anything else goes to the JSON only.

Kernel times come from ``triton.testing.do_bench`` on CUDA (CUDA events, warm-up, the L2 cache flushed before
every repetition, median); on CPU (``--cpu-rehearsal``: tiny shapes, kernels in the Triton interpreter) a
perf_counter median. Bandwidth rows count two byte totals: the ideal (each input of the op read once, each
output written once) and the bytes the launches move (benchmarks/byte_model.py: saved states, fp32 buffers),
each as % of the copy bandwidth measured in the same run (``bandwidth``) and % of the spec sheet.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # `kernels`, `models`, and the benchmarks' own modules

from bench_kernels import peak_bandwidth  # noqa: E402
from byte_model import kernel_name, launch_bytes, scan_ideal_bytes  # noqa: E402

PEAK_TFLOPS_BF16 = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "L4": 121}  # dense, spec sheets
# Goals the device run decides (benchmarks/RESULTS.md states them)
GOALS = dict(scan_train_pct_copy=50, scan_infer_pct_copy=80, mfu=0.25)
# The rehearsal's MQAR: the same protocol and code path at a size the interpreter-free CPU runs in seconds.
MQAR_REHEARSAL = {"model.d_model": 32, "model.vocab_size": 64, "data.vocab_size": 64,
                  "data.train": [{"seq_len": 32, "num_kv_pairs": 4, "num_examples": 64}],
                  "data.eval": [{"seq_len": 32, "num_kv_pairs": 4, "num_examples": 16}],
                  "data.batch_size": 16, "data.eval_batch_size": 16, "sweep.n_layers": [1]}


@dataclass(frozen=True)
class Shapes:
    """Every size the check uses (mamba-130m's); the rehearsal shrinks them all."""

    scan_batches: tuple = (8, 1)
    d_inner: int = 1536
    seq: int = 2048
    n_state: int = 16
    d_model: int = 768
    vocab: int = 50280
    ssd: tuple = (24, 64, 128, 256)  # Mamba-2 130m: heads, head_dim, N, chunk
    preset: str = "mamba-130m-polar"
    train_batch: int = 8
    train_seq: int = 2048
    niah_lengths: tuple = (32768, 131072)
    niah_chunk: int = 32768
    probe: tuple = (1, 4112, 2**19)  # b·d·L = 2.156e9, just past 2^31 (~22 GB in bf16)
    copy_mib: int = 2048
    repeat: int = 1  # CPU only: timed calls per figure (CUDA: do_bench's own count)
    sweep: tuple = ((16, 64, 8), (16, 32, 4), (8, 64, 8), (32, 32, 8))  # (BLOCK_D, CHUNK, warps), both passes


REHEARSAL = Shapes(scan_batches=(1,), d_inner=16, seq=37, n_state=4, d_model=32, vocab=64, ssd=(2, 8, 8, 16),
                   preset="mamba-tiny-polar", train_batch=2, train_seq=32, niah_lengths=(64, 96), niah_chunk=48,
                   probe=(1, 32, 40), copy_mib=16, sweep=((8, 16, 4),))


def shapes_for(ctx) -> Shapes:
    return REHEARSAL if ctx.rehearsal else Shapes()


def device_name(ctx) -> str:
    return torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu (rehearsal)"


def compute_dtype(ctx) -> torch.dtype:
    return torch.bfloat16 if ctx.device.type == "cuda" else torch.float32


def bench_ms(fn, ctx, grad_to_none=None) -> float:
    """Median ms of ``fn()``: do_bench on CUDA (warm-up, L2 flushed before each call); CPU: perf_counter."""
    if ctx.device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")
    times = []
    for _ in range(shapes_for(ctx).repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def launched_bytes(fn) -> dict[str, int]:
    """Bytes per Triton kernel that ``fn()`` launches (recorded, not run: benchmarks/byte_model.py)."""
    from kernels.triton_jit import capture

    with capture() as launches:
        fn()
    totals: dict[str, int] = {}
    for kernel, _, args, kwargs in launches:
        totals[kernel_name(kernel)] = totals.get(kernel_name(kernel), 0) + sum(launch_bytes(kernel, args,
                                                                                            kwargs).values())
    return totals


def forward_bytes(totals: dict[str, int]) -> int | None:
    """The scan forward's bytes: the forward kernel plus, when L is split (batch × channel blocks too few for the
    SMs), its state-passing pass."""
    if "scan_fwd_kernel" not in totals:
        return None
    return totals["scan_fwd_kernel"] + totals.get("scan_seg_kernel", 0)


def backward_bytes(totals: dict[str, int]) -> int | None:
    """The scan backward's bytes: the backward kernel plus, when L is split, its state-passing pass."""
    if "scan_bwd_kernel" not in totals:
        return None
    return totals["scan_bwd_kernel"] + totals.get("scan_adj_kernel", 0)


def bandwidth_columns(ctx, ms: float, ideal: int, moved: int | None) -> dict:
    """GB/s of the ideal and the moved bytes, as % of the copy bandwidth measured in this run and of the spec."""
    copy, spec = ctx.known.get("copy_gbps"), ctx.known.get("spec_gbps")
    pct = lambda gbps, peak: sig(100 * gbps / peak, 3) if gbps and peak else None
    ideal_gbps = ideal / ms / 1e6
    moved_gbps = moved / ms / 1e6 if moved else None
    return {"ideal MB": sig(ideal / 1e6), "moved MB": sig(moved / 1e6) if moved else None,
            "GB/s ideal": sig(ideal_gbps), "% copy ideal": pct(ideal_gbps, copy),
            "GB/s moved": sig(moved_gbps) if moved_gbps else None, "% copy moved": pct(moved_gbps, copy),
            "% spec moved": pct(moved_gbps, spec)}


def sig(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant figures (the rehearsal's sizes are kilobytes, the device's gigabytes)."""
    return float(f"{x:.{digits}g}")


def part_bandwidth(ctx) -> dict:
    """The device's own device-to-device copy bandwidth (read + write bytes / time), beside the spec sheet's."""
    n = shapes_for(ctx).copy_mib * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=ctx.device).random_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), ctx)
    gbps = 2 * n / ms / 1e6
    spec, name = peak_bandwidth(ctx.device), device_name(ctx)
    return dict(summary=f"{name}: copy of {n / 2**20:.0f} MiB: {gbps:.0f} GB/s"
                        + (f" = {100 * gbps / spec:.1f}% of the {spec} GB/s spec" if spec else " (no spec known)"),
                known=dict(copy_gbps=round(gbps, 1), spec_gbps=spec, device=name))


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


def part_scan(ctx) -> dict:
    """Our Triton scan at mamba-130m's shapes: inference forward (no saved states), training forward (saves
    the fp32 state every 256 steps) and backward, each timed alone; then the PyTorch reference and a few
    (BLOCK_D, CHUNK, warps) alternatives to the shipped table, batch 8 polarized, and the polarized scan resetting
    at packed documents of L/8 tokens (``data.document_boundaries: reset``). Beside the shipped polarized rows, the
    not-default one-3-D-tile inference forward (``tile="3d"``, pass "inference fwd, 3-D tile", with its largest
    difference from the shipped forward's y); an error in it is a row, not a failed part."""
    from kernels import scan_ref, scan_triton

    shapes, dtype = shapes_for(ctx), compute_dtype(ctx)
    d, L, N = shapes.d_inner, shapes.seq, shapes.n_state
    result = dict(dtype=str(dtype), rows=[])

    def measure(b, n1, n0, variant, config=None, impl=scan_triton.selective_scan, resets=False):
        leaves = [t.requires_grad_() for t in mixer_inputs(b, d, L, N, n1, n0, dtype, ctx.device)]
        kw = dict(delta_softplus=True, n_ones=n1, n_zeros=n0)
        if resets:  # documents of L/8 tokens, the window starting mid-document
            kw["seq_idx"] = (torch.arange(L, device=ctx.device, dtype=torch.int32) // max(L // 8, 1)).repeat(b, 1)
        saved = dict(scan_triton.CONFIGS)
        if config is not None:
            scan_triton.CONFIGS.update(dict.fromkeys(saved, config))
        try:
            fwd = lambda: impl(*leaves, **kw)
            y = fwd()
            gy = torch.randn_like(y)
            bwd = lambda: torch.autograd.grad(y, leaves, gy, retain_graph=True)
            with torch.no_grad():
                infer_ms = bench_ms(fwd, ctx)
                infer_bytes = forward_bytes(launched_bytes(fwd))
            times = dict(infer=infer_ms, train=bench_ms(fwd, ctx), bwd=bench_ms(bwd, ctx))
            moved = launched_bytes(lambda: torch.autograd.grad(fwd(), leaves, gy))
        finally:
            scan_triton.CONFIGS.update(saved)
        fwd_ideal, bwd_ideal = scan_ideal_bytes(b, d, L, n1 + N + n0, torch.finfo(dtype).bits // 8)
        cfg = lambda kind: "" if impl is not scan_triton.selective_scan else ",".join(
            map(str, config or scan_triton.config(kind, dtype, d, None)))
        passes = (("inference fwd", times["infer"], fwd_ideal, infer_bytes, cfg("fwd")),
                  ("training fwd", times["train"], fwd_ideal, forward_bytes(moved), cfg("train")),
                  ("bwd", times["bwd"], bwd_ideal, backward_bytes(moved), cfg("bwd")),
                  ("training fwd+bwd", times["train"] + times["bwd"], fwd_ideal + bwd_ideal,
                   sum(moved.values()) or None, ""))
        for name, ms, ideal, nbytes, config_text in passes:
            result["rows"].append({"shape": f"b{b} d{d} L{L}", "variant": variant, "pass": name,
                                   "ms": sig(ms), **bandwidth_columns(ctx, ms, ideal, nbytes),
                                   "BLOCK_D,CHUNK,warps": config_text})
        ctx.emit(result)

    def measure_tile3d(b, n1, n0, variant):
        row = {"shape": f"b{b} d{d} L{L}", "variant": variant, "pass": "inference fwd, 3-D tile"}
        try:
            args = mixer_inputs(b, d, L, N, n1, n0, dtype, ctx.device)
            kw = dict(delta_softplus=True, n_ones=n1, n_zeros=n0)
            fwd = lambda: scan_triton.selective_scan(*args, tile="3d", **kw)
            with torch.no_grad():
                diff = (fwd().float() - scan_triton.selective_scan(*args, tile="2d", **kw).float()).abs().max()
                ms = bench_ms(fwd, ctx)
                nbytes = forward_bytes(launched_bytes(fwd))
            ideal = scan_ideal_bytes(b, d, L, n1 + N + n0, torch.finfo(dtype).bits // 8)[0]
            row.update(ms=sig(ms), **bandwidth_columns(ctx, ms, ideal, nbytes),
                       **{"BLOCK_D,CHUNK,warps": ",".join(map(str, scan_triton.config("fwd3d", dtype, d, None))),
                          "max abs diff vs shipped y": sig(diff.item())})
        except Exception as e:  # the variant must not end the part
            row["pass"] = f"inference fwd, 3-D tile: error: {type(e).__name__}: " \
                          f"{str(e).splitlines()[0][:200] if str(e) else ''}"
        result["rows"].append(row)
        ctx.emit(result)

    for b in shapes.scan_batches:
        measure(b, 0, 0, f"baseline N{N}")
        measure(b, 1, 1, f"polar 1+{N}+1")
        measure_tile3d(b, 1, 1, f"polar 1+{N}+1")
    result["summary"] = goal_line(result["rows"])  # the shipped configuration's rows
    measure(shapes.scan_batches[-1], 1, 1, f"polar 1+{N}+1, document resets", resets=True)
    measure(shapes.scan_batches[0], 1, 1, "polar, PyTorch reference", impl=scan_ref.selective_scan_chunked)
    for config in shapes.sweep:
        try:
            measure(shapes.scan_batches[0], 1, 1, f"polar, sweep {config}", tuple(config))
        except Exception as e:  # a sweep config that does not compile or fit must not end the part
            result["rows"].append({"variant": f"polar, sweep {config}", "pass": f"error: {type(e).__name__}: "
                                   f"{str(e).splitlines()[0][:200] if str(e) else ''}"})
            ctx.emit(result)
    return result


def goal_line(rows) -> str:
    """The scan goals against the shipped configuration's rows (ideal bytes over time, % of the copy bandwidth)."""
    worst = lambda name: min((r["% copy ideal"] for r in rows if r["pass"] == name and r["% copy ideal"] is not None),
                             default=None)
    train, infer = worst("training fwd+bwd"), worst("inference fwd")
    mark = lambda v, goal: "—" if v is None else f"{v}% {'✅' if v >= goal else '❌'}"
    return (f"Goals (ideal bytes, lowest shipped row): training fwd+bwd ≥ {GOALS['scan_train_pct_copy']}% of copy: "
            f"{mark(train, GOALS['scan_train_pct_copy'])}; inference fwd ≥ {GOALS['scan_infer_pct_copy']}%: "
            f"{mark(infer, GOALS['scan_infer_pct_copy'])}")


def _op_cases(ctx, peers: dict):
    """(op, shape, {impl: (forward closure, leaves)}) for conv, add+RMSNorm and linear+CE at the model's shapes,
    each impl on the same tensors in the layout our model uses."""
    from kernels import conv_ref, conv_triton, loss_ref, loss_triton, norm_ref, norm_triton

    s, dtype, dev = shapes_for(ctx), compute_dtype(ctx), ctx.device
    b, d, L = s.scan_batches[0], s.d_inner, s.seq
    x = torch.randn(b, L, d, device=dev, dtype=dtype, requires_grad=True)  # (b, L, d): the conv's input buffer
    w = torch.randn(d, 4, device=dev, dtype=dtype, requires_grad=True)
    cb = torch.randn(d, device=dev, dtype=dtype, requires_grad=True)
    conv = {"ours": lambda: conv_triton.causal_conv1d(x.transpose(1, 2), w, cb, "silu"),
            "torch": lambda: conv_ref.causal_conv1d(x.transpose(1, 2), w, cb, "silu")}
    if "fla_conv" in peers:
        conv["fla"] = lambda: peers["fla_conv"](x, w, cb, activation="silu")[0]
    yield "causal_conv1d", f"b{b} d{d} L{L} k4", conv, (x, w, cb)

    T, dm = b * L, s.d_model
    h = torch.randn(T, dm, device=dev, dtype=dtype, requires_grad=True)
    res = torch.randn(T, dm, device=dev, dtype=torch.float32, requires_grad=True)
    nw = torch.ones(dm, device=dev, dtype=dtype, requires_grad=True)
    norm = {"ours": lambda: norm_triton.add_rmsnorm(h, res, nw, 1e-5),
            "torch": lambda: norm_ref.add_rmsnorm(h, res, nw, 1e-5)}
    if "fla_rms_norm" in peers:
        norm["fla"] = lambda: peers["fla_rms_norm"](h, nw, None, residual=res, eps=1e-5, prenorm=True,
                                                    residual_in_fp32=True)
    yield "add_rmsnorm", f"{T}x{dm} + fp32 residual", norm, (h, res, nw)

    W = (torch.randn(s.vocab, dm, device=dev, dtype=dtype) * 0.02).requires_grad_()
    labels = torch.randint(0, s.vocab, (T,), device=dev)
    ce = {"ours": lambda: loss_triton.linear_cross_entropy(h, W, labels),
          "torch": lambda: loss_ref.linear_cross_entropy(h, W, labels)}
    if "fla_linear_ce" in peers:
        ce["fla"] = lambda: peers["fla_linear_ce"](h, labels, W)
    yield "linear_cross_entropy", f"T{T} d{dm} V{s.vocab}", ce, (h, W)


def _outputs(fn) -> list:
    """``fn()``'s tensor outputs as a list (impls return a tensor or a tuple with Nones)."""
    outs = fn()
    return [o for o in (outs if isinstance(outs, tuple) else (outs,)) if o is not None]


def _time_impls(ctx, impls: dict, leaves) -> dict:
    """{impl: {"fwd": ms, "fwd+bwd": ms}} (or the error text); fwd under no_grad, fwd+bwd with fixed output grads."""
    times = {}
    for impl, fn in impls.items():
        try:
            with torch.no_grad():
                fwd = bench_ms(fn, ctx)
            grads = [torch.randn_like(o) for o in _outputs(fn)]

            def train(fn=fn, grads=grads):
                torch.autograd.backward(_outputs(fn), grads)

            times[impl] = {"fwd": fwd, "fwd+bwd": bench_ms(train, ctx, grad_to_none=list(leaves))}
        except Exception as e:  # one impl failing (a peer on CPU has no driver) keeps the others
            times[impl] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return times


def _ratio_rows(op: str, shape: str, times: dict, peer: str) -> list[dict]:
    """One row per pass: each impl's ms and ours ÷ each other impl (< 1: ours is faster)."""
    rows = []
    for kind in ("fwd", "fwd+bwd"):
        ms = {impl: t[kind] for impl, t in times.items() if isinstance(t, dict)}
        row = {"op": op, "shape": shape, "pass": kind}
        for impl in times:
            row[f"{impl} ms"] = sig(ms[impl]) if impl in ms else None
        for impl in (peer, "torch"):
            if "ours" in ms and impl in ms:
                row[f"ours/{impl}"] = round(ms["ours"] / ms[impl], 3)
        rows.append(row)
    return rows


def part_peers(ctx) -> dict:
    """Conv, add+RMSNorm and linear+CE: ours vs fla-core 0.6.0 (carried, benchmarks/peers.py) vs PyTorch, same
    shapes, dtype and process."""
    import peers

    functions, errors = peers.load(ctx.peers, only="fla")
    result = dict(rows=[], note="; ".join(f"{k}: {v}" for k, v in errors.items()), loaded=sorted(functions))
    failures = []
    for op, shape, impls, leaves in _op_cases(ctx, functions):
        times = _time_impls(ctx, impls, leaves)
        failures += [f"{op} {impl}: {t}" for impl, t in times.items() if isinstance(t, str)]
        result["rows"] += _ratio_rows(op, shape, times, "fla")
        result["failures"] = failures
        ctx.emit(result)
    if failures:
        result["note"] = "; ".join(filter(None, [result["note"], *failures]))
    if failures and not ctx.rehearsal:  # on CPU the peers' kernels need a GPU driver: their failure is expected
        result["status"] = "failed"
    return result


def part_ssd(ctx) -> dict:
    """Mamba-2's SSD at the mamba2-130m shape: our path without mamba_ssm (chunked PyTorch, kernels.ssd_ref) vs
    mamba_ssm 2.3.2.post1's Triton ``mamba_chunk_scan_combined`` (carried; its CUDA extension never imported)."""
    import peers

    from kernels import ssd_ref

    functions, errors = peers.load(ctx.peers, only="mamba_ssm")
    s, dtype, dev = shapes_for(ctx), compute_dtype(ctx), ctx.device
    (h, p, n, chunk), b, L = s.ssd, s.scan_batches[0], s.seq
    x = torch.randn(b, L, h, p, device=dev, dtype=dtype, requires_grad=True)
    dt = torch.randn(b, L, h, device=dev, dtype=dtype, requires_grad=True)
    A = (-torch.exp(torch.randn(h, device=dev))).requires_grad_()
    B, C = (torch.randn(b, L, 1, n, device=dev, dtype=dtype, requires_grad=True) for _ in range(2))
    D, bias = torch.randn(h, device=dev, requires_grad=True), torch.randn(h, device=dev, requires_grad=True)
    impls = {"ours": lambda: ssd_ref.ssd_chunked(x, dt, A, B, C, D, bias, True, chunk_size=chunk),
             **({"mamba_ssm": lambda: functions["mamba_ssd"](x, dt, A, B, C, chunk, D=D, dt_bias=bias,
                                                             dt_softplus=True)} if "mamba_ssd" in functions else {})}
    times = _time_impls(ctx, impls, (x, dt, A, B, C, D, bias))
    failures = [f"{impl}: {t}" for impl, t in times.items() if isinstance(t, str)]
    note = "; ".join([*(f"{k}: {v}" for k, v in errors.items() if k == "mamba_ssm"), *failures])
    rows = _ratio_rows("ssd", f"b{b} L{L} h{h} p{p} N{n} chunk {chunk}", times, "mamba_ssm")
    status = "failed" if failures and not ctx.rehearsal else "ok"
    return dict(status=status, rows=rows, note=note, loaded="mamba_ssd" in functions)


def top_kernels(events, attr: str, n: int = 12) -> tuple[list[dict], float]:
    """The ``n`` largest entries of ``prof.key_averages()`` by ``attr`` (``self_device_time_total`` on CUDA,
    ``self_cpu_time_total`` on CPU; µs), and the total ms. The attribute is read strictly: a name the
    profiler's events lack raises instead of reading as 0."""
    events = sorted(events, key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in events)
    rows = [dict(kernel=e.key[:90], ms=round(getattr(e, attr) / 1e3, 3), calls=e.count) for e in events[:n]
            if getattr(e, attr) > 0]
    return rows, round(total / 1e3, 2)


def part_train(ctx) -> dict:
    """One mamba-130m-polar bf16 training step at 8 × 2048 on the model alone (no DeepSpeed on the device):
    tokens/s, MFU (6·params·tokens/s over the dense bf16 peak) and the top kernels by self device time."""
    from torch.profiler import ProfilerActivity, profile

    from models import MambaLM, ModelConfig

    s, dtype, dev = shapes_for(ctx), compute_dtype(ctx), ctx.device
    cfg = ModelConfig.preset(s.preset)
    model = MambaLM(cfg).to(device=dev, dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (s.train_batch, s.train_seq + 1), device=dev)

    def step():
        opt.zero_grad(set_to_none=True)
        model(ids[:, :-1], labels=ids[:, 1:], return_logits=False).loss.backward()
        opt.step()

    step()  # compiles every kernel
    ms = bench_ms(step, ctx)
    cuda = dev.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    rows, total = top_kernels(prof.key_averages(), "self_device_time_total" if cuda else "self_cpu_time_total")
    tokens, params = s.train_batch * s.train_seq, model.num_parameters()
    tflops = 6 * params * tokens / (ms / 1e3) / 1e12
    peak = next((v for k, v in PEAK_TFLOPS_BF16.items() if k in device_name(ctx)), None)
    mfu = round(tflops / peak, 4) if peak else None
    goal = "—" if mfu is None else f"{100 * mfu:.1f}% {'✅' if mfu >= GOALS['mfu'] else '❌'}"
    summary = (f"{s.preset} ({params:,} params), batch {s.train_batch} × {s.train_seq}, {str(dtype)[6:]}: {ms:.1f} "
               f"ms/step, {tokens / ms * 1e3:,.0f} tokens/s, {tflops:.1f} TFLOP/s; MFU goal ≥ "
               f"{100 * GOALS['mfu']:.0f}% of {peak or '?'} TFLOP/s: {goal}. Top kernels by self "
               f"{'device' if cuda else 'CPU'} time ({total} ms profiled):")
    return dict(summary=summary, rows=rows, step_ms=round(ms, 2), tokens_per_s=round(tokens / ms * 1e3),
                tflops=round(tflops, 2), mfu=mfu, params=params, profiled_total_ms=total)


def part_niah(ctx) -> dict:
    """Prefill throughput of mamba-130m-polar at 32k and 128k tokens (eval.niah.prefill, 32k-token chunks)."""
    from eval.niah import prefill
    from models import MambaLM, ModelConfig

    s, dev = shapes_for(ctx), ctx.device
    cfg = ModelConfig.preset(s.preset)
    model = MambaLM(cfg).to(device=dev, dtype=compute_dtype(ctx)).eval()
    result = dict(rows=[])
    for length in s.niah_lengths:
        ids = torch.randint(0, cfg.vocab_size, (1, length), device=dev)
        with torch.no_grad():
            prefill(model, ids[:, : s.niah_chunk], s.niah_chunk)  # compiles, outside the timing
            ms = once_ms(lambda ids=ids: prefill(model, ids, s.niah_chunk), ctx)
        result["rows"].append(dict(tokens=length, chunk=s.niah_chunk, s=round(ms / 1e3, 3),
                                   **{"tokens/s": round(length / ms * 1e3)}))
        ctx.emit(result)
    return result


def once_ms(fn, ctx) -> float:
    """One call, timed with CUDA events on CUDA (for calls of 100 ms and more, where one is enough)."""
    if ctx.device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def part_mqar(ctx) -> dict:
    """The headline MQAR cells of configs/mqar/gpu-minutes.yaml (default vs both polarized, exact and reference
    zero channel, 4 layers) for 1 epoch of its 8, one after another while the part's budget lasts: tokens/s,
    the figure the config's ~4-minute budget rests on (the full cells are their own run). Cell files go to a
    scratch folder."""
    from eval.mqar import load_mqar_config, train_cell

    config = ROOT / "configs" / "mqar" / "gpu-minutes.yaml"
    overrides = {"run.out_dir": str(ctx.scratch / "mqar"), "optim.epochs": 1,
                 **(MQAR_REHEARSAL if ctx.rehearsal else {})}
    cfg = load_mqar_config(config, overrides)
    cells = [(v, n) for v in cfg.sweep.variants for n in cfg.sweep.n_layers]
    result, started = dict(rows=[], summary="1 epoch of 8 per cell: tokens/s, not the accuracy result"), time.time()
    for i, (variant, n_layer) in enumerate(cells):
        spent = (time.time() - started) / i if i else 0
        if spent > ctx.time_left():  # the next cell would not finish: say which were left
            result["note"] = f"not run (part budget): {', '.join(f'{v}-L{n}' for v, n in cells[i:])}"
            break
        r = train_cell(cfg, variant, n_layer, force=True)
        result["rows"].append({"cell": f"{variant}-L{n_layer}", "average accuracy %": round(
            100 * r["accuracy"]["average"], 2), "epochs": r.get("epochs"), "s": r["train_seconds"],
            "tokens/s": r["tokens_per_second"]})
        ctx.emit(result)
    return result


def part_tests(ctx) -> dict:
    """The ``gpu``-marked kernel tests (compiled kernels vs the PyTorch references), via pytest, stopped a few
    seconds before the part's budget so the tests that ran are still counted."""
    try:
        import pytest  # noqa: F401
    except ImportError:
        return dict(status="skipped", note="pytest is not installed here")
    cmd = [sys.executable, "-m", "pytest", "-v", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_kernels_scan.py",
           "tests/test_kernels_ops.py", "tests/test_kernels_dispatch.py"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=max(5, ctx.time_left() - 5))
        out, code = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as e:
        out, code = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), None
    lines = out.strip().splitlines()
    passed = sum(" PASSED" in x for x in lines)
    failures = [x for x in lines if x.startswith("FAILED")] or [x for x in lines if " FAILED" in x]
    if code is None:
        return dict(status="timeout", summary=f"stopped before the part's budget: {passed} passed, "
                                              f"{len(failures)} failed so far", rows=[dict(failed=f) for f in failures])
    return dict(status="ok" if code in (0, 5) else "failed", summary=f"`{lines[-1] if lines else ''}`",
                rows=[dict(failed=f) for f in failures[:20]])


def part_probe(ctx) -> dict:
    """A forward scan past 2^31 elements (int64 offsets), bounded: b·d·L just past 2^31 (skipped when the GPU
    lacks the memory); the last 16 channels must equal the same scan run on those channels alone."""
    from kernels import scan_triton

    s, dtype, dev = shapes_for(ctx), compute_dtype(ctx), ctx.device
    b, d, L = s.probe
    need = 7 * b * d * L * torch.finfo(dtype).bits // 8  # xz (2), u, Δ, two y
    if dev.type == "cuda" and torch.cuda.mem_get_info(dev)[0] < need:
        return dict(status="skipped", note=f"needs ~{need / 2**30:.0f} GiB free")
    n = s.n_state
    u, delta, A, B, C, D, z, bias = mixer_inputs(b, d, L, n, 1, 1, dtype, dev)
    kw = dict(delta_softplus=True, n_ones=1, n_zeros=1)
    with torch.no_grad():
        run = lambda: scan_triton.selective_scan(u, delta, A, B, C, D, z, bias, **kw)
        first_ms = once_ms(run, ctx)
        y = run()
        ms = once_ms(run, ctx)
        tail = slice(d - 16, d)  # the channels whose offsets pass 2^31
        part = lambda t: t[:, tail].contiguous()
        want = scan_triton.selective_scan(part(u), part(delta), A[tail], B, C, D[tail], part(z), bias[tail], **kw)
        err = (y[:, tail].float() - want.float()).abs().max().item()
    ok = err == 0.0 and bool(torch.isfinite(y[:, tail]).all())
    return dict(status="ok" if ok else "failed",
                summary=f"b{b} d{d} L{L} = {b * d * L:,} elements (past 2^31: {b * d * L > 2**31}); first call "
                        f"(compiles) {first_ms:.0f} ms, then {ms:.1f} ms; max |Δ| of the last 16 channels vs "
                        f"the same scan on them alone: {err}", max_abs_diff_last_channels=err)
