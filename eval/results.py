"""Where evaluation results are kept: the checkpoint's eval folder (``RUN/eval/step-N/``, or ``EXPORT/eval/``)
under timestamped names, as lm-eval names its result files, so a later evaluation never overwrites an
earlier one; and the NIAH evaluation that `polar eval niah` and `polar eval sweep` share."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path


def timestamp() -> str:
    """lm-eval's result-file stamp (``lm_2026-12-01T14-36-48.164898.json``), to the microsecond."""
    return datetime.now().isoformat().replace(":", "-")


def evaluate_niah(checkpoint: str | Path, step: int | None, cfg, tokenizer: str | None = None,
                  out: str | Path | None = None, progress: bool = True) -> tuple[dict, dict[str, Path]]:
    """Run the NIAH grid ``cfg`` on a checkpoint and write ``niah_<timestamp>.{json,csv,png}`` to ``out``
    (default: its eval folder). The JSON records the checkpoint, its step and the time."""
    from eval.loading import load_for_eval
    from eval.niah import run_niah, write_niah
    from pretrain import checkpoint as ckpt
    from pretrain.export import checkpoint_location, eval_folder

    loc = checkpoint_location(checkpoint, step)
    step = None if loc is None else ckpt.step_of(loc[1])
    model, tok = load_for_eval(checkpoint, step, tokenizer)
    result = {"checkpoint": str(checkpoint), "checkpoint_step": step, "date": time.time(),
              **run_niah(model, tok, cfg, progress=progress)}
    title = Path(checkpoint).resolve().name + ("" if step is None else f", step {step}")
    paths = write_niah(result, Path(out) if out else eval_folder(checkpoint, step), title, f"niah_{timestamp()}")
    return result, paths
