"""The ``ruler`` evaluation: RULER's synthetic long-context tasks over a task x length x depth grid
(`polar eval ruler`; generator eval/ruler_data.py, scoring and outputs eval/ruler.py). Results:
``ruler_<time>.json`` (config, cells, every sample), ``.csv`` (cells), ``.png`` (per-task heatmaps) and
``.md`` (task x length summary table); the card shows the summary table of every configuration kept."""

from __future__ import annotations

import argparse
from pathlib import Path

from eval.registry import DOCS, Evaluation, Score, register


def _score(values: list[float]) -> Score:
    """Mean with its standard error over the samples."""
    n = len(values)
    m = sum(values) / n
    return Score(m, (sum((v - m) ** 2 for v in values) / (n - 1) / n) ** 0.5 if n > 1 else None)


class RulerEvaluation(Evaluation):
    name = "ruler"
    help = "RULER's synthetic long-context tasks (needles, variable tracking, word extraction), greedy"
    description = ("Generate RULER's 11 synthetic tasks under the model's tokenizer from any haystack (default the "
                   "builtin corpus), offline and seeded; score greedy answers by RULER's string match per length "
                   f"and depth. Writes ruler_<time>.{{json,csv,png,md}}. See {DOCS}.")

    label = "RULER"  # what the card calls it

    def add_options(self, p: argparse.ArgumentParser) -> None:
        from eval.ruler_data import TASKS

        p.add_argument("--tasks", default="all", help=f"comma-separated tasks or 'all' (default): {', '.join(TASKS)}")
        p.add_argument("--haystack", default="builtin", help="prose for the essay haystacks and word lists: "
                       "'builtin' or any dataset spec (files, hf:NAME, builtin:NAME; default builtin)")
        self.add_grid_options(p)

    def add_grid_options(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--lengths", default="1k,2k,4k", help="prompt lengths in tokens, k = 1024 (default 1k,2k,4k)")
        p.add_argument("--depths", default="0:100:25", help="depth in %% of the first answer needle: start:stop:step "
                       "or a list (default 0:100:25; the word-extraction tasks have none)")
        p.add_argument("--samples", type=int, default=4, help="prompts per (task, length, depth) cell (default 4)")
        p.add_argument("--max-new", type=int, default=None, help="cap on generated tokens (default: each task's "
                       "RULER budget: 128 needles, 30 vt, 120 cwe, 50 fwe; passkey 10)")
        p.add_argument("--prefill-chunk", type=int, default=2048, help="prompt tokens run in parallel at a time, "
                       "continuing the model's state; bounds memory (default 2048)")
        p.add_argument("--seed", type=int, default=0, help="seed of every prompt (default 0)")

    def tasks(self, args: argparse.Namespace) -> list[str]:
        from eval.ruler_data import TASKS

        return list(TASKS) if args.tasks == "all" else [t.strip() for t in args.tasks.split(",")]

    def settings(self, args: argparse.Namespace):
        from eval.niah import parse_depths, parse_lengths
        from eval.ruler import RulerConfig

        return RulerConfig(tasks=self.tasks(args), lengths=parse_lengths(args.lengths),
                           depths=parse_depths(args.depths), samples=args.samples,
                           haystack=getattr(args, "haystack", "builtin"), max_new=args.max_new,
                           prefill_chunk=args.prefill_chunk, seed=args.seed)

    def run(self, model, tok, settings, args: argparse.Namespace, progress: bool) -> dict:
        from eval.hf_targets import check_positions
        from eval.ruler import run_ruler

        check_positions(model, max(settings.lengths) + (settings.max_new or 128), self.name)
        return run_ruler(model, tok, settings, progress=progress)

    def write(self, result: dict, folder: Path, stem: str, title: str) -> list[Path]:
        from eval.ruler import write_ruler

        return list(write_ruler(result, folder, title, stem).values())

    def report(self, result: dict) -> str:
        from eval.ruler import summary_table

        return summary_table(result).rstrip("\n")

    def summarize(self, result: dict) -> dict[str, Score]:
        """Mean string_match_all over every sample (headline), per task and per length ("@")."""
        samples = result["samples"]
        out = {f"{self.name}/score": _score([s["all"] for s in samples])}
        for key in ("task", "length"):
            values = list(dict.fromkeys(s[key] for s in samples))
            for v in values if len(values) > 1 or key == "length" else []:
                out[f"{self.name}/score@{v}"] = _score([s["all"] for s in samples if s[key] == v])
        return out

    def card_section(self, results: list[dict], step: int) -> list[str]:
        import shlex

        from eval.ruler import summary_table
        from pretrain.privacy import public_path

        lines = []
        for r in results:
            cfg, options = r["config"], [public_path(o) for o in r.get("options", [])]  # no local path in a card
            lines += ["", f"{self.label} on step {step} with `{shlex.join(options)}`: string_match_all, "
                      f"greedy, {cfg['samples']} samples per cell, haystack {public_path(cfg['haystack'])}, "
                      f"seed {cfg['seed']}.",
                      "", *summary_table(r).rstrip("\n").splitlines()]
        return lines


register(RulerEvaluation())
