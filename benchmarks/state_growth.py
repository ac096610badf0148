"""Why a polarized Mamba's loss climbs past its training length: the recurrent state by position.

The ones channel (a_t = 1, paper §4) is a cumulative sum h_t = Σ_{s≤t} Δ_s B_s u_s that never decays, so its
magnitude keeps growing with position while the learned channels settle at a fixed scale. Past the positions
seen in training, the ones channel's contribution C_t·h_t is out of the range the model learned. This prints,
per run, the mean |h| of the ones, learned and zeros channels (averaged over layers, channels and windows) at
the end of each power-of-two multiple of ``--every`` tokens, on windows of held-out documents (the run's
val split), prefilled ``--every`` tokens at a time.

Writes benchmarks/results/state_growth.{json,md}.
Run: PYTHONPATH=. .venv/bin/python benchmarks/state_growth.py runs/demo-cpu runs/demo-cpu-baseline --length 2k
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"


def channel_norms(states: list, mixers: list) -> dict[str, float]:
    """Mean |h| per channel group over layers and channels; the state's last axis is [ones, learned, zeros]."""
    groups: dict[str, list[float]] = {"ones": [], "learned": [], "zeros": []}
    for s, m in zip(states, mixers, strict=True):
        h = s.ssm.abs().float()
        n1, n0 = m.n_ones, m.n_zeros
        for name, part in (("ones", h[..., :n1]), ("learned", h[..., n1:h.shape[-1] - n0]),
                           ("zeros", h[..., h.shape[-1] - n0:])):
            if part.numel():
                groups[name].append(float(part.mean()))
    return {k: sum(v) / len(v) for k, v in groups.items() if v}


def measure(run: str, length: int, every: int, windows: int) -> dict:
    from eval.kinds.recency import default_data
    from eval.loading import load_for_eval
    from eval.position_loss import long_windows
    from eval.recency import held_out_tokens

    model, tok = load_for_eval(run)[:2]
    model.eval()
    mixers = [layer.mixer for layer in model.backbone.layers]
    docs = long_windows(held_out_tokens(default_data(run, None), tok), tok.eos_id, length, windows)
    marks = [every * 2**k for k in range(length.bit_length()) if every * 2**k <= length]
    sums: dict[int, dict[str, float]] = {}
    with torch.no_grad():
        for doc in docs:
            ids, states = torch.as_tensor(doc[:length])[None], model.new_states(1)
            for start in range(0, length, every):
                model.backbone(ids[:, start:start + every], states)
                if start + every in marks:
                    for k, v in channel_norms(states, mixers).items():
                        sums.setdefault(start + every, {}).setdefault(k, 0.0)
                        sums[start + every][k] += v / len(docs)
    return {"run": run, "windows": len(docs), "rows": [{"position": p, **sums[p]} for p in marks]}


def main() -> None:
    from eval.niah import parse_lengths

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories of Mamba models (polarized or not)")
    ap.add_argument("--length", default="2k", help="tokens per window, k = 1024 (default 2k)")
    ap.add_argument("--every", type=int, default=128, help="prefill chunk and first mark: the training length")
    ap.add_argument("--windows", type=int, default=8, help="held-out windows averaged (default 8)")
    args = ap.parse_args()
    (length,) = parse_lengths(args.length)
    results = [measure(r, length, args.every, args.windows) for r in args.runs]
    lines = ["| run | position | mean abs h: ones | learned | zeros |", "|---|---:|---:|---:|---:|"]
    for res in results:
        for row in res["rows"]:
            cells = [f"{row[k]:.3f}" if k in row else "—" for k in ("ones", "learned", "zeros")]
            lines.append(f"| {res['run']} | {row['position']} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    print(table, end="")
    RESULTS.mkdir(parents=True, exist_ok=True)
    from tokenizer.atomic import write_text

    write_text(RESULTS / "state_growth.json", json.dumps({"args": vars(args), "results": results}, indent=1))
    write_text(RESULTS / "state_growth.md", table)


if __name__ == "__main__":
    main()
