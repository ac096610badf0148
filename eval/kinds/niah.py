"""The ``niah`` evaluation: needle in a haystack over a length x depth grid (`polar eval niah`, eval/niah.py).
Results: ``niah_<time>.json`` (config, cells, every sample), ``.csv`` (cells) and ``.png`` (the heatmap).
The card shows every NIAH configuration kept for the step (the newest result of each), each labelled with its
needle, value digits, lengths, depths and samples: a 1-digit short needle is not RULER's 7-digit one."""

from __future__ import annotations

import argparse
from pathlib import Path

from eval.registry import DOCS, Evaluation, Score, register


def _mean_with_stderr(cells: list[dict], metric: str, samples: int | None) -> Score:
    """Mean accuracy over cells of ``samples`` prompts each; binomial standard error over all the prompts."""
    p = sum(c[metric] for c in cells) / len(cells)
    return Score(p, (p * (1 - p) / (len(cells) * samples)) ** 0.5 if samples else None)


def settings_label(cfg: dict) -> str:
    """What a NIAH number means: needle, value digits, question, lengths, depths, samples and distractors."""
    from eval.niah import NEEDLE, QUESTION, length_label
    from pretrain.privacy import public_path

    needle = "RULER's needle" if cfg.get("needle", NEEDLE) == NEEDLE else f"needle `{cfg['needle']!r}`"
    question = "" if cfg.get("question", QUESTION) == QUESTION else f", question `{cfg['question']!r}`"
    return (f"{needle} with a {cfg.get('digits', '?')}-digit value{question}; lengths "
            f"{','.join(length_label(n) for n in cfg.get('lengths', []))} tokens, depths "
            f"{','.join(f'{d:g}' for d in cfg.get('depths', []))}%, {cfg.get('samples', '?')} samples per cell, "
            f"{cfg.get('distractors', '?')} distractors, haystack {public_path(cfg.get('haystack', '?'))}, "
            f"seed {cfg.get('seed', '?')}")


class NiahEvaluation(Evaluation):
    name = "niah"
    help = "needle-in-a-haystack retrieval over a length x depth grid"
    description = ("Plant a needle (default RULER's 7-digit magic number) at each depth of prose prompts of each "
                   "length; score greedy exact match and the value's log-likelihood rank among distractors. "
                   f"Constant memory at any length. Writes niah_<time>.{{json,csv,png}}. See {DOCS}.")

    def add_options(self, p: argparse.ArgumentParser) -> None:
        from eval.options import add_niah_options

        add_niah_options(p)

    def settings(self, args: argparse.Namespace):
        from eval.options import niah_config

        return niah_config(args)

    def run(self, model, tok, settings, args: argparse.Namespace, progress: bool) -> dict:
        from eval.niah import run_niah

        return run_niah(model, tok, settings, progress=progress)

    def write(self, result: dict, folder: Path, stem: str, title: str) -> list[Path]:
        from eval.niah import write_niah

        return list(write_niah(result, folder, title, stem).values())

    def report(self, result: dict) -> str:
        return "\n".join(f"length {c['length']:>7}  depth {c['depth']:>5g}%  exact {c['exact_match']:.2f}  "
                         f"rank-1 {c['rank1']:.2f} (chance {c['chance_rank1']:.2f})" for c in result["cells"])

    def summarize(self, result: dict) -> dict[str, Score]:
        """Overall and per-length accuracies with their binomial standard error over the prompts."""
        cells, samples = result["cells"], (result.get("config") or {}).get("samples")
        out = {f"niah/{m}": _mean_with_stderr(cells, m, samples) for m in ("exact_match", "rank1")}
        for length in sorted({c["length"] for c in cells}):
            at = [c for c in cells if c["length"] == length]
            for m in ("rank1", "exact_match"):
                out[f"niah/{m}@{length}"] = _mean_with_stderr(at, m, samples)
        return out

    def plot(self, rows: list[dict], path: Path) -> bool:
        """Accuracy vs context length at each run's latest evaluated step (rank 1 solid, exact match dashed),
        with binomial error bars; lengths labelled as --lengths spells them (1k = 1024)."""
        from eval.niah import length_label
        from eval.sweep import pyplot

        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 4))
        latest = {}
        for r in rows:
            if r["step"] >= latest.get(r["run"], r)["step"]:
                latest[r["run"]] = r
        for run, r in sorted(latest.items()):
            scores = self.summarize(r["result"])
            lengths = sorted({c["length"] for c in r["result"]["cells"]})
            for metric, style in (("rank1", "-o"), ("exact_match", "--x")):
                acc, err = zip(*(scores[f"niah/{metric}@{n}"] for n in lengths), strict=True)
                ax.errorbar(lengths, acc, yerr=None if None in err else err, fmt=style, capsize=3,
                            label=f"{run} @ {r['step']} ({metric})")
        chance = rows[0]["result"]["cells"][0]["chance_rank1"]
        ax.axhline(chance, color="grey", lw=0.8, ls=":", label="chance (rank 1)")
        ax.set_xscale("log", base=2)
        all_lengths = sorted({c["length"] for r in latest.values() for c in r["result"]["cells"]})
        ax.set_xticks(all_lengths, [length_label(n) for n in all_lengths])
        ax.minorticks_off()
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return True

    def card_section(self, results: list[dict], step: int) -> list[str]:
        from eval.niah import length_label

        lines = []
        for r in results:
            cells, cfg = r["cells"], r.get("config") or {}
            lengths = sorted({c["length"] for c in cells})
            lines += ["", f"Needle in a haystack on step {step}: {settings_label(cfg)}. Rank 1 = the true value has "
                      f"the highest log-likelihood (chance {cells[0]['chance_rank1']:.2f}).", "",
                      "| context length | greedy exact match | rank 1 |", "|---|---|---|"]
            for n in lengths:
                at = [c for c in cells if c["length"] == n]
                lines.append(f"| {length_label(n)} | "
                             f"{sum(c['exact_match'] for c in at) / len(at):.3f} | "
                             f"{sum(c['rank1'] for c in at) / len(at):.3f} |")
        return lines


register(NiahEvaluation())
