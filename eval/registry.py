"""The evaluation registry: every kind of per-checkpoint evaluation (lm-eval tasks, needle in a haystack, the
recency probe, ...) is one :class:`Evaluation` registered here by name, and everything that handles
evaluations iterates over the registry: `polar eval KIND` (eval/cli.py), `polar eval sweep` and its SLURM
array (eval/sweep.py, launch/slurm/eval_sweep.sbatch), `polar study` (eval/study.py), the result files
(eval/results.py) and the model card (pretrain/model_card.py).

An evaluation owns its options, how it runs on one checkpoint, its result file(s), its named scores (what
sweeps and studies tabulate), its sweep figure and its model-card section with the command that reproduces
a result. Adding one = one module that subclasses :class:`Evaluation` and calls :func:`register` at import,
plus its module name in :data:`BUILTIN` (outside the project: in ``POLAR_PLUGINS``, models/plugins.py).
Kind modules stay light at import (torch and friends inside methods): `polar --help` builds every parser.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
from pathlib import Path
from typing import Any, NamedTuple

from models.plugins import load_plugins

BUILTIN = ("eval.kinds.lm", "eval.kinds.niah", "eval.kinds.recency", "eval.kinds.ruler",
           "eval.kinds.passkey", "eval.kinds.position_loss", "eval.kinds.documents")
_REGISTRY: dict[str, Evaluation] = {}
DOCS = "docs/eval.md"
RESERVED = ("sweep", "every", "out", "shard")  # `polar eval sweep` and its own options


class Score(NamedTuple):
    value: float
    stderr: float | None = None


class Evaluation:
    """One kind of evaluation of one checkpoint. A subclass sets ``name`` (the `polar eval NAME` subcommand,
    the sweep's ``--NAME`` option, result files ``NAME_<time>.json``), ``help`` and ``description``, and
    implements :meth:`add_options`, :meth:`run` and :meth:`summarize`; the rest has defaults it may refine."""

    name: str = ""
    help: str = ""
    description: str = ""  # a few lines (< 300 characters) ending with a docs link for the long story
    usage: str | None = None  # argparse's generated usage unless set

    # -- options --------------------------------------------------------------------------------------------
    def add_options(self, p: argparse.ArgumentParser) -> None:
        """The evaluation's settings (what a sweep's ``--NAME "..."`` string holds)."""

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        """The whole `polar eval NAME` command line: the model reference, the settings, the output folder."""
        from eval.options import add_target_arguments

        add_target_arguments(p)
        self.add_options(p)
        p.add_argument("--out", default=None, help="output folder (default: RUN/eval/step-N, or EXPORT/eval)")

    def settings(self, args: argparse.Namespace) -> Any:
        """The validated settings (a typed config); raises ValueError before any model loads."""
        return args

    def parse(self, options: list[str], *target: str) -> argparse.Namespace:
        """`polar eval NAME TARGET... OPTIONS` parsed as the subcommand parses it (bad options: SystemExit)."""
        p = argparse.ArgumentParser(prog=f"polar eval {self.name}", allow_abbrev=False)
        self.add_arguments(p)
        return p.parse_args([*target, *options])

    def check(self, options: list[str]) -> None:
        """Fail now on a bad option or value (a sweep checks every string before hours of other work)."""
        self.settings(self.parse(options, "CHECKPOINT"))

    # -- running --------------------------------------------------------------------------------------------
    def run(self, model, tok, settings: Any, args: argparse.Namespace, progress: bool) -> dict:
        """Score a loaded model; the result must be JSON-serialisable."""
        raise NotImplementedError

    def evaluate(self, args: argparse.Namespace, options: list[str], progress: bool = True) -> tuple[dict, list[Path]]:
        """Run on ``args.checkpoint`` (``--step``) and keep the result in its eval folder (or ``--out``) as
        ``NAME_<time>.json`` (+ :meth:`write`'s extra files). ``options``: the settings as typed, recorded
        in the result so the card can print a command that reproduces it."""
        from eval.loading import load_for_eval
        from eval.results import resolved_step, stamp, timestamp
        from pretrain.export import eval_folder

        settings = self.settings(args)
        step = resolved_step(args.checkpoint, args.step)
        model, tok = load_for_eval(args.checkpoint, step, getattr(args, "tokenizer", None),
                                   trust_pickle=getattr(args, "trust_pickle", False))
        result = stamp(self.run(model, tok, settings, args, progress), self.name, options, args.checkpoint, step)
        folder = Path(args.out) if args.out else eval_folder(args.checkpoint, step)
        title = Path(args.checkpoint).resolve().name + ("" if step is None else f", step {step}")
        return result, self.write(result, folder, f"{self.name}_{timestamp()}", title)

    def write(self, result: dict, folder: Path, stem: str, title: str) -> list[Path]:
        """The result files, ``stem.json`` first (the record the card and sweeps read)."""
        from eval.results import write_json

        return [write_json(folder / f"{stem}.json", result)]

    def report(self, result: dict) -> str:
        """What `polar eval NAME` prints."""
        return "\n".join(f"{m:<40} {s.value:.4g}" + ("" if s.stderr is None else f" ± {s.stderr:.2g}")
                         for m, s in self.summarize(result).items())

    # -- tabulating -----------------------------------------------------------------------------------------
    def summarize(self, result: dict) -> dict[str, Score]:
        """Named scores with standard errors, "NAME/metric"; breakdowns as "NAME/metric@x" (sweep and study
        tables keep them, their curves and study columns show only the headline scores without "@")."""
        raise NotImplementedError

    def plot(self, rows: list[dict], path: Path) -> bool:
        """An optional sweep figure from rows {run, step, result}; False when the kind draws none."""
        return False

    # -- the model card -------------------------------------------------------------------------------------
    def step_of(self, result: dict) -> int | None:
        """The checkpoint step a result file says it scored."""
        return result.get("checkpoint_step")

    def shown(self, results: list[dict]) -> list[dict]:
        """Which of a step's kept results the card shows (oldest first in, newest wins): one per settings."""
        newest = {json.dumps(r.get("config", r.get("options")), sort_keys=True): r for r in results}
        return list(newest.values())

    def card_section(self, results: list[dict], step: int) -> list[str]:
        """Markdown lines for the shown results, each with the settings it was computed with."""
        lines = []
        for r in results:
            lines += ["", f"`polar eval {self.name}` on step {step} with `{shlex.join(r.get('options', ['?']))}`:", "",
                      "| score | value | ± stderr |", "|---|---|---|"]
            lines += [f"| {m} | {s.value:.4f} | {'' if s.stderr is None else f'{s.stderr:.4f}'} |"
                      for m, s in self.summarize(r).items()]
        return lines

    def model_index(self, results: list[dict]) -> list[dict]:
        """Entries for the card's YAML ``model-index`` (scores the Hub shows as the model's); none by default."""
        return []

    def reproduce(self, result: dict, checkpoint: str | Path, step: int) -> str | None:
        """A shell command that recomputes ``result`` on ``step`` and keeps it beside the original (None for a
        result kept before results recorded their options); a kind registered by a plugin carries its
        POLAR_PLUGINS so the command runs as written."""
        if "options" not in result:
            return None
        module = type(self).__module__
        env = "" if module in BUILTIN else f"POLAR_PLUGINS={shlex.quote(module)} "
        return env + shlex.join(["polar", "eval", self.name, str(checkpoint), "--step", str(step), *result["options"]])


def register(evaluation: Evaluation) -> Evaluation:
    """Add an evaluation under its name (a lowercase identifier: it becomes a subcommand and an option)."""
    name = evaluation.name
    if not name.isidentifier() or name != name.lower() or name in RESERVED:
        raise ValueError(f"evaluation name {name!r}: use a lowercase identifier such as 'niah' or 'token_count', "
                         f"not one of {', '.join(RESERVED)}")
    if name in _REGISTRY and type(_REGISTRY[name]) is not type(evaluation):
        raise ValueError(f"evaluation {name!r} is registered twice ({type(_REGISTRY[name]).__module__} and "
                         f"{type(evaluation).__module__})")
    _REGISTRY[name] = evaluation
    return evaluation


def evaluations() -> dict[str, Evaluation]:
    """Every registered evaluation by name, built-in ones first."""
    for module in BUILTIN:
        importlib.import_module(module)
    return dict(_REGISTRY)


def get(name: str) -> Evaluation:
    kinds = evaluations()
    if name not in kinds:
        load_plugins()
        kinds = evaluations()
    if name not in kinds:
        raise ValueError(f"unknown evaluation {name!r}: registered are {', '.join(kinds)} (others load through "
                         "POLAR_PLUGINS=module, see docs/eval.md)")
    return kinds[name]


def evaluate(name: str, checkpoint: str | Path, step: int | None, options: str, progress: bool = False) -> dict:
    """`polar eval NAME CHECKPOINT --step STEP OPTIONS` from Python (sweeps, studies); returns the result."""
    kind = get(name)
    tokens = shlex.split(options)
    args = kind.parse(tokens, str(checkpoint), *([] if step is None else ["--step", str(step)]))
    result, _ = kind.evaluate(args, tokens, progress)
    return result
