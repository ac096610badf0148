"""Data pipeline speed: `polar prepare` tokens/s on builtin:shakespeare and the loader's cost per batch.

* prepare: a 4096-piece SentencePiece tokenizer and a 4096-id byte-level BPE ``tokenizer.json`` (the
  ``tokenizers`` library, as GPT-NeoX's) are trained on the builtin corpus, then ``prepare()`` (the code behind
  `polar prepare`: read, strip markup, batch encode on all cores, write shards + indexes + sha256 + manifest)
  runs end to end (datatrove tasks, one per play, on 1 and 2 worker processes, then the merge) with each;
  tokens/s = tokens written / wall time, best of ``--repeats``. Goal: >= 1M tokens/s.
* loader: ``DistributedSampleLoader`` micro-batches (batch 8, seq 512) from the prepared train split vs
  one train step (forward + backward + AdamW step) of ``MambaLM`` mamba-tiny with d_model 256, 4 layers
  and the tokenizer's vocab, fp32, and the loader over a two-source mixture (train 0.8, val 0.2). Medians; goal:
  loader < 1% of a step.

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
    """Prepare with our SentencePiece tokenizer and with a byte-level BPE tokenizer.json of the same vocabulary."""
    from tests.data_helpers import byte_level_bpe
    from tokenizer.sources import iter_documents
    from tokenizer.train import TrainSettings, train_tokenizer

    docs = list(iter_documents("builtin:shakespeare"))
    t0 = time.perf_counter()
    tok = train_tokenizer(docs, work / "tok", TrainSettings(vocab_size=VOCAB))
    train_s = time.perf_counter() - t0
    bpe = byte_level_bpe(docs, VOCAB, work / "bpe")
    result = {"tokenizer_train_s": train_s}
    for kind, ref in (("sentencepiece", tok.path), ("hf", str(bpe))):
        for workers in (1, 2):
            result[f"{kind}_{workers}w"] = time_prepare(ref, work / f"data-{kind}", repeats, workers)
    return result, str(work / "data-sentencepiece")


def time_prepare(tokenizer: str, out: Path, repeats: int, workers: int) -> dict:
    from pretrain.prepare import PrepareConfig, prepare

    times, tokens = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        manifest = prepare(PrepareConfig("builtin:shakespeare", tokenizer, str(out), force=True, workers=workers))
        times.append(time.perf_counter() - t0)
        tokens = sum(s["tokens"] for s in manifest["splits"].values())
    best = min(times)
    return {"tokens": tokens, "prepare_s_best": best, "prepare_s_all": times, "prepare_tokens_per_s": tokens / best}


def time_loader(loader, n: int = 2000) -> float:
    """Seconds per micro-batch after a warm-up."""
    for _ in range(20):
        next(loader)
    t0 = time.perf_counter()
    for _ in range(n):
        next(loader)
    return (time.perf_counter() - t0) / n


def bench_loader(data_dir: str, steps: int) -> dict:
    import torch

    from models import MambaLM, ModelConfig
    from pretrain.data import DistributedSampleLoader, PackedDataset, TokenShards
    from pretrain.mixture import Mixture, Source

    data = PackedDataset(TokenShards(data_dir), SEQ)
    loader_s = time_loader(DistributedSampleLoader(data, BATCH, seed=0))
    mixture = Mixture([Source("a", 0.8, data), Source("b", 0.2, PackedDataset(TokenShards(data_dir, "val"), SEQ))], 0)
    mixture_s = time_loader(DistributedSampleLoader(mixture, BATCH, seed=0))
    loader = DistributedSampleLoader(data, BATCH, seed=0)

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
        "mixture_loader_s_per_batch": mixture_s,
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
            "prepare_met": prep["sentencepiece_1w"]["prepare_tokens_per_s"] >= 1e6,
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
    for kind, label in (("sentencepiece", "our SentencePiece"), ("hf", "BPE tokenizer.json")):
        for workers in (1, 2):
            p = prep[f"{kind}_{workers}w"]
            print(f"| prepare builtin:shakespeare, {label}, {workers} worker(s) ({p['tokens']:,} tokens) | "
                  f"{p['prepare_s_best']:.2f} s = {p['prepare_tokens_per_s'] / 1e6:.2f} M tokens/s | >= 1 M tokens/s |")
    print(f"| loader, batch {BATCH} x seq {SEQ} | {load['loader_s_per_batch'] * 1e6:.0f} µs/batch | |")
    print(f"| loader, 2-source mixture 0.8/0.2 | {load['mixture_loader_s_per_batch'] * 1e6:.0f} µs/batch | |")
    print(f"| train step (fwd+bwd+AdamW, {load['model_params'] / 1e6:.1f}M params) | {load['train_step_s']:.3f} s | |")
    print(f"| loader overhead | {load['loader_overhead_pct']:.4f} % of a step | < 1 % |")


if __name__ == "__main__":
    main()
