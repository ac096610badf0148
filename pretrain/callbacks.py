"""The built-in training callbacks (the interface is pretrain/hooks.py) and the order the loop calls them in.

The order is part of the crash-safety contract. A step's metrics line and its validation line are written
before its checkpoint, so a process that dies right after a checkpoint has lost nothing: the resumed run
starts after that step and keeps every line up to it. The non-finite stop comes before validation and
checkpoints (a diverged step is neither evaluated nor saved), and preemption before the interval checkpoint
(the stop saves once, at the end).
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING, Any

import torch

from pretrain.checkpoint import CheckpointSaveError
from pretrain.hooks import FINISHED, Callback, Stop
from pretrain.metrics import loss_summary, plot_loss

if TYPE_CHECKING:
    from pretrain.config import TrainConfig
    from pretrain.trainer import Trainer

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpointed after a signal; run again to resume
EXIT_NONFINITE = 3


def default_callbacks(cfg: TrainConfig, steps: int) -> list[Callback]:
    """The built-ins, in the order the loop calls them (see the module docstring)."""
    return [MetricsLogger(), Progress(cfg.logging.progress_bar), NonfiniteStop(cfg.logging.max_nonfinite_steps),
            Validation(cfg.eval.every, steps), Preemption(), Checkpointing(cfg.checkpoint.every), LossReport(),
            Sampling()]


def _finished(stop: Stop | None) -> bool:
    return stop is not None and stop.status == FINISHED.status


class MetricsLogger(Callback):
    """Each step's record to the run's metrics sink (rank 0: ``metrics.jsonl``, wandb when enabled)."""

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        trainer.metrics.log(record)


class Progress(Callback):
    """A tqdm bar over the step budget on rank 0, showing the loss and the learning rate."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar = enabled, None

    def on_fit_start(self, trainer: Trainer) -> None:
        if self.enabled and trainer.is_main:
            from tqdm import tqdm

            self.bar = tqdm(total=trainer.budget.steps, initial=trainer.state.step, desc="train", dynamic_ncols=True)

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss'] if record['loss'] is not None else float('nan'):.4f}",
                                 lr=f"{record['lr']:.2e}")

    def on_fit_end(self, trainer: Trainer, stop: Stop | None) -> None:
        if self.bar is not None:
            self.bar.close()


class NonfiniteStop(Callback):
    """``limit`` non-finite steps in a row end the run with :data:`EXIT_NONFINITE`, without a checkpoint: the
    last good one stays as it was."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row = limit, 0

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> Stop | None:
        self.in_a_row = 0 if record["loss"] is not None else self.in_a_row + 1
        if self.in_a_row < self.limit:
            return None
        return Stop(EXIT_NONFINITE, "nonfinite", f"stopping: {self.in_a_row} non-finite steps in a row at step "
                    f"{trainer.state.step}; the last good checkpoint is {trainer.checkpointer.latest()}", save=False)


class Validation(Callback):
    """The validation loss every ``every`` steps (0: none in between) and after the last step: a ``val`` record
    in the metrics, one line printed."""

    def __init__(self, every: int, steps: int):
        self.every, self.steps = every, steps

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        step = trainer.state.step
        if step != self.steps and not (self.every and step % self.every == 0):
            return
        val = trainer.evaluate()
        if val is not None:
            trainer.metrics.log({"kind": "val", "step": step, **val})
            per_source = ", ".join(f"{k.removeprefix('val_loss/')} {v:.4f}" for k, v in val.items()
                                   if k.startswith("val_loss/"))
            trainer.print(f"step {step}: val loss {val['val_loss']:.4f}, perplexity {val['val_ppl']:.2f}"
                          + (f" ({per_source})" if per_source else ""))


class Preemption(Callback):
    """SIGTERM or SIGUSR1 on any rank stops every rank after the current step (the trainer all-reduces the
    request with the step's losses), with a checkpoint unless that step was non-finite, and
    :data:`EXIT_PREEMPTED` so the launcher requeues the job. The handlers stay for the life of the process: a
    signal during the final checkpoint must not interrupt it."""

    def on_fit_start(self, trainer: Trainer) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, lambda *_: trainer.request_stop())

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> Stop | None:
        if not trainer.stop_agreed:
            return None
        return Stop(EXIT_PREEMPTED, "preempted", f"stop signal: checkpointed at step {trainer.state.step}, "
                    f"exiting {EXIT_PREEMPTED}", save=record["loss"] is not None)


class Checkpointing(Callback):
    """A checkpoint every ``every`` steps (after a finite step) and at the end when the Stop asks for one (unless
    that step is saved already). A failed save writes ``save_failed`` and the reason to ``RUN/status.json`` and
    ends the run (the previous checkpoint is untouched)."""

    def __init__(self, every: int):
        self.every = every

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if trainer.state.step % self.every == 0 and record["loss"] is not None:
            self._save(trainer)

    def on_fit_end(self, trainer: Trainer, stop: Stop | None) -> None:
        if stop is not None and stop.save and not trainer.checkpointer.holds(trainer.state.step):
            self._save(trainer)

    @staticmethod
    def _save(trainer: Trainer) -> None:
        try:
            trainer.checkpointer.save(trainer.engine, trainer.state.step, trainer.state_dict(), trainer.meta)
        except CheckpointSaveError as e:
            trainer.write_status("save_failed", reason=str(e))
            raise


class LossReport(Callback):
    """At the end of a finished run (rank 0): the loss at a few steps, the tokens drawn from each source of a mixture,
    and ``RUN/loss.png``."""

    def on_fit_end(self, trainer: Trainer, stop: Stop | None) -> None:
        if _finished(stop) and trainer.is_main:
            trainer.print(f"loss: {loss_summary(trainer.run_dir)}")
            tokens = trainer.source_tokens()
            if tokens:
                total = sum(tokens.values())
                trainer.print("tokens per source: " + ", ".join(
                    f"{k.removeprefix('tokens/')} {v:,} ({v / total:.1%})" for k, v in tokens.items()))
            plot = plot_loss(trainer.run_dir)
            if plot is not None:
                trainer.print(f"loss curve: {plot}")


class Sampling(Callback):
    """At the end of a finished run (rank 0, with a tokenizer): a short sample continuing :func:`sample_prompt`.
    ZeRO-3 partitions the weights, so a rank-0-only generation would hang: export first then."""

    def on_fit_end(self, trainer: Trainer, stop: Stop | None) -> None:
        cfg = trainer.cfg
        if _finished(stop) and trainer.is_main and cfg.data.tokenizer and cfg.distributed.zero_stage < 3:
            trainer.print("sample: " + sample(trainer, sample_prompt(trainer), 60))


def sample_prompt(trainer: Trainer) -> str:
    """``logging.sample_prompt``, else the first non-empty line of the first validation (or training)
    document, cut at a word to at most 16 tokens: a prompt in the style of the data, whatever the data is."""
    if trainer.cfg.logging.sample_prompt:
        return trainer.cfg.logging.sample_prompt
    data = next(iter(trainer.val_data.values()), None) or trainer.mixture.sources[0].dataset
    tok, shards = trainer.tokenizer, data.tokens
    ids = [int(i) for i in shards.read(0, min(512, shards.num_tokens))]
    while ids and ids[0] == tok.eos_id:  # documents are joined with EOS
        ids = ids[1:]
    text = tok.decode(ids[: ids.index(tok.eos_id)] if tok.eos_id in ids else ids)
    words = next((line for line in text.splitlines() if line.strip()), text).split(" ")
    fits = [k for k in range(1, len(words) + 1) if len(tok.encode(" ".join(words[:k]))) <= 16]
    return " ".join(words[: fits[-1]]) if fits else tok.decode(tok.encode(words[0])[:16])


def sample(trainer: Trainer, prompt: str, max_new_tokens: int) -> str:
    """A short sample from the current weights (temperature 0.8, top-k 50, fixed seed)."""
    tok = trainer.tokenizer
    model, device = trainer.engine.module, trainer.env.device
    ids = torch.tensor([tok.encode(prompt)], device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    model.eval()
    with trainer.autocast():
        out = model.generate(ids, max_new_tokens, temperature=0.8, top_k=50, eos_token_id=tok.eos_id, generator=gen)
    model.train()
    return prompt + tok.decode(out[0, ids.shape[1]:].tolist())
