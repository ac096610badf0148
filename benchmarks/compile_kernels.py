"""Offline GPU build check: every Triton kernel the model launches, compiled for sm_90 on a machine without a GPU.

The real model (a preset, on PyTorch's ``meta`` device, kernels forced to Triton) runs one training step
(forward with the chunked loss, then backward) while :func:`kernels.triton_jit.capture` records each kernel
launch with its real arguments: the model's strides, the shipped block sizes, flags and ``num_warps``.
Every launch is captured twice: as the model makes it, and with packed documents (a ``seq_idx`` handed to the
Triton scan and conv, their ``HAS_SEQ_IDX`` variants). The scan forward is captured once more, both ways, as the
not-default one-3-D-tile variant (``POLAR_SCAN_TILE=3d``; rows ``TILE3D=True``, variant "tile3d"), to compare it
with the shipped forward.
Each distinct launch is then compiled by Triton's own compiler for ``GPUTarget("cuda", 90, 32)`` with the
``ptxas`` that Triton picks for sm_90 (3.9: its bundled ``ptxas-blackwell``, CUDA 13; 3.6, the device's: its
bundled ``ptxas``, CUDA 12.8; the table names it), and the cubin's resource usage is read with the bundled
``cuobjdump``: registers per thread, local memory (spills; 0 means none), shared memory; the PTX is searched
for vectorized global loads (``ld.global.v2/v4``) and asynchronous copies (``cp.async``). Beside them, the
byte model of each launch (benchmarks/byte_model.py): MB read and written, counted from its tensor arguments.

Whichever Triton is importable compiles: ``make bench`` runs this once with the project's (3.9) and once with
the device's 3.6 (``PYTHONPATH=.venv-triton36``, built by ``make triton36``). Writes
benchmarks/results/compile_kernels_triton<major.minor>.{json,md}; exits 1 when a kernel fails to compile or spills.
Run: PYTHONPATH=. .venv/bin/python benchmarks/compile_kernels.py [--presets mamba-130m ...] [--dtypes bf16 fp32]
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # so `kernels` and `models` import without PYTHONPATH
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results"

from byte_model import kernel_name, launch_bytes  # noqa: E402

from kernels.triton_jit import capture  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PRESETS = ("mamba-130m", "mamba-370m", "mamba-550m")


@contextlib.contextmanager
def _packed_documents():
    """Inside, the Triton scan and conv get a ``seq_idx`` (packed documents: their HAS_SEQ_IDX variants) when the
    caller passes none."""
    from kernels import conv_triton, scan_triton

    originals = {m: m.__dict__[n] for m, n in ((scan_triton, "selective_scan"), (conv_triton, "causal_conv1d"))}

    def with_seq_idx(fn):
        def call(*args, **kwargs):
            bound = inspect.signature(fn).bind(*args, **kwargs)
            if bound.arguments.get("seq_idx") is None:
                x = bound.arguments["u" if "u" in bound.arguments else "x"]
                bound.arguments["seq_idx"] = torch.zeros(x.shape[0], x.shape[-1], dtype=torch.int32, device=x.device)
            return fn(*bound.args, **bound.kwargs)

        return call

    for module, fn in originals.items():
        setattr(module, fn.__name__, with_seq_idx(fn))
    try:
        yield
    finally:
        for module, fn in originals.items():
            setattr(module, fn.__name__, fn)


def captured_launches(preset: str, dtype: torch.dtype, polar: bool, batch: int, seq: int, layers: int = 1,
                      packed: bool = False, tile: str = "2d"):
    """The Triton launches of a training step (forward + loss + backward) and of an inference forward (no saved
    states, e.g. a NIAH prefill) of ``preset`` on meta tensors, at ``batch`` and at batch 1; ``packed``: with
    document starts (seq_idx) in the scan and the conv; ``tile``: the scan forward's tile (POLAR_SCAN_TILE)."""
    from models import MambaLM, ModelConfig

    name = f"{preset}-polar" if polar else preset
    cfg = ModelConfig.preset(name, n_layer=layers)  # every layer launches the same kernels
    previous = {k: os.environ.get(k) for k in ("POLAR_KERNELS", "POLAR_SCAN_TILE")}
    os.environ.update(POLAR_KERNELS="triton", POLAR_SCAN_TILE=tile)
    try:
        with torch.device("meta"):
            model = MambaLM(cfg).to(dtype)
            ids = torch.zeros(batch, seq, dtype=torch.long)
        with capture() as launches, (_packed_documents() if packed else contextlib.nullcontext()):
            model(ids, labels=ids, return_logits=False).loss.backward()
            with torch.no_grad():
                model(ids)
            # batch 1: too few channel blocks to fill the SMs, the scan splits L (forward and backward)
            model(ids[:1], labels=ids[:1], return_logits=False).loss.backward()
            with torch.no_grad():
                model(ids[:1])
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return launches


def compile_launch(kernel, args, kwargs, arch: int = 90):
    """Compile one recorded launch for ``sm_<arch>`` exactly as ``JITFunction.run`` would on that GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    jf = kernel.compiled
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(jf.signature, jf.params, backend)
    kwargs = dict(kwargs, debug=False)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jf._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(jf, signature, constexprs, attrs), target=target, options=options.__dict__)


def toolchain(arch: int = 90) -> str:
    """The Triton version and the ptxas it compiles ``sm_<arch>`` with, e.g. "Triton 3.6.0, ptxas (CUDA 12.8)"."""
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch)
    return f"Triton {triton.__version__}, {Path(ptxas.path).name} (CUDA {ptxas.version})"


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def resource_usage(compiled) -> dict:
    """Registers, local (spill) and stack bytes from the cubin; shared memory; load kinds from the PTX."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    ptx = compiled.asm["ptx"]
    # Triton kernels keep no arrays in local memory: any stack frame or local bytes are register spills
    return dict(registers=int(fields["REG"]), spill_bytes=int(fields["LOCAL"]) + int(fields["STACK"]),
                shared_bytes=max(int(fields["SHARED"]), compiled.metadata.shared),
                vector_loads=bool(re.search(r"ld\.global(\.\w+)*\.v[248]", ptx)),
                async_loads="cp.async" in ptx, num_warps=compiled.metadata.num_warps)


def _settings(kernel, args, kwargs) -> str:
    """The launch's constexpr block sizes / flags, for the table."""
    names = [p.name for p in kernel.compiled.params]
    keys = ("CHUNK", "K", "N_ONES", "N_SCAN", "N_ZEROS", "SAVE", "SEG_CHUNKS", "HAS_SEQ_IDX", "TILE3D", "num_warps",
            "maxnreg")
    shown = {k: v for k, v in kwargs.items() if k.startswith("BLOCK") or k in keys}
    shown.update({n: a for n, a in zip(names, args, strict=False) if n.startswith("BLOCK")})
    return " ".join(f"{k}={v}" for k, v in sorted(shown.items()))


def check(presets=PRESETS, dtypes=("bf16", "fp32"), batch: int = 8, seq: int = 2048, arch: int = 90) -> list[dict]:
    """One row per distinct (preset, dtype, polar, kernel, specialization); compile errors become rows too."""
    rows, seen, shown = [], {}, set()
    for preset in presets:
        for dname in dtypes:
            for polar in (False, True):
                # packed: the scan's and conv's seq_idx variants; tile "3d": the scan forward's variant (its
                # launches only: the forward and, at batch 1, the state-passing pass at the variant's tiles)
                launches = [(tile, launch) for tile in ("2d", "3d") for packed in (False, True)
                            for launch in captured_launches(preset, DTYPES[dname], polar, batch, seq, packed=packed,
                                                            tile=tile)
                            if tile == "2d" or kernel_name(launch[0]) in ("scan_fwd_kernel", "scan_seg_kernel")]
                for tile, (kernel, grid, args, kwargs) in launches:
                    nbytes = launch_bytes(kernel, args, kwargs)
                    row = dict(preset=preset, dtype=dname, polar=polar, kernel=kernel_name(kernel),
                               variant="tile3d" if tile == "3d" else None,
                               grid=list(grid), settings=_settings(kernel, args, kwargs),
                               read_mb=round(nbytes["read"] / 1e6, 2), written_mb=round(nbytes["written"] / 1e6, 2))
                    t0 = time.perf_counter()
                    try:
                        compiled = compile_launch(kernel, args, kwargs, arch)
                        key = compiled.hash
                        if key not in seen:
                            seen[key] = resource_usage(compiled)
                        row.update(seen[key], ok=True, compile_s=round(time.perf_counter() - t0, 2))
                    except Exception as e:  # report every failure, keep checking the rest
                        key = str(e)
                        row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                    if (preset, dname, polar, key) not in shown:  # e.g. the loss launches once per chunk
                        shown.add((preset, dname, polar, key))
                        rows.append(row)
    return rows


def markdown(rows: list[dict], arch: int, batch: int, seq: int) -> str:
    lines = [f"Triton kernels compiled offline for sm_{arch} by {toolchain(arch)} (a training step and an inference "
             f"forward at batch {batch} x {seq}; registers per thread, spill = stack + local memory bytes, smem = "
             "shared memory bytes; read/written MB per launch from its tensor arguments, benchmarks/byte_model.py)",
             "",
             "| preset | dtype | polar | kernel | settings | grid | regs | spill | smem | read MB | written MB "
             "| ld.global.v* | cp.async |",
             "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        kernel = r["kernel"] + (" (3-D tile variant)" if r.get("variant") == "tile3d" else "")
        head = f"| {r['preset']} | {r['dtype']} | {'polar' if r['polar'] else 'base'} | {kernel} | " \
               f"{r['settings']} | "
        if not r["ok"]:
            lines.append(f"{head} | FAILED: {r['error']} | | | {r['read_mb']} | {r['written_mb']} | | |")
            continue
        yes = lambda v: "yes" if v else "no"
        lines.append(f"{head}{'x'.join(map(str, r['grid']))} | {r['registers']} | {r['spill_bytes']} | "
                     f"{r['shared_bytes']} | {r['read_mb']} | {r['written_mb']} | {yes(r['vector_loads'])} | "
                     f"{yes(r['async_loads'])} |")
    return "\n".join(lines)


def failures(rows: list[dict]) -> list[str]:
    """One line per kernel that did not compile or spills."""
    return [f"{r['preset']} {r['dtype']} {'polar' if r['polar'] else 'base'} {r['kernel']}: "
            + (r["error"] if not r["ok"] else f"{r['spill_bytes']} bytes of spills at {r['settings']}")
            for r in rows if not r["ok"] or r["spill_bytes"]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--presets", nargs="+", default=list(PRESETS))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--arch", type=int, default=90, help="compute capability to compile for (90 = H100/H200)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    import triton

    rows = check(args.presets, args.dtypes, args.batch, args.seq, args.arch)
    table = markdown(rows, args.arch, args.batch, args.seq)
    print(table)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"compile_kernels_triton{'.'.join(triton.__version__.split('.')[:2])}"
    report = dict(arch=args.arch, triton=triton.__version__, toolchain=toolchain(args.arch), rows=rows)
    (args.out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out_dir / f"{stem}.md").write_text(table + "\n")
    bad = failures(rows)
    for line in bad:
        print(f"FAIL {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
