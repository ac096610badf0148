"""Training metrics: FLOPs per token counted from the model's shapes, MFU, and the run's metric sinks
(JSONL always, wandb when enabled, a progress bar) on rank 0.

``metrics.jsonl`` holds one JSON object per line: ``{"kind": "train", "step": ...}`` for optimizer
steps, ``{"kind": "val", ...}`` for validation and ``{"kind": "config", "step", "key", "was", "now"}`` for a
config key a resume changed (from the step after ``step``). After a resume, lines past the checkpoint's step
(and config lines at it, which the resume records again) are dropped first, so the file has every step exactly
once.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from models.config import ModelConfig
from models.registry import get_arch

log = logging.getLogger(__name__)

# Dense peak FLOP/s per device, (bf16, fp32). Matched by substring of torch.cuda.get_device_name().
PEAK_FLOPS = {
    "H200": (989e12, 67e12),
    "H100": (989e12, 67e12),
    "A100": (312e12, 19.5e12),
    "L40S": (362e12, 91.6e12),
    "A10G": (125e12, 31.2e12),
    "V100": (125e12, 15.7e12),
}


def forward_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    """Forward FLOPs per token (multiply-add = 2), counted op by op from the layer shapes by the architecture's
    registry entry (models/archs.py). ``seq_len`` is the attention context of a Transformer (None leaves its
    attention scores out); recurrent architectures ignore it."""
    return get_arch(cfg.arch).flops_per_token(cfg, seq_len)


def train_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    """Forward + backward (backward = 2x forward)."""
    return 3 * forward_flops_per_token(cfg, seq_len)


def peak_flops(device_name: str, dtype: str) -> float | None:
    for key, (bf16, fp32) in PEAK_FLOPS.items():
        if key in device_name:
            return bf16 if dtype == "bf16" else fp32
    return None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSONL file; a torn line (a crash mid-write) is dropped with a warning, never fatal."""
    p = Path(path)
    if not p.is_file():
        return []
    records = []
    for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s line %d is torn or corrupt (a crash mid-write?): dropped", p, n)
    return records


class MetricsSink:
    """Rank-0 metric output: JSONL file, optional wandb run (resumed under the same id; ``wandb_args`` such as
    entity, group and tags go to wandb.init)."""

    def __init__(self, run_dir: Path, config: dict[str, Any], wandb_mode: str, project: str,
                 resume_step: int, enabled: bool, wandb_args: dict[str, Any] | None = None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.wandb = None
        if not enabled:
            return
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) < resume_step
                or (r.get("step", 0) == resume_step and r.get("kind") != "config")]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)
        self.file = self.path.open("a")
        if wandb_mode != "disabled":
            import wandb

            id_file = run_dir / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
            id_file.write_text(run_id)
            self.wandb = wandb.init(project=project, name=run_dir.name, id=run_id, resume="allow",
                                    mode=wandb_mode, dir=str(run_dir), config=config, **(wandb_args or {}))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None and record.get("kind") != "config":  # wandb's run config is the new recipe
            kind = record.get("kind", "train")
            self.wandb.log({f"{kind}/{k}": v for k, v in record.items() if k not in ("kind", "step")},
                           step=record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.wandb is not None:
                self.wandb.finish()


def loss_summary(run_dir: Path, points: int = 6) -> str:
    """``step 1 8.31 -> step 40 6.02 -> ...``: the training loss at a few evenly spaced steps."""
    train = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "train" and r["loss"] is not None]
    if not train:
        return "no finite training loss logged"
    picks = sorted({round(i * (len(train) - 1) / max(points - 1, 1)) for i in range(points)})
    return " -> ".join(f"step {train[i]['step']} {train[i]['loss']:.3f}" for i in picks)


def plot_loss(run_dir: Path) -> Path | None:
    """``RUN/loss.png``: training and validation loss against step (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from tokenizer.atomic import write_atomically

    records = read_jsonl(run_dir / "metrics.jsonl")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for kind, key, style in (("train", "loss", "-"), ("val", "val_loss", "o-")):
        pts = [(r["step"], r[key]) for r in records if r["kind"] == kind and r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), style, label=kind, markersize=3)
    ax.set(xlabel="step", ylabel="loss", title=run_dir.name)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = write_atomically(run_dir / "loss.png", lambda p: fig.savefig(p, dpi=120), folder=False)
    plt.close(fig)
    return out
