"""Flat memory of long-context evaluation on CPU: peak RSS and prefill throughput of a small Mamba at 8k, 32k
and 128k tokens, prefilled in chunks that carry the recurrent state (``eval.niah.prefill``, the path
``polar eval ruler/passkey/niah`` and ``position_loss`` take).

Each length runs in its own fresh process (peak RSS is per process): build the model, prefill a random
prompt of that length ``--chunk`` tokens at a time, report the process's peak RSS (``ru_maxrss``) and the
prefill tokens/s. Model: polarized Mamba (1 ones + 1 zeros channel), d_model 128, 4 layers, vocab 4096,
fp32, batch 1, ``--threads`` CPU threads. The claim under test: peak RSS does not grow with the length
(within 10% from 8k to 128k), since only one chunk's activations and the fixed-size state are alive.

Prints a markdown table and writes benchmarks/results/bench_long_context.{json,md}.
Run: PYTHONPATH=. .venv/bin/python benchmarks/bench_long_context.py [--lengths 8k,32k,128k] [--chunk 2048]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"


def one_length(length: int, chunk: int, threads: int) -> dict:
    """In this process: peak RSS (MiB) and prefill tokens/s of one prompt of ``length`` tokens."""
    import torch

    from eval.niah import prefill
    from models import MambaLM, ModelConfig

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = ModelConfig.preset("mamba-tiny", d_model=128, n_layer=4, vocab_size=4096,
                             **{"polarize.ones": 1, "polarize.zeros": 1})
    model = MambaLM(cfg).eval()
    ids = torch.randint(0, 4096, (1, length))
    start = time.perf_counter()
    logits, _ = prefill(model, ids, chunk)
    seconds = time.perf_counter() - start
    assert torch.isfinite(logits).all()
    return {"length": length, "chunk": chunk, "seconds": seconds, "tokens_per_s": length / seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> int:
    from eval.niah import length_label, parse_lengths

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="8k,32k,128k")
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)  # one length, in this process
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(one_length(args.child, args.chunk, args.threads)))
        return 0
    rows = []
    for n in parse_lengths(args.lengths):
        out = subprocess.run([sys.executable, __file__, "--child", str(n), "--chunk", str(args.chunk),
                              "--threads", str(args.threads)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    rss = [r["peak_rss_mib"] for r in rows]
    spread = max(rss) / min(rss) - 1
    lines = [f"Small polarized Mamba (d_model 128, 4 layers, vocab 4096, fp32), batch 1, chunk {args.chunk}, "
             f"{args.threads} CPU thread(s), {platform.processor() or platform.machine()}:", "",
             "| length | peak RSS (MiB) | prefill time (s) | prefill tokens/s |", "|---|---|---|---|"]
    lines += [f"| {length_label(r['length'])} | {r['peak_rss_mib']:.0f} | {r['seconds']:.1f} | "
              f"{r['tokens_per_s']:.0f} |" for r in rows]
    lines += ["", f"Peak RSS spread, largest over smallest: {100 * spread:.1f}% "
              f"({'within' if spread <= 0.10 else 'NOT within'} 10%)."]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_long_context.json").write_text(json.dumps({"rows": rows, "spread": spread}, indent=2) + "\n")
    (RESULTS / "bench_long_context.md").write_text(text)
    return 0 if spread <= 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
