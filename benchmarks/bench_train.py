"""Training throughput: tokens/s and achieved FLOP/s (MFU where the device's peak is known).

* CPU: the demo recipe (configs/demo-cpu.yaml) trained for a few steps by `polar train` under torchrun
  (2 processes, DeepSpeed ZeRO-2), read back from its metrics.jsonl — the real training path.
* CUDA (when present): mamba-130m at seq 2048 in bf16, forward + backward + AdamW in one process (the
  device machines have no DeepSpeed), FLOPs counted by pretrain.metrics.

Writes benchmarks/results/bench_train.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import MambaLM, ModelConfig  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.metrics import peak_flops, read_jsonl, train_flops_per_token  # noqa: E402

OUT = ROOT / "benchmarks" / "results"


def bench_cpu_demo(steps: int, data: str, tokenizer: str) -> dict:
    cfg = load_config(ROOT / "configs" / "demo-cpu.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "pretrain.cli", "train", str(ROOT / "configs" / "demo-cpu.yaml"), "--run.out_dir", tmp,
               "--schedule.steps", str(steps), "--eval.every", "0", "--logging.progress_bar", "false",
               "--data.path", data, "--data.tokenizer", tokenizer]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        recs = [r for r in read_jsonl(Path(tmp) / cfg.run.name / "metrics.jsonl") if r["kind"] == "train"]
    tps = statistics.median(r["tokens_per_s"] for r in recs[2:])  # skip warm-up steps
    flops = train_flops_per_token(cfg.model) * tps
    return {"what": "demo-cpu, 2 procs ZeRO-2 fp32", "device": "cpu", "tokens_per_s": tps,
            "achieved_tflops": flops / 1e12, "mfu": None, "steps": steps}


def bench_cuda(preset: str, seq: int, batch: int, steps: int) -> dict:
    cfg = ModelConfig.preset(preset)
    model = MambaLM(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device="cuda")
    times = []
    for i in range(steps + 2):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids[:, :-1], labels=ids[:, 1:], return_logits=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t)
    tps = batch * seq / statistics.median(times)
    name = torch.cuda.get_device_name()
    peak = peak_flops(name, "bf16")
    flops = train_flops_per_token(cfg) * tps
    return {"what": f"{preset} seq {seq} batch {batch} bf16", "device": name, "tokens_per_s": tps,
            "achieved_tflops": flops / 1e12, "mfu": flops / peak if peak else None,
            "max_mem_gb": torch.cuda.max_memory_allocated() / 2**30, "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12, help="training steps to time")
    ap.add_argument("--data", default="data/shakespeare", help="prepared data for the CPU demo run")
    ap.add_argument("--tokenizer", default="data/tokenizer", help="tokenizer of --data")
    ap.add_argument("--gpu-preset", default="mamba-130m")
    ap.add_argument("--gpu-batch", type=int, default=8)
    args = ap.parse_args()
    rows = []
    if torch.cuda.is_available():
        rows.append(bench_cuda(args.gpu_preset, 2048, args.gpu_batch, args.steps))
    if Path(args.data, "manifest.json").is_file():
        rows.append(bench_cpu_demo(args.steps, args.data, args.tokenizer))
    else:
        print(f"skipping the CPU demo row: no prepared data at {args.data} (run make demo first)")
    lines = ["| run | device | tokens/s | achieved TFLOP/s | MFU |", "|---|---|---:|---:|---:|"]
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a (no peak for CPUs)"
        lines.append(f"| {r['what']} | {r['device']} | {r['tokens_per_s']:,.0f} | {r['achieved_tflops']:.4f} | {mfu} |")
    table = "\n".join(lines)
    print(table)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bench_train.json").write_text(json.dumps(rows, indent=2))
    (OUT / "bench_train.md").write_text("## Training throughput\n\n" + table + "\n")


if __name__ == "__main__":
    main()
