"""The training loop: DeepSpeed steps over resumable data and schedules; everything around the steps (progress,
metrics, validation, checkpoints, signals, the non-finite stop, the end-of-run report) is a callback
(pretrain/hooks.py, pretrain/callbacks.py), so :meth:`Trainer.fit` is a short loop.

State contract (what a checkpoint restores, nothing else): :class:`TrainState` (step, consumed samples,
tokens seen, skipped non-finite steps) in DeepSpeed's client_state, the model/optimizer in DeepSpeed's
files, per-rank RNG beside them. The loader's position is ``consumed_samples``; the learning rate is a
pure function of the step. So a run stopped at step k and resumed takes the same steps, bit for bit, as
one that never stopped.

A resume may change the recipe outside the model and tokenizer (global batch, learning rate, schedule length,
eval interval, ...): each change is one console line, an entry in config.yaml's ``history`` and a
``{"kind": "config"}`` record in metrics.jsonl at the resumed step (pretrain/config.py).

One writer per run: rank 0 holds ``RUN/train.lock`` (pretrain/runlock.py) for the life of the job, and
everything that can be validated (config, data, vocabulary, checkpoint compatibility, metrics) is checked
before anything in the run directory is written.

Exit codes: 0 done; ``EXIT_PREEMPTED`` after a SIGTERM/SIGUSR1 checkpoint (requeue to resume);
``EXIT_NONFINITE`` when ``logging.max_nonfinite_steps`` non-finite steps came in a row (the last good
checkpoint is left as it was), both in pretrain/callbacks.py; 2 for bad input, a held lock or a failed save
(one line on stderr).
``RUN/status.json`` records the outcome for launchers (torchrun reports any non-zero worker exit as 1).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.build import build_model
from pretrain import checkpoint as ckpt
from pretrain.about import code_version
from pretrain.callbacks import default_callbacks
from pretrain.config import TrainConfig, recipe_changes, resolve_precision, run_config_yaml
from pretrain.data import DataError, DistributedSampleLoader, PackedDataset, TokenShards
from pretrain.engine import build_engine, grad_accumulation_steps, init_distributed, set_lr
from pretrain.hooks import FINISHED, registered_callbacks
from pretrain.init_from import adopt_recorded_source, initial_weights
from pretrain.metrics import MetricsSink, peak_flops, train_flops_per_token
from pretrain.mixture import Mixture, Source
from pretrain.runlock import RunLock, RunLockedError, removed_if_refused
from pretrain.schedule import lr_at, make_budget

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    consumed_samples: int = 0  # global samples drawn (all ranks)
    tokens_seen: int = 0
    nonfinite_skipped: int = 0


class Trainer:
    """One run on this rank: validates and resumes in ``__init__`` (nothing is written before everything is
    checked), then :meth:`fit`. Callbacks use its public attributes and methods."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.env = init_distributed(cfg)
        cfg.precision.dtype = resolve_precision(cfg.precision.dtype, self.env.device.type)  # the run records it
        self.is_main = self.env.rank == 0
        self.run_dir = cfg.run.dir
        self.checkpointer = ckpt.Checkpointer(self.run_dir / "checkpoints", self.env.rank, cfg.checkpoint.keep_last)
        self.lock = self._lock_run()
        torch.manual_seed(cfg.run.seed)

        self.tokenizer = None  # data.tokenizer, any kind (tokenizer/load.py): checked against the data's fingerprint
        if cfg.data.tokenizer:
            from tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        expected_fp = self.tokenizer and self.tokenizer.fingerprint
        self.mixture = self._mixture(expected_fp)
        self.val_data = self._val_datasets(expected_fp)
        ckpt_dir = self.checkpointer.dir
        resume_tag = self._broadcast(self.checkpointer.resume_tag() if self.is_main else None)  # decided, logged once
        fingerprint = self.mixture.sources[0].dataset.tokens.manifest["tokenizer"]["fingerprint"]
        init_weights = None
        if resume_tag is not None:  # a resumed run's weights are its own checkpoint's, never the source's again
            adopt_recorded_source(cfg.model, ckpt.read_state(ckpt_dir, resume_tag)["config"]["model"])
        elif cfg.model.init_from.path:
            init_weights, cfg.model.init_from = initial_weights(cfg.model, fingerprint, cfg.run.seed)
        self.meta = {
            "config": cfg.to_dict(),
            "tokenizer_fingerprint": fingerprint,
            "manifest_sha256": self._data_hash(),
            "world_size": self.env.world_size,
            "code_version": code_version(),  # the model card names the code that trained the weights
            "hardware": f"{self.env.world_size} x "
                        f"{torch.cuda.get_device_name() if self.env.device.type == 'cuda' else 'CPU process'}",
        }
        resize, changes = False, []
        if resume_tag is not None:  # refuse before anything is built or written
            saved = ckpt.read_state(ckpt_dir, resume_tag)
            ckpt.check_compatible(saved, self.meta, ckpt_dir / resume_tag)
            changes = recipe_changes(saved["config"], self.meta["config"])
            if saved.get("manifest_sha256") != self.meta["manifest_sha256"]:
                log.warning("the data (%s) changed since %s: the resumed run will not see the same samples",
                            ", ".join(s.path for s in cfg.data.source_list()), resume_tag)
            resize = saved["world_size"] != self.env.world_size and cfg.distributed.zero_stage in (1, 2)

        model = build_model(cfg.model)
        if cfg.data.document_boundaries == "reset" and not model.document_resets:
            raise ValueError(f"data.document_boundaries: reset needs an architecture whose layers reset at document "
                             f"boundaries; model.arch {cfg.model.arch} does not: use data.document_boundaries: carry")
        if init_weights is not None:
            model.load_state_dict(init_weights)
            self.print(f"initialised from {cfg.model.init_from.path} ({cfg.model.init_from.revision or 'local'}, "
                       f"weights sha256 {cfg.model.init_from.sha256[:12]})")
        self.budget = make_budget(cfg, model.num_parameters())
        self.grad_accum = grad_accumulation_steps(cfg, self.env.world_size)
        self.engine = build_engine(cfg, model, self.env, load_universal=resize)
        self.loader = DistributedSampleLoader(self.mixture, cfg.data.micro_batch_size, self.env.rank,
                                              self.env.world_size, cfg.run.seed,
                                              document_boundaries=cfg.data.document_boundaries)
        self.state = TrainState()
        if resume_tag is not None:
            client = self.checkpointer.load(self.engine, resume_tag, universal=resize)
            self.state = TrainState(**client["trainer"])
            self.loader.load_state_dict({"consumed_samples": self.state.consumed_samples, "seed": cfg.run.seed})
            self.print(f"resumed from {ckpt_dir / resume_tag} (step {self.state.step})")
        # everything is validated and loaded: only now is the run directory written
        if self.is_main:
            self.lock.record()
        lc = cfg.logging
        self.metrics = MetricsSink(self.run_dir, cfg.to_dict(), lc.wandb, lc.wandb_project, self.state.step,
                                   enabled=self.is_main, wandb_args={"entity": lc.wandb_entity,
                                                                     "group": lc.wandb_group, "tags": lc.wandb_tags})
        if self.is_main:
            ckpt.atomic_write(self.run_dir / "config.yaml",
                              run_config_yaml(cfg, self.run_dir / "config.yaml", self.state.step, changes))
        for key, was, now in changes:  # a changed recipe is recorded: console, config.yaml history, metrics
            self.print(f"resumed with {key} changed from {was!r} to {now!r} (from step {self.state.step + 1})")
            self.metrics.log({"kind": "config", "step": self.state.step, "key": key, "was": was, "now": now})
        self.flops_per_token = train_flops_per_token(cfg.model, cfg.data.seq_len)
        device_name = torch.cuda.get_device_name() if self.env.device.type == "cuda" else "cpu"
        self.peak = peak_flops(device_name, cfg.precision.dtype)
        self.stop_requested = False  # this rank asks to checkpoint and exit (callbacks.Preemption: a signal)
        self.stop_agreed = False  # some rank asked: set on every rank by the step's all-reduce
        self.callbacks = [*default_callbacks(cfg, self.budget.steps), *registered_callbacks()]
        b = self.budget
        self.print(
            f"run {self.run_dir}: {b.params:,} params, {b.steps:,} steps x {b.tokens_per_step:,} tokens "
            f"= {b.tokens:,} tokens ({b.tokens_per_param:.1f}/param), world {self.env.world_size}, "
            f"grad accum {self.grad_accum}, ZeRO-{cfg.distributed.zero_stage}, {cfg.precision.dtype}"
        )

    def _lock_run(self) -> RunLock | None:
        """Rank 0 takes the run lock; every rank fails with the holder named when it is taken."""
        lock, error = None, ""
        if self.is_main:
            try:
                lock = RunLock(self.run_dir).acquire()
            except RuntimeError as e:
                error = str(e)
        error = self._broadcast(error)
        if error:
            raise RunLockedError(error)
        return lock

    def _broadcast(self, value):
        """Rank 0's ``value`` on every rank."""
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def _mixture(self, expected_fp: str | None) -> Mixture:
        """The training sources (data.sources, or data.path as one), each checked against the tokenizer and the
        model's vocabulary, as the weighted mixture the loader draws from."""
        cfg, sources = self.cfg, []
        for src in cfg.data.source_list():
            tokens = TokenShards(src.path, "train", expected_fp, cfg.data.verify_checksums)
            if tokens.vocab_size > cfg.model.vocab_size:
                raise ValueError(
                    f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's tokenizer vocabulary "
                    f"({tokens.vocab_size}): set model.vocab_size to {tokens.vocab_size}"
                )
            tokens.check_vocab(cfg.model.vocab_size)
            if cfg.data.document_boundaries == "reset":
                tokens.document_ends()  # refuses data prepared without document indexes, naming the fix
            sources.append(Source(src.label, src.weight, PackedDataset(tokens, cfg.data.seq_len, cfg.model.vocab_size)))
        return Mixture(sources, cfg.run.seed)

    def _val_datasets(self, expected_fp: str | None) -> dict[str, PackedDataset]:
        """Each source's validation split, by source name (a source without one, or shorter than a window, is left
        out with a warning)."""
        out = {}
        for src in self.cfg.data.source_list():
            try:
                tokens = TokenShards(src.path, "val", expected_fp)
            except DataError as e:  # no val split
                log.warning("no validation for %s: %s", src.label, e)
                continue
            tokens.check_vocab(self.cfg.model.vocab_size)
            try:
                out[src.label] = PackedDataset(tokens, self.cfg.data.seq_len, self.cfg.model.vocab_size)
            except DataError as e:  # shorter than one window
                log.warning("no validation for %s: %s", src.label, e)
        return out

    def _data_hash(self) -> str:
        """sha256 of the data manifest (one source) or of every source's name, weight and manifest hash (a
        mixture): a resume on other data or weights is warned about."""
        def manifest_hash(path: str) -> str:
            return hashlib.sha256((Path(path) / "manifest.json").read_bytes()).hexdigest()

        sources = self.cfg.data.source_list()
        if len(sources) == 1:
            return manifest_hash(sources[0].path)
        listing = [[s.label, s.weight, manifest_hash(s.path)] for s in sources]
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()

    # ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """DeepSpeed's client_state: the trainer state plus what it was trained with (config, tokenizer
        fingerprint, data manifest hash, world size). Per-rank RNG lives in rng_rank{r}.pt beside it."""
        return {"trainer": asdict(self.state), "meta": self.meta}

    def print(self, msg: str) -> None:
        """A line on the terminal, from rank 0 only."""
        if self.is_main:
            print(msg, flush=True)

    def autocast(self):
        if self.cfg.precision.dtype == "bf16":
            return torch.autocast(self.env.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def request_stop(self) -> None:
        """Stop every rank after the current step with a checkpoint (safe in a signal handler)."""
        self.stop_requested = True

    def _all_sum(self, *values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.env.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    # ------------------------------------------------------------------------------------------------
    def step(self) -> dict[str, Any]:
        """One optimizer step; returns its metrics record (``loss`` None when the step was non-finite)."""
        start = time.perf_counter()
        loss = self.train_step()
        return self._train_record(loss, time.perf_counter() - start)

    def train_step(self) -> float:
        """One optimizer step over ``grad_accum`` micro-batches. Returns the mean loss (NaN when non-finite).

        A non-finite loss on any rank makes the step a no-op for the parameters: that micro-batch
        back-propagates a zero loss (keeping DeepSpeed's accumulation in step on every rank) and the
        step runs at learning rate 0 (so weight decay does nothing either). The host waits for the device
        once per step: losses and flags stay on the device until one all-reduce before the optimizer step."""
        s = self.state
        lr = lr_at(s.step, self.cfg, self.budget)
        totals = torch.zeros(3, dtype=torch.float64, device=self.env.device)  # loss sum, non-finite count, stop
        for micro in range(self.grad_accum):
            x, y, *documents = (t.to(self.env.device, non_blocking=True) for t in next(self.loader))
            with self.autocast():
                loss = self.engine(x, labels=y, return_logits=False, **self._documents(documents)).loss
            for cb in self.callbacks:
                loss = cb.on_loss(self, loss)
            ok = torch.isfinite(loss)
            self.engine.backward(torch.where(ok, loss, loss.nan_to_num(0.0, 0.0, 0.0) * 0.0))
            totals[0] += torch.where(ok, loss.detach().double(), 0.0)
            totals[1] += (~ok).double()
            if micro < self.grad_accum - 1:
                self.engine.step()  # accumulation only: DeepSpeed steps the optimizer at the boundary
        totals[2] = float(self.stop_requested)
        torch.distributed.all_reduce(totals)
        loss_sum, bad, stop = totals.tolist()  # the step's one host sync
        self.stop_agreed |= bool(stop)  # a request on any rank stops everyone after this step
        finite = bad == 0
        if not finite and self.cfg.distributed.zero_stage == 0:
            # ZeRO-1..3 skip a step whose gradient norm is not finite by themselves; without ZeRO, zero the
            # gradients (which may hold NaN) so the lr-0 AdamW step leaves the parameters alone.
            self.engine.module.zero_grad(set_to_none=False)
        set_lr(self.engine, lr if finite else 0.0)
        self.engine.step()
        s.step += 1
        s.consumed_samples = self.loader.consumed_samples
        s.tokens_seen += self.budget.tokens_per_step
        s.nonfinite_skipped += not finite
        return loss_sum / (self.grad_accum * self.env.world_size) if finite else math.nan

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        """Validation loss: per source, the mean over its first ``eval.batches x micro x world`` validation windows
        in stream order; ``val_loss`` is the one source's, or for a mixture the share-weighted mean over the
        sources with validation data, beside ``val_loss/NAME`` per source."""
        losses = {name: loss for name, ds in self.val_data.items() if (loss := self._val_loss(ds)) is not None}
        if not losses:
            return None
        shares = dict(zip(self.mixture.names, self.mixture.shares, strict=True))
        total = sum(shares[n] for n in losses)
        loss = sum(shares[n] * v for n, v in losses.items()) / total
        per_source = {f"val_loss/{n}": v for n, v in losses.items()} if len(self.mixture.sources) > 1 else {}
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), **per_source}

    def _val_loss(self, data: PackedDataset) -> float | None:
        world = self.env.world_size
        n = min(data.num_samples, self.cfg.eval.batches * self.cfg.data.micro_batch_size * world)
        n -= n % world  # equal work per rank (ZeRO-3 forwards are collective)
        if n == 0:
            return None
        self.engine.eval()
        mine = list(range(self.env.rank, n, world))
        total, count = 0.0, 0
        for i in range(0, len(mine), self.cfg.data.micro_batch_size):
            windows = mine[i : i + self.cfg.data.micro_batch_size]
            batch = torch.stack([torch.from_numpy(data.window(j).astype("int64")) for j in windows]).to(self.env.device)
            documents = []
            if self.cfg.data.document_boundaries == "reset":  # validated as trained: resets at its documents
                documents = [torch.from_numpy(np.stack([data.seq_idx(j) for j in windows])).to(self.env.device)]
            with self.autocast():
                loss = self.engine(batch[:, :-1], labels=batch[:, 1:], return_logits=False,
                                   **self._documents(documents)).loss
            total += loss.item() * batch.numel()
            count += batch.numel()
        self.engine.train()
        total, count = self._all_sum(total, count)
        return total / max(count, 1)

    @staticmethod
    def _documents(documents: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The forward's ``seq_idx`` keyword when the batch carries one (``document_boundaries: reset``); carry
        passes nothing, so its forward is exactly what it always was."""
        return {"seq_idx": documents[0]} if documents else {}

    def fit(self) -> int:
        """Steps until the budget is spent or a callback stops the run; returns the exit code. Every callback
        sees every event, in order (pretrain/hooks.py); ``RUN/status.json`` records how the run ended."""
        stop = None
        try:
            for cb in self.callbacks:
                cb.on_fit_start(self)
            while stop is None and self.state.step < self.budget.steps:
                record = self.step()
                # the first Stop ends the step: the callbacks after it are not called
                stop = next((st for cb in self.callbacks if (st := cb.on_step_end(self, record)) is not None), None)
            stop = stop or FINISHED
        finally:
            for cb in self.callbacks:
                cb.on_fit_end(self, stop)
        if stop.message:
            self.print(stop.message)
        self.write_status(stop.status)
        return stop.code

    def write_status(self, state: str, reason: str | None = None) -> None:
        """RUN/status.json: how the last invocation ended (finished | preempted | nonfinite | save_failed,
        with the reason); launchers (launch/slurm/train.sbatch) read it to decide whether to requeue."""
        if self.is_main:
            status = {"state": state, "step": self.state.step, **({"reason": reason} if reason else {})}
            try:
                ckpt.atomic_write(self.run_dir / "status.json", json.dumps(status))
            except OSError as e:  # a full disk must not hide the reason the run stopped
                log.warning("could not write %s: %s", self.run_dir / "status.json", e)

    def source_tokens(self) -> dict[str, int]:
        """``tokens/NAME``: training tokens drawn from each source so far (a mixture only; a pure function of the
        consumed samples, so exact after a resume)."""
        if len(self.mixture.sources) == 1:
            return {}
        counts = self.mixture.counts(self.state.consumed_samples) * self.cfg.data.seq_len
        return {f"tokens/{n}": int(c) for n, c in zip(self.mixture.names, counts, strict=True)}

    def _train_record(self, loss: float, dt: float) -> dict:
        s = self.state
        tokens_per_s = self.budget.tokens_per_step / dt
        record = {
            "kind": "train", "step": s.step, "loss": loss if math.isfinite(loss) else None,
            "lr": lr_at(s.step - 1, self.cfg, self.budget),
            "grad_norm": self.engine.get_global_grad_norm(), "tokens_seen": s.tokens_seen,
            "consumed_samples": s.consumed_samples, "tokens_per_s": tokens_per_s, "step_time_s": dt,
            "nonfinite_skipped": s.nonfinite_skipped, **self.source_tokens(),
            "mfu": (tokens_per_s * self.flops_per_token / (self.peak * self.env.world_size)) if self.peak else None,
        }
        if self.env.device.type == "cuda":
            record["max_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        if isinstance(record["grad_norm"], torch.Tensor):
            record["grad_norm"] = record["grad_norm"].item()
        return record


def train(cfg: TrainConfig) -> int:
    try:
        with removed_if_refused(cfg.run.dir):  # a refused run leaves no lock file or empty run folder behind
            trainer = Trainer(cfg)
    except BaseException:  # refused before training: leave no live process group (gloo aborts at exit)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        raise
    try:
        return trainer.fit()
    finally:
        trainer.metrics.close()
        torch.distributed.barrier()
        if trainer.lock is not None:
            trainer.lock.release()
        torch.distributed.destroy_process_group()

