"""The training loop: DeepSpeed steps over resumable data, schedules, validation, checkpoints, signals.

State contract (what a checkpoint restores, nothing else): :class:`TrainState` (step, consumed samples,
tokens seen, skipped non-finite steps) in DeepSpeed's client_state, the model/optimizer in DeepSpeed's
files, per-rank RNG beside them. The loader's position is ``consumed_samples``; the learning rate is a
pure function of the step. So a run stopped at step k and resumed takes the same steps, bit for bit, as
one that never stopped.

One writer per run: rank 0 holds ``RUN/train.lock`` (pretrain/runlock.py) for the life of the job, and
everything that can be validated (config, data, vocabulary, checkpoint compatibility, metrics) is checked
before anything in the run directory is written.

Exit codes: 0 done; :data:`EXIT_PREEMPTED` after a SIGTERM/SIGUSR1 checkpoint (requeue to resume);
:data:`EXIT_NONFINITE` when ``logging.max_nonfinite_steps`` non-finite steps came in a row (the last good
checkpoint is left as it was); 2 for bad input, a held lock or a failed save (one line on stderr).
``RUN/status.json`` records the outcome for launchers (torchrun reports any non-zero worker exit as 1).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from models.build import build_model
from pretrain import checkpoint as ckpt
from pretrain.config import TrainConfig, resolve_precision
from pretrain.data import DistributedSampleLoader, PackedDataset, TokenShards
from pretrain.engine import build_engine, grad_accumulation_steps, init_distributed, set_lr
from pretrain.metrics import MetricsSink, loss_summary, peak_flops, plot_loss, train_flops_per_token
from pretrain.runlock import RunLock
from pretrain.schedule import lr_at, make_budget

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpointed after a signal; run again to resume
EXIT_NONFINITE = 3

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    consumed_samples: int = 0  # global samples drawn (all ranks)
    tokens_seen: int = 0
    nonfinite_skipped: int = 0


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.env = init_distributed(cfg)
        cfg.precision.dtype = resolve_precision(cfg.precision.dtype, self.env.device.type)  # the run records it
        self.is_main = self.env.rank == 0
        self.run_dir = cfg.run.dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.lock = self._lock_run()
        torch.manual_seed(cfg.run.seed)

        expected_fp = None
        if cfg.data.tokenizer:
            from tokenizer import Tokenizer

            expected_fp = Tokenizer.load(cfg.data.tokenizer).fingerprint
        train_tokens = TokenShards(cfg.data.path, "train", expected_fp, cfg.data.verify_checksums)
        if train_tokens.vocab_size > cfg.model.vocab_size:
            raise ValueError(
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's tokenizer vocabulary "
                f"({train_tokens.vocab_size}): set model.vocab_size to {train_tokens.vocab_size}"
            )
        train_tokens.check_vocab(cfg.model.vocab_size)
        self.train_data = PackedDataset(train_tokens, cfg.data.seq_len, cfg.model.vocab_size)
        self.val_data = self._val_dataset(expected_fp)
        manifest = Path(cfg.data.path) / "manifest.json"
        self.meta = {
            "config": cfg.to_dict(),
            "tokenizer_fingerprint": train_tokens.manifest["tokenizer"]["fingerprint"],
            "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest(),
            "world_size": self.env.world_size,
            "hardware": f"{self.env.world_size} x "
                        f"{torch.cuda.get_device_name() if self.env.device.type == 'cuda' else 'CPU process'}",
        }
        resume_tag = ckpt.resume_tag(self.ckpt_dir) if self.is_main else None
        resume_tag = self._broadcast(resume_tag)  # one decision, logged once
        self.resume_from = self.last_tag = resume_tag
        resize = False
        if resume_tag is not None:  # refuse before anything is built or written
            saved = ckpt.read_state(self.ckpt_dir, resume_tag)
            ckpt.check_compatible(saved, self.meta, self.ckpt_dir / resume_tag)
            if saved.get("manifest_sha256") != self.meta["manifest_sha256"]:
                log.warning("the data at %s changed since %s: the resumed run will not see the same samples",
                            cfg.data.path, resume_tag)
            resize = saved["world_size"] != self.env.world_size and cfg.distributed.zero_stage in (1, 2)

        model = build_model(cfg.model)
        self.budget = make_budget(cfg, model.num_parameters())
        self.grad_accum = grad_accumulation_steps(cfg, self.env.world_size)
        self.engine = build_engine(cfg, model, self.env, load_universal=resize)
        self.loader = DistributedSampleLoader(self.train_data, cfg.data.micro_batch_size, self.env.rank,
                                              self.env.world_size, cfg.run.seed)
        self.state = TrainState()
        if resume_tag is not None:
            client = ckpt.load(self.engine, self.ckpt_dir, resume_tag, self.env.rank, universal=resize)
            self.state = TrainState(**client["trainer"])
            self.loader.load_state_dict({"consumed_samples": self.state.consumed_samples, "seed": cfg.run.seed})
            self._print(f"resumed from {self.ckpt_dir / resume_tag} (step {self.state.step})")
        # everything is validated and loaded: only now is the run directory written
        if self.is_main:
            self.lock.record()
        lc = cfg.logging
        self.metrics = MetricsSink(self.run_dir, cfg.to_dict(), lc.wandb, lc.wandb_project, self.state.step,
                                   enabled=self.is_main, wandb_args={"entity": lc.wandb_entity,
                                                                     "group": lc.wandb_group, "tags": lc.wandb_tags})
        if self.is_main:
            ckpt.atomic_write(self.run_dir / "config.yaml", cfg.to_yaml())
        self.flops_per_token = train_flops_per_token(cfg.model, cfg.data.seq_len)
        device_name = torch.cuda.get_device_name() if self.env.device.type == "cuda" else "cpu"
        self.peak = peak_flops(device_name, cfg.precision.dtype)
        self._signal: int | None = None  # set by the handler on this rank
        self._stop = False  # set identically on every rank from the all-reduced signal flags

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
            raise RuntimeError(error)
        return lock

    def _broadcast(self, value):
        """Rank 0's ``value`` on every rank."""
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def _val_dataset(self, expected_fp: str | None) -> PackedDataset | None:
        try:
            tokens = TokenShards(self.cfg.data.path, "val", expected_fp)
        except ValueError as e:  # no val split
            log.warning("no validation: %s", e)
            return None
        tokens.check_vocab(self.cfg.model.vocab_size)
        try:
            return PackedDataset(tokens, self.cfg.data.seq_len, self.cfg.model.vocab_size)
        except ValueError as e:  # shorter than one window
            log.warning("no validation: %s", e)
            return None

    # ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """DeepSpeed's client_state: the trainer state plus what it was trained with (config, tokenizer
        fingerprint, data manifest hash, world size). Per-rank RNG lives in rng_rank{r}.pt beside it."""
        return {"trainer": asdict(self.state), "meta": self.meta}

    def _print(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)

    def _autocast(self):
        if self.cfg.precision.dtype == "bf16":
            return torch.autocast(self.env.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _on_signal(self, signum, frame) -> None:
        self._signal = signum

    def _all_sum(self, *values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.env.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    # ------------------------------------------------------------------------------------------------
    def train_step(self) -> tuple[float, bool]:
        """One optimizer step over ``grad_accum`` micro-batches. Returns (mean loss, finite).

        A non-finite loss on any rank makes the step a no-op for the parameters: that micro-batch
        back-propagates a zero loss (keeping DeepSpeed's accumulation in step on every rank) and the
        step runs at learning rate 0 (so weight decay does nothing either). The host waits for the device
        once per step: losses and flags stay on the device until one all-reduce before the optimizer step."""
        s = self.state
        lr = lr_at(s.step, self.cfg, self.budget)
        inject = (s.step + 1) in self.cfg.debug.inject_nonfinite_steps
        totals = torch.zeros(3, dtype=torch.float64, device=self.env.device)  # loss sum, non-finite count, signal
        for micro in range(self.grad_accum):
            x, y = (t.to(self.env.device, non_blocking=True) for t in next(self.loader))
            with self._autocast():
                loss = self.engine(x, labels=y, return_logits=False).loss
            if inject:
                loss = loss + math.nan  # a non-finite value with a clean graph, like an overflow in the reduction
            ok = torch.isfinite(loss)
            self.engine.backward(torch.where(ok, loss, loss.nan_to_num(0.0, 0.0, 0.0) * 0.0))
            totals[0] += torch.where(ok, loss.detach().double(), 0.0)
            totals[1] += (~ok).double()
            if micro < self.grad_accum - 1:
                self.engine.step()  # accumulation only: DeepSpeed steps the optimizer at the boundary
        totals[2] = float(self._signal is not None)
        torch.distributed.all_reduce(totals)
        loss_sum, bad, stop = totals.tolist()  # the step's one host sync
        self._stop |= bool(stop)  # agreed by all ranks: a signal anywhere stops everyone after this step
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
        return (loss_sum / (self.grad_accum * self.env.world_size) if finite else math.nan), finite

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        """Mean loss over the first ``eval.batches x micro x world`` validation windows, in stream order."""
        if self.val_data is None:
            return None
        self.engine.eval()
        world = self.env.world_size
        n = min(self.val_data.num_samples, self.cfg.eval.batches * self.cfg.data.micro_batch_size * world)
        n -= n % world  # equal work per rank (ZeRO-3 forwards are collective)
        if n == 0:
            return None
        mine = list(range(self.env.rank, n, world))
        total, count = 0.0, 0
        for i in range(0, len(mine), self.cfg.data.micro_batch_size):
            batch = torch.stack([torch.from_numpy(self.val_data.window(j).astype("int64"))
                                 for j in mine[i : i + self.cfg.data.micro_batch_size]]).to(self.env.device)
            with self._autocast():
                loss = self.engine(batch[:, :-1], labels=batch[:, 1:], return_logits=False).loss
            total += loss.item() * batch.numel()
            count += batch.numel()
        self.engine.train()
        total, count = self._all_sum(total, count)
        loss = total / max(count, 1)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    def save(self) -> None:
        """Checkpoint now; a failed save stops the run with status.json saying why (nothing is lost but
        the steps since the previous checkpoint, which stays as it was)."""
        try:
            self.last_tag = ckpt.save(self.engine, self.ckpt_dir, self.state.step, self.state_dict(), self.meta,
                                      self.cfg.checkpoint.keep_last, self.env.rank, parent=self.last_tag,
                                      protect=self.resume_from,
                                      fail=self.state.step == self.cfg.debug.fail_save_at_step)
        except ckpt.CheckpointSaveError as e:
            self._write_status("save_failed", reason=str(e))
            raise

    def fit(self) -> int:
        cfg, s = self.cfg, self.state
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        b = self.budget
        self._print(
            f"run {self.run_dir}: {b.params:,} params, {b.steps:,} steps x {b.tokens_per_step:,} tokens "
            f"= {b.tokens:,} tokens ({b.tokens_per_param:.1f}/param), world {self.env.world_size}, "
            f"grad accum {self.grad_accum}, ZeRO-{cfg.distributed.zero_stage}, {cfg.precision.dtype}"
        )
        if s.step >= b.steps:
            self._print(f"run already finished at step {s.step}: nothing to do (start a new run.name to retrain)")
            self._write_status("finished")
            self._final_report()
            return 0
        bar = None
        if self.is_main and cfg.logging.progress_bar:
            from tqdm import tqdm

            bar = tqdm(total=b.steps, initial=s.step, desc="train", dynamic_ncols=True)
        nonfinite_run, t_last = 0, time.perf_counter()
        try:
            while s.step < b.steps:
                loss, finite = self.train_step()
                nonfinite_run = 0 if finite else nonfinite_run + 1
                s.nonfinite_skipped += not finite
                now = time.perf_counter()
                dt, t_last = now - t_last, now
                record = self._train_record(loss, dt)
                self.metrics.log(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}")
                if nonfinite_run >= cfg.logging.max_nonfinite_steps:
                    self._print(f"stopping: {nonfinite_run} non-finite steps in a row at step {s.step}; "
                                f"the last good checkpoint is {ckpt.latest_tag(self.ckpt_dir)}")
                    self._write_status("nonfinite")
                    return EXIT_NONFINITE
                if cfg.eval.every and s.step % cfg.eval.every == 0 and s.step < b.steps:
                    self._log_val()
                if s.step == cfg.debug.signal_at_step and self.is_main:
                    os.kill(os.getpid(), signal.SIGTERM)  # exercises the real preemption path
                if self._stop:
                    if nonfinite_run == 0:
                        self.save()
                    self._print(f"stop signal: checkpointed at step {s.step}, exiting {EXIT_PREEMPTED}")
                    self._write_status("preempted")
                    return EXIT_PREEMPTED
                if s.step % cfg.checkpoint.every == 0 and s.step < b.steps and nonfinite_run == 0:
                    self.save()
        finally:
            if bar is not None:
                bar.close()
        self.save()
        self._write_status("finished")
        self._final_report()
        return 0

    def _write_status(self, state: str, reason: str | None = None) -> None:
        """RUN/status.json: how the last invocation ended (finished | preempted | nonfinite | save_failed,
        with the reason); launchers (launch/slurm/train.sbatch) read it to decide whether to requeue."""
        if self.is_main:
            status = {"state": state, "step": self.state.step, **({"reason": reason} if reason else {})}
            try:
                ckpt.atomic_write(self.run_dir / "status.json", json.dumps(status))
            except OSError as e:  # a full disk must not hide the reason the run stopped
                log.warning("could not write %s: %s", self.run_dir / "status.json", e)

    def _train_record(self, loss: float, dt: float) -> dict:
        s = self.state
        tokens_per_s = self.budget.tokens_per_step / dt
        record = {
            "kind": "train", "step": s.step, "loss": loss if math.isfinite(loss) else None,
            "lr": lr_at(s.step - 1, self.cfg, self.budget),
            "grad_norm": self.engine.get_global_grad_norm(), "tokens_seen": s.tokens_seen,
            "consumed_samples": s.consumed_samples, "tokens_per_s": tokens_per_s, "step_time_s": dt,
            "nonfinite_skipped": s.nonfinite_skipped,
            "mfu": (tokens_per_s * self.flops_per_token / (self.peak * self.env.world_size)) if self.peak else None,
        }
        if self.env.device.type == "cuda":
            record["max_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        if isinstance(record["grad_norm"], torch.Tensor):
            record["grad_norm"] = record["grad_norm"].item()
        return record

    def _log_val(self) -> dict | None:
        val = self.evaluate()
        if val is not None:
            self.metrics.log({"kind": "val", "step": self.state.step, **val})
            self._print(f"step {self.state.step}: val loss {val['val_loss']:.4f}, perplexity {val['val_ppl']:.2f}")
        return val

    def _final_report(self) -> None:
        self._log_val()
        if self.is_main:
            self._print(f"loss: {loss_summary(self.run_dir)}")
            plot = plot_loss(self.run_dir)
            if plot is not None:
                self._print(f"loss curve: {plot}")
        # ZeRO-3 partitions the weights, so a rank-0-only generation would hang; export first then.
        if self.is_main and self.cfg.data.tokenizer and self.cfg.distributed.zero_stage < 3:
            self._print("sample: " + self.sample(self.sample_prompt(), 60))

    def sample_prompt(self) -> str:
        """``logging.sample_prompt``, else the first non-empty line of the first validation (or training)
        document, cut at a word to at most 16 tokens: a prompt in the style of the data, whatever the data is."""
        from tokenizer import Tokenizer

        if self.cfg.logging.sample_prompt:
            return self.cfg.logging.sample_prompt
        tok, shards = Tokenizer.load(self.cfg.data.tokenizer), (self.val_data or self.train_data).tokens
        ids = [int(i) for i in shards.read(0, min(512, shards.num_tokens))]
        while ids and ids[0] == tok.eos_id:  # documents are joined with EOS
            ids = ids[1:]
        text = tok.decode(ids[: ids.index(tok.eos_id)] if tok.eos_id in ids else ids)
        words = next((line for line in text.splitlines() if line.strip()), text).split(" ")
        fits = [k for k in range(1, len(words) + 1) if len(tok.encode(" ".join(words[:k]))) <= 16]
        return " ".join(words[: fits[-1]]) if fits else tok.decode(tok.encode(words[0])[:16])

    def sample(self, prompt: str, max_new_tokens: int) -> str:
        """A short sample from the current weights (rank 0, temperature 0.8, top-k 50, fixed seed)."""
        from tokenizer import Tokenizer

        tok = Tokenizer.load(self.cfg.data.tokenizer)
        model = self.engine.module
        ids = torch.tensor([tok.encode(prompt)], device=self.env.device)
        gen = torch.Generator(device=self.env.device).manual_seed(0)
        model.eval()
        with self._autocast():
            out = model.generate(ids, max_new_tokens, temperature=0.8, top_k=50, eos_token_id=tok.eos_id,
                                 generator=gen)
        model.train()
        return prompt + tok.decode(out[0, ids.shape[1]:].tolist())


def train(cfg: TrainConfig) -> int:
    try:
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

