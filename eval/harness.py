"""The lm-eval (0.4.x) model ``polar``: any of our checkpoints scored by EleutherAI's harness, and the
evaluation behind ``polar eval lm`` (lm-eval's own `run` command, with the `polar` model registered).

``import eval.harness`` registers the model (lm-eval has no plugin discovery), then
``lm_eval.simple_evaluate(model="polar", model_args="pretrained=PATH[,step=N,batch_size=B,max_length=L]")``.
Without CUDA, lm-eval's default device (``cuda:0``) falls back to the CPU with a one-line warning.
Conventions follow lm-eval's own ``hf`` model so both score an export alike: no BOS is added, an empty
context is replaced by one prefix token (ours: EOS, the document separator the model was trained with;
pass ``prefix_token_id=3`` to ``hf`` to match), and log-probabilities are over the whole padded vocabulary.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
from pathlib import Path
from unittest import mock

import lm_eval.models  # noqa: F401  (registers the built-in models first: lm-eval only does so when none is)
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from eval.loading import hf_tokenizer_folder, load_for_eval
from pretrain import checkpoint as ckpt
from pretrain.export import checkpoint_location, eval_folder

log = logging.getLogger(__name__)


@register_model("polar")
class PolarLM(TemplateLM):
    """Loglikelihoods batched by length (one forward per batch), rolling windows of ``max_length``, and
    generation by cached decoding (Mamba: constant memory per generated token; Transformer: a KV cache)."""

    def __init__(self, pretrained: str, step: int | None = None, tokenizer: str | None = None,
                 batch_size: int | str = 8, max_length: int = 2048, max_gen_toks: int = 256,
                 device: str | None = None, dtype: str = "float32", trust_pickle: bool | str = False, **_ignored):
        super().__init__()
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            log.warning("CUDA is not available: the polar model runs on the CPU (pass --device cpu to silence this)")
            device = "cpu"
        self.step = None if step is None else int(step)
        self.model, self.tok = load_for_eval(pretrained, self.step, tokenizer, device, getattr(torch, dtype),
                                             trust_pickle=str(trust_pickle).lower() in ("1", "true"))
        self._device = next(self.model.parameters()).device
        # lm-eval passes "auto" when asked to find a batch size; a fixed default is the honest answer here.
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_length, self.max_gen_toks = int(max_length), int(max_gen_toks)

    def get_model_info(self) -> dict:
        """Recorded in the result file's ``config`` (lm-eval calls this): which checkpoint step was scored."""
        return {"checkpoint_step": self.step, "model_num_parameters": self.model.num_parameters(),
                "model_dtype": str(next(self.model.parameters()).dtype),
                "polar_model_config": self.model.config.to_dict()}

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, ids) -> str:
        return self.tok.decode(ids)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context ids, continuation ids). Longest first so each batch
        pads little; right padding is invisible to a causal model at the positions scored."""
        inputs = []
        for _, ctx, cont in requests:
            if not 0 < len(cont) <= self.max_length:
                raise ValueError(f"continuation of {len(cont)} tokens does not fit max_length={self.max_length}")
            inputs.append(((ctx + cont)[-(self.max_length + 1):][:-1], cont))
        order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i][0]))
        results: list[tuple[float, bool] | None] = [None] * len(inputs)
        bar = tqdm(total=len(order), desc="loglikelihood", disable=disable_tqdm)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            width = len(inputs[batch[0]][0])
            ids = torch.full((len(batch), width), self.tok.pad_id, dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, : len(inputs[i][0])] = torch.tensor(inputs[i][0])
            logp = F.log_softmax(self.model(ids.to(self._device)).logits.float(), dim=-1)
            for row, i in enumerate(batch):
                inp, cont = inputs[i]
                scored = logp[row, len(inp) - len(cont): len(inp)]
                target = torch.tensor(cont, device=self._device)
                answer = (float(scored.gather(-1, target[:, None]).sum()), bool((scored.argmax(-1) == target).all()))
                results[i] = answer
                if requests[i][0] is not None and requests[i][0][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            bar.update(len(batch))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood over disjoint windows of ``max_length`` tokens (lm-eval's scheme)."""
        windows, owner = [], []
        for k, req in enumerate(requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    self.tok_encode(req.args[0]), self.prefix_token_id, self.max_length, 1)):
                windows.append((None, ctx, cont))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (ll, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm), strict=True):
            totals[k] += ll
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with ``do_sample``/``temperature``) continuation, cut at the first stop string;
        with none (RULER's tasks give ``until: []``) it runs to EOS or ``max_gen_toks``. One request at a time:
        a parallel prefill of the context, then one cached step per token (Mamba's recurrent state or the
        Transformer's KV cache)."""
        from models.generation import sample_next

        out = []
        for req in tqdm(requests, desc="generate_until", disable=disable_tqdm):
            context, kwargs = req.args
            kwargs = dict(kwargs)
            until = kwargs.pop("until", None) or []
            # As lm-eval's hf model: empty stop strings are ignored (our decoded EOS is '', which would split
            # on nothing and stop after one token); EOS itself stops by id below.
            until = [s for s in ([until] if isinstance(until, str) else until) if s]
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            ids = self.tok_encode(context)[-self.max_length:] or [self.prefix_token_id]
            states = self.model.new_states(1)
            logits = self.model(torch.tensor([ids], device=self._device), states=states).logits[:, -1]
            generated: list[int] = []
            text = ""
            for _ in range(max_new):
                nxt = sample_next(logits[:, : self.model.config.vocab_size], temperature,
                                  kwargs.get("top_k"), kwargs.get("top_p"))
                if int(nxt) == self.eot_token_id:
                    break
                generated.append(int(nxt))
                text = self.tok_decode(generated)
                if any(s in text for s in until):
                    break
                logits = self.model.step(nxt, states)
            for s in until:
                text = text.split(s)[0]
            self.cache_hook.add_partial("generate_until", (context, req.args[1]), text)
            out.append(text)
        return out


# `polar eval lm` -------------------------------------------------------------------------------------
def lm_eval_namespace(args: argparse.Namespace) -> argparse.Namespace:
    """lm-eval's run arguments with ours folded in: ``--model`` defaults to polar, our offline tasks are
    always on the include path (before ``--include_path``'s), CHECKPOINT and ``--step`` go into
    ``--model_args`` (the step resolved, so the result file records which checkpoint it scored), and
    a reference without ``tokenizer.json`` gets ``tokenizer=`` a folder transformers can load with our ids
    (lm-eval's RULER tasks size their prompts with it; eval.loading.hf_tokenizer_folder), and
    ``--output_path`` defaults to the checkpoint's eval folder (RUN/eval/step-N/lm.json: lm-eval then writes
    ``lm_<timestamp>.json``, never overwriting an earlier result)."""
    from eval.options import lm_eval_dests

    if getattr(args, "lm_eval_args", None) is not None:
        raise ValueError("lm-eval is not installed: pip install -e .[eval]")
    ns = argparse.Namespace(**{k: v for k, v in vars(args).items() if k in lm_eval_dests()})
    ns.model = ns.model or "polar"
    model_args = dict(ns.model_args or {})
    if args.checkpoint:
        model_args["pretrained"] = args.checkpoint
    if args.step is not None:
        if ns.model != "polar":
            raise ValueError(f"--step selects a checkpoint of the polar model, not of --model {ns.model}")
        model_args["step"] = args.step
    ref = model_args.get("pretrained")
    if ref is None:
        raise ValueError("no model to evaluate: pass CHECKPOINT (a run directory, checkpoint tag folder or export) "
                         "or --model_args pretrained=PATH")
    if ns.model == "polar":
        step = model_args.get("step")
        loc = checkpoint_location(ref, None if step is None else int(step))
        if loc is not None:
            model_args["step"] = ckpt.step_of(loc[1])
        elif step is not None:
            raise FileNotFoundError(f"{ref} has no checkpoints: --step needs a run directory")
        if "tokenizer" not in model_args:  # RULER's tasks load model_args' tokenizer (else pretrained) themselves
            hf_tok = hf_tokenizer_folder(ref, model_args.get("step"))
            if hf_tok is not None and hf_tok != Path(str(ref)):
                model_args["tokenizer"] = str(hf_tok)
    ns.model_args = model_args
    from eval.tasks.generate import builtin_tasks_dir  # our offline tasks without --include_path (its own win)

    ns.include_path = [str(builtin_tasks_dir()), *([ns.include_path] if ns.include_path else [])]
    if not ns.output_path and Path(str(ref)).is_dir():
        ns.output_path = str(eval_folder(ref, model_args.get("step")) / "lm.json")
    return ns


def git_hash_quietly() -> str | None:
    """lm-eval's get_git_commit_hash (recorded in the result file), without git's "fatal: not a git repository"
    on the terminal when the evaluation runs outside a repository."""
    try:
        return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None


def run_lm_eval(args: argparse.Namespace) -> Path | None:
    """Run lm-eval's own `run` command on the completed arguments; returns the result file it wrote
    (None without an output path)."""
    from lm_eval._cli.run import Run

    ns = lm_eval_namespace(args)
    out = Path(ns.output_path) if ns.output_path else None
    folder = None if out is None else (out.parent if out.suffix == ".json" else out)

    def results() -> set[Path]:
        return set() if folder is None else {p for p in folder.rglob("*.json") if not p.name.startswith("samples_")}

    before = results()
    with mock.patch("lm_eval.evaluator.get_git_commit_hash", git_hash_quietly):
        Run._execute(ns)
    new = sorted(results() - before, key=lambda p: p.stat().st_mtime)
    return new[-1] if new else None
