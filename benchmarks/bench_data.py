"""Data pipeline speed: `polar prepare` tokens/s on builtin:shakespeare and the loader's cost per batch.

* prepare: a 4096-piece tokenizer is trained on the builtin corpus, then ``prepare()`` (the code behind
  `polar prepare`: read, strip markup, batch encode on all cores, write shards + sha256 + manifest) runs
  end to end; tokens/s = tokens written / wall time, best of ``--repeats``. Goal: >= 1M tokens/s.
* loader: ``DistributedSampleLoader`` micro-batches (batch 8, seq 512) from the prepared train split vs
  one train step (forward + backward + AdamW step) of ``MambaLM`` mamba-tiny with d_model 256, 4 layers
  and the tokenizer's vocab, fp32. Medians; goal: loader < 1% of a step.

Prints a markdown table and writes benchmarks/results/bench_data.json.
Run: PYTHONPATH=. .venv/bin/python benchmarks/bench_data.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

VOCAB, BATCH, SEQ = 4096, 8, 512


def bench_prepare(work: Path, repeats: int) -> tuple[dict, str]:
    from pretrain.prepare import PrepareConfig, prepare
    from tokenizer.sources import iter_documents
    from tokenizer.train import TrainSettings, train_tokenizer

    t0 = time.perf_counter()
    tok = train_tokenizer(iter_documents("builtin:shakespeare"), work / "tok", TrainSettings(vocab_size=VOCAB))
    train_s = time.perf_counter() - t0
    times, tokens = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        manifest = prepare(PrepareConfig("builtin:shakespeare", tok.path, str(work / "data"), force=True))
        times.append(time.perf_counter() - t0)
        tokens = sum(s["tokens"] for s in manifest["splits"].values())
    best = min(times)
    return {
        "tokenizer_train_s": train_s,
        "tokens": tokens,
        "prepare_s_best": best,
        "prepare_s_all": times,
        "prepare_tokens_per_s": tokens / best,
    }, str(work / "data")


def bench_loader(data_dir: str, steps: int) -> dict:
    import torch

    from models import MambaLM, ModelConfig
    from pretrain.data import DistributedSampleLoader, PackedDataset, TokenShards

    loader = DistributedSampleLoader(PackedDataset(TokenShards(data_dir), SEQ), BATCH, seed=0)
    for _ in range(20):
        next(loader)
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        next(loader)
    loader_s = (time.perf_counter() - t0) / n

    torch.manual_seed(0)
    model = MambaLM(ModelConfig.preset("mamba-tiny", d_model=256, n_layer=4, vocab_size=VOCAB))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step_times = []
    for i in range(steps + 2):
        x, y = next(loader)
        t0 = time.perf_counter()
        loss = model(x, y).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:  # warm-up
            step_times.append(time.perf_counter() - t0)
    step_s = statistics.median(step_times)
    return {
        "loader_s_per_batch": loader_s,
        "train_step_s": step_s,
        "loader_overhead_pct": 100 * loader_s / step_s,
        "model_params": model.num_parameters(),
        "final_loss": loss.item(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="prepare runs (best is reported)")
    ap.add_argument("--steps", type=int, default=5, help="timed train steps")
    args = ap.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        prep, data_dir = bench_prepare(Path(tmp), args.repeats)
        load = bench_loader(data_dir, args.steps)
    result = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": len(os.sched_getaffinity(0)),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "config": {"vocab": VOCAB, "batch": BATCH, "seq": SEQ, "model": "mamba-tiny d_model=256 n_layer=4 fp32"},
        "prepare": prep,
        "loader": load,
        "goals": {
            "prepare_tokens_per_s": ">= 1e6",
            "loader_overhead_pct": "< 1",
            "prepare_met": prep["prepare_tokens_per_s"] >= 1e6,
            "loader_met": load["loader_overhead_pct"] < 1.0,
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_data.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    print(f"machine: {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads)\n")
    print("| measure | value | goal |")
    print("|---|---|---|")
    print(f"| tokenizer train (builtin, vocab {VOCAB}) | {prep['tokenizer_train_s']:.2f} s | |")
    print(f"| prepare builtin:shakespeare ({prep['tokens']:,} tokens) | {prep['prepare_s_best']:.2f} s | |")
    print(f"| prepare throughput | {prep['prepare_tokens_per_s'] / 1e6:.2f} M tokens/s | >= 1 M tokens/s |")
    print(f"| loader, batch {BATCH} x seq {SEQ} | {load['loader_s_per_batch'] * 1e6:.0f} µs/batch | |")
    print(f"| train step (fwd+bwd+AdamW, {load['model_params'] / 1e6:.1f}M params) | {load['train_step_s']:.3f} s | |")
    print(f"| loader overhead | {load['loader_overhead_pct']:.4f} % of a step | < 1 % |")


if __name__ == "__main__":
    main()
