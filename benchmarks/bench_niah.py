"""Long-context prefill for needle-in-a-haystack: chunked parallel prefill vs one recurrent step per token.

``eval.niah.prefill`` runs a prompt ``chunk`` tokens at a time, each chunk in parallel and continuing from
the state the previous one left (``kernels.dispatch.selective_scan(initial_state=...)``); chunk 1 is pure
recurrence, which is what long prompts cost before chunks could continue from a state. Model: polarized
Mamba (1 ones + 1 zeros channel), d_model 256, 4 layers, vocab 4096, fp32, batch 2, on the current device.
For each context length and chunk size: median prefill time, tokens/s, and the largest difference of the
final logits from the single-chunk prefill (the chunked path must agree with it).

Prints a markdown table and writes benchmarks/results/bench_niah.{json,md} (``--quick``: *_quick.*).
Run: PYTHONPATH=. .venv/bin/python benchmarks/bench_niah.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

from eval.niah import prefill  # noqa: E402
from models import MambaLM, ModelConfig  # noqa: E402


def timed_prefill(model: MambaLM, ids: torch.Tensor, chunk: int, repeats: int) -> tuple[float, torch.Tensor]:
    """Median seconds of ``prefill`` over ``repeats`` runs after a warm-up, and its final logits."""
    fn = lambda: prefill(model, ids, chunk)[0]
    out = fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter contexts, one repeat")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    cfg = ModelConfig.preset("mamba-tiny", d_model=256, n_layer=4, vocab_size=4096,
                             **{"polarize.ones": 1, "polarize.zeros": 1})
    model = MambaLM(cfg).to(device).eval()
    lengths = [1024] if args.quick else [2048, 8192]
    chunks = [1, 256, 2048]
    repeats = 1 if args.quick else 3
    batch = 2
    rows = []
    for length in lengths:
        ids = torch.randint(0, cfg.vocab_size, (batch, length), device=device)
        ref = prefill(model, ids, length)[0]
        for chunk in chunks:
            seconds, logits = timed_prefill(model, ids, chunk, repeats)
            rows.append({"length": length, "chunk": chunk, "seconds": round(seconds, 4),
                         "tokens_per_s": round(batch * length / seconds),
                         "max_abs_diff_vs_one_chunk": float((logits - ref).abs().max())})
            print(rows[-1], flush=True)
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "batch": batch,
            "model": "mamba d_model 256, 4 layers, 1 ones + 1 zeros, vocab 4096, fp32"}
    lines = [f"NIAH prefill ({meta['model']}, batch {batch}, {meta['device']}, {meta['threads']} threads)", "",
             "| context | chunk | seconds | tokens/s | speedup vs chunk 1 | max abs Δ logits vs one chunk |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        step = next(x for x in rows if x["length"] == r["length"] and x["chunk"] == 1)
        lines.append(f"| {r['length']} | {r['chunk']} | {r['seconds']} | {r['tokens_per_s']:,} | "
                     f"{step['seconds'] / r['seconds']:.1f}x | {r['max_abs_diff_vs_one_chunk']:.1e} |")
    table = "\n".join(lines) + "\n"
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "bench_niah_quick" if args.quick else "bench_niah"
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
