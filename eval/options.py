"""Command-line pieces the evaluations share: the model reference every `polar eval KIND` takes, the option
sets of the built-in kinds (eval/kinds/), and the settings part of a command line that a result records.

`polar eval lm` takes lm-eval's own flags, unchanged: its ``run`` command adds them (lm-eval 0.4.x,
``lm_eval._cli.run.Run``), so ``--model_args``, ``--tasks``, ``--include_path``, ``--output_path``,
``--batch_size``, ``--device``, ``--limit``, ``--log_samples``, ``--use_cache``, ``--gen_kwargs`` ... mean
what they mean in ``lm_eval``. Ours on top: an optional CHECKPOINT and ``--step``, which fill
``--model_args pretrained=...,step=...`` and the default ``--output_path``; ``--model`` defaults to polar.
"""

from __future__ import annotations

import argparse
import functools

LM_EXTRAS = ("checkpoint", "step")
TARGET_FLAGS = ("--step", "--out")
OUR_DEFAULTS = {
    "--model": "model name (default: polar, any checkpoint of ours; hf and lm-eval's others work too)",
    "--include_path": "additional directory of task YAMLs (our offline tasks, polar_offline, are always found; "
                      "this directory's tasks win over them)",
    "--batch_size": "batch size (default: 1); 'auto' means 8 for the polar model",
    "--device": "device (default: cuda:0; the polar model runs on the CPU, with a warning, without CUDA)",
}


class _Into:
    """Stands in for a subparsers object, so lm-eval's `run` command adds its arguments to our parser."""

    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        return self.parser


def add_target_arguments(p: argparse.ArgumentParser) -> None:
    """CHECKPOINT, --step and --tokenizer: the model reference every evaluation of one model takes."""
    p.add_argument("checkpoint", help="run directory, checkpoint tag folder, exported folder, or any transformers "
                   "causal LM folder or Hub id (Mamba, Mamba-2, GPT-NeoX/Pythia, Llama, ...)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of a run directory (default: latest)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the export's, the run's or the "
                   "model folder's tokenizer.json)")
    p.add_argument("--trust-pickle", action="store_true", help="load a model folder whose weights are pickles only "
                   "(pytorch_model.bin; can run code when loaded): only for files from an author you trust")


def add_lm_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", default=None, help="run directory, checkpoint tag folder or exported "
                   "folder (sets --model_args pretrained=...; give it first, before --tasks)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of a run directory (default: latest)")
    try:
        from lm_eval._cli.run import Run
    except ImportError:  # lm-eval is the optional `eval` extra
        p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="lm-eval is not installed: "
                       "pip install -e .[eval]")
        return
    Run(_Into(p))
    for flag, text in OUR_DEFAULTS.items():  # lm-eval's help states its own defaults; these are ours
        p._option_string_actions[flag].help = text


@functools.cache
def lm_eval_dests() -> frozenset[str]:
    """The namespace attributes lm-eval's run command reads (everything else is ours)."""
    p = argparse.ArgumentParser(add_help=False)
    add_lm_options(p)
    return frozenset(a.dest for a in p._actions) - set(LM_EXTRAS)


def add_niah_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lengths", default="1k,2k,4k", help="prompt lengths in tokens, k = 1024 (default 1k,2k,4k)")
    p.add_argument("--depths", default="0:100:10", help="needle depths in %%: start:stop:step or a list "
                   "(default 0:100:10)")
    p.add_argument("--samples", type=int, default=4, help="prompts per (length, depth) cell (default 4)")
    p.add_argument("--haystack", default="builtin", help="'builtin' (the embedded Shakespeare corpus) or a text file")
    p.add_argument("--digits", type=int, default=7, help="digits of the magic number (default 7, as RULER)")
    p.add_argument("--distractors", type=int, default=9, help="wrong values ranked against the true one (default 9)")
    p.add_argument("--prefill-chunk", type=int, default=2048, help="prompt tokens run in parallel at a time, "
                   "each chunk continuing from the state the last one left; bounds memory (default 2048)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed for keys, values and offsets (default 0)")
    p.add_argument("--needle", default=None, help="needle template with {value} and optionally {key} (default: "
                   "RULER's 'The special magic number for {key} is: {value}.')")
    p.add_argument("--question", default=None, help="question template, optionally with {key}, that the answer "
                   "follows; \\n is a newline (default: RULER's, ending 'The special magic number for {key} is:')")


def option_tokens(tokens: list[str], checkpoint: str | None) -> list[str]:
    """The settings part of a `polar eval KIND` command line as typed: without CHECKPOINT, ``--step`` and
    ``--out``, which say what to evaluate and where to keep it, so the card can rerun it on its step.
    (The eval subcommands take no abbreviated options, so these are the only spellings.)"""
    rest = list(tokens)
    if checkpoint is not None and checkpoint in rest:
        rest.remove(checkpoint)
    out, skip = [], False
    for t in rest:
        if skip:
            skip = False
        elif t in TARGET_FLAGS:
            skip = True
        elif not t.startswith(tuple(f"{f}=" for f in TARGET_FLAGS)):
            out.append(t)
    return out


def niah_config(args: argparse.Namespace):
    from eval.niah import NiahConfig, parse_depths, parse_lengths

    templates = {k: v.replace("\\n", "\n") for k, v in (("needle", args.needle), ("question", args.question)) if v}
    return NiahConfig(lengths=parse_lengths(args.lengths), depths=parse_depths(args.depths), samples=args.samples,
                      haystack=args.haystack, digits=args.digits, distractors=args.distractors,
                      prefill_chunk=args.prefill_chunk, seed=args.seed, **templates)
