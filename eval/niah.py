"""Needle in a haystack (``polar eval niah``): can the model retrieve a fact planted at a given depth of a
long context of real prose?

A RULER-style needle ("The special magic number for {key} is: {value}.") is inserted at the sentence
boundary nearest the requested token depth of a haystack of prose (default: the builtin Shakespeare
corpus, each sample from its own random offset), followed by the question; the prompt is exactly the
requested number of tokens. Both templates can be replaced (``--needle``/``--question``), e.g. by short
ones that leave room for prose in short prompts. Two scores per cell of the length x depth grid: exact
match of the greedy continuation, and the rank of the true value's log-likelihood among random
distractor values (small base models rarely follow the question, but their likelihoods still show
whether the value was retrieved).

The prompt goes through in chunks of ``prefill_chunk`` tokens, each in parallel and continuing from the
inference state the previous chunk left: for Mamba a recurrent state, so memory does not grow with the
context and contexts far beyond the training length fit; the Transformer baseline runs the same code with
a KV cache. Results: JSON (config, cells, samples), CSV (cells) and a heatmap PNG.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tokenizer.tokenizer import Tokenizer

NEEDLE = "The special magic number for {key} is: {value}."
QUESTION = ("\n\nWhat is the special magic number for {key} mentioned in the provided text?\n"
            "The special magic number for {key} is:")
_KEY_WORDS = ("amber", "brisk", "cobalt", "dusty", "elder", "frosty", "gilded", "hollow", "ivory", "jolly",
              "kindly", "lunar", "mossy", "noble", "olive", "proud", "quiet", "rusty", "silver", "tawny")
_KEY_NOUNS = ("anchor", "badger", "candle", "dagger", "ember", "falcon", "garden", "harbor", "island", "jasper",
              "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quarry", "raven", "saddle", "thistle")
SENTENCE_END = (".", "!", "?", "\n")


@dataclass
class NiahConfig:
    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096])
    depths: list[float] = field(default_factory=lambda: [float(d) for d in range(0, 101, 10)])  # percent
    samples: int = 4
    haystack: str = "builtin"  # or a text file
    digits: int = 7
    distractors: int = 9
    prefill_chunk: int = 2048
    seed: int = 0
    needle: str = NEEDLE  # must contain {value}; may contain {key}
    question: str = QUESTION  # may contain {key}; the answer follows it after a space

    def __post_init__(self):
        if "{value}" not in self.needle:
            raise ValueError(f"niah: the needle template {self.needle!r} has no {{value}} field")
        try:
            self.needle.format(key="k", value="v"), self.question.format(key="k")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"niah: templates may use only {{key}} and {{value}} (needle) or {{key}} (question): "
                             f"{e!r}") from None
        if self.digits < 1 or self.samples < 1 or self.distractors < 0:
            raise ValueError(f"niah: need digits >= 1, samples >= 1 and distractors >= 0 (got digits={self.digits}, "
                             f"samples={self.samples}, distractors={self.distractors})")
        values = 9 * 10 ** (self.digits - 1)  # random_value draws from [10^(d-1), 10^d)
        if self.distractors >= values:
            raise ValueError(f"niah: {self.distractors} distractors need more than the {values} distinct "
                             f"{self.digits}-digit values: lower --distractors or raise --digits")
        if not self.lengths or not self.depths or any(not 0 <= d <= 100 for d in self.depths):
            raise ValueError(f"niah: need at least one length and depths in [0, 100] (got {self.depths})")


# -- parsing ----------------------------------------------------------------------------------------------
def parse_lengths(spec: str) -> list[int]:
    """"1k,2k,512" -> [1024, 2048, 512] (k = 1024 tokens)."""
    out = []
    for part in spec.split(","):
        part = part.strip().lower()
        out.append(int(float(part[:-1]) * 1024) if part.endswith("k") else int(part))
    return out


def parse_depths(spec: str) -> list[float]:
    """"0:100:10" (start:stop:step, stop included) or "0,50,100" -> percentages."""
    if ":" in spec:
        start, stop, step = (float(x) for x in spec.split(":"))
        n = int(round((stop - start) / step))
        return [start + i * step for i in range(n + 1)]
    return [float(x) for x in spec.split(",")]


# -- prompts ----------------------------------------------------------------------------------------------
def haystack_text(spec: str) -> str:
    if spec == "builtin":
        from tokenizer.sources import iter_documents

        return "\n\n".join(iter_documents("builtin:shakespeare"))
    return Path(spec).read_text(encoding="utf-8")


def sentence_boundaries(tok: Tokenizer, ids: list[int]) -> list[int]:
    """Positions p where a needle may go: 0, len(ids), and after every token ending a sentence or a line."""
    inner = [p for p in range(1, len(ids)) if tok.id_to_piece(ids[p - 1]).endswith(SENTENCE_END)]
    return [0, *inner, len(ids)]


@dataclass
class Prompt:
    ids: list[int]
    key: str
    value: str
    needle_start: int  # token index of the needle in ids
    needle_len: int
    haystack_len: int  # tokens of prose in the prompt


def build_prompt(tok: Tokenizer, hay_ids: list[int], length: int, depth: float, key: str, value: str,
                 needle: str = NEEDLE, question: str = QUESTION) -> Prompt:
    """Exactly ``length`` tokens: prose with the needle at the boundary nearest ``depth`` % of it, then the question."""
    needle = tok.encode(" " + needle.format(key=key, value=value))
    question = tok.encode(question.format(key=key))
    budget = length - len(needle) - len(question)
    if budget < 0 or len(hay_ids) < budget:
        raise ValueError(f"length {length} is too short for the needle and question ({len(needle) + len(question)} "
                         "tokens) or longer than the haystack")
    hay = hay_ids[:budget]
    target = depth / 100 * budget
    pos = min(sentence_boundaries(tok, hay), key=lambda p: abs(p - target))
    return Prompt(hay[:pos] + needle + hay[pos:] + question, key, value, pos, len(needle), budget)


def random_value(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def make_prompts(tok: Tokenizer, text: str, length: int, depth: float, n: int, digits: int,
                 rng: random.Random, needle: str = NEEDLE, question: str = QUESTION) -> list[Prompt]:
    """``n`` prompts, each with its own key, value and haystack offset."""
    out = []
    chars = length * 8  # comfortably more prose than ``length`` tokens need (English BPE: ~4 chars/token)
    for _ in range(n):
        start = rng.randrange(max(1, len(text) - chars))
        hay = tok.encode(text[start:start + chars])
        key = f"{rng.choice(_KEY_WORDS)}-{rng.choice(_KEY_NOUNS)}"
        out.append(build_prompt(tok, hay, length, depth, key, random_value(rng, digits), needle, question))
    return out


# -- recurrent scoring ------------------------------------------------------------------------------------
@torch.no_grad()
def prefill(model: torch.nn.Module, ids: torch.Tensor, chunk: int) -> tuple[torch.Tensor, list]:
    """Run (b, L) prompts ``chunk`` tokens at a time, each chunk in parallel from the state the previous one
    left; returns the last logits (b, V) and the final recurrent states."""
    states = model.new_states(ids.shape[0])
    chunk = max(1, chunk)
    for start in range(0, ids.shape[1], chunk):
        hidden = model.backbone(ids[:, start:start + chunk], states)
    return model.lm_head(hidden[:, -1]), states


@torch.no_grad()
def continuation_logprobs(model: torch.nn.Module, logits: torch.Tensor, states: list,
                          conts: list[list[list[int]]]) -> torch.Tensor:
    """Sum log p(cont | prompt) for ``conts[i][j]``, the j-th candidate of prompt i (all prompts have the same
    number of candidates); stepping from copies of each prompt's state. Returns (b, n_candidates)."""
    b, n = len(conts), len(conts[0])
    width = max(len(c) for cs in conts for c in cs)
    ids = torch.zeros(b * n, width, dtype=torch.long, device=logits.device)
    mask = torch.zeros(b * n, width, dtype=torch.bool, device=logits.device)
    for r, c in enumerate(c for cs in conts for c in cs):
        ids[r, : len(c)], mask[r, : len(c)] = torch.tensor(c), True
    states, cur = [s.repeat(n) for s in states], logits.repeat_interleave(n, 0)
    total = torch.zeros(b * n, device=logits.device)
    for t in range(width):  # padding sits after each candidate, so it never affects the scored steps
        lp = F.log_softmax(cur.float(), -1).gather(-1, ids[:, t:t + 1])[:, 0]
        total += torch.where(mask[:, t], lp, torch.zeros_like(lp))
        if t + 1 < width:
            cur = model.step(ids[:, t], states)
    return total.view(b, n)


@torch.no_grad()
def greedy(model: torch.nn.Module, logits: torch.Tensor, states: list, n: int) -> torch.Tensor:
    """``n`` greedy tokens (b, n) continuing from ``logits``/``states`` (states are consumed)."""
    out = []
    for i in range(n):
        nxt = logits[:, : model.config.vocab_size].argmax(-1)
        out.append(nxt)
        if i + 1 < n:
            logits = model.step(nxt, states)
    return torch.stack(out, 1)


def exact_match(generated: str, value: str) -> bool:
    """The first number in the generation is the value."""
    found = re.findall(r"\d+", generated)
    return bool(found) and found[0] == value


def rank_of_true(scores: list[float]) -> int:
    """1 + candidates scoring strictly above the true one (index 0); ties count in the model's favour."""
    return 1 + sum(s > scores[0] for s in scores[1:])


def score_prompts(model: torch.nn.Module, tok: Tokenizer, prompts: list[Prompt], cfg: NiahConfig,
                  rng: random.Random) -> list[dict]:
    """One record per prompt (all the same length): greedy exact match and the true value's rank."""
    device = next(model.parameters()).device
    ids = torch.tensor([p.ids for p in prompts], device=device)
    logits, states = prefill(model, ids, cfg.prefill_chunk)
    candidates = []
    for p in prompts:
        values = {p.value}
        while len(values) < cfg.distractors + 1:
            values.add(random_value(rng, cfg.digits))
        candidates.append([p.value, *sorted(values - {p.value})])
    conts = [[tok.encode(" " + v) for v in cs] for cs in candidates]
    lls = continuation_logprobs(model, logits, states, conts).tolist()
    gen = greedy(model, logits, states, max(len(c) for cs in conts for c in cs) + 2)
    records = []
    for p, cs, ll, g in zip(prompts, candidates, lls, gen.tolist(), strict=True):
        text = tok.decode(g)
        records.append({"key": p.key, "value": p.value, "needle_start": p.needle_start,
                        "depth_actual": 100 * p.needle_start / max(1, p.haystack_len), "generated": text,
                        "exact": exact_match(text, p.value), "rank": rank_of_true(ll), "candidates": len(cs)})
    return records


def run_niah(model: torch.nn.Module, tok: Tokenizer, cfg: NiahConfig, progress: bool = True) -> dict:
    """Score the whole grid; returns {"config", "cells", "samples"}."""
    rng = random.Random(cfg.seed)
    text = haystack_text(cfg.haystack)
    cells, samples = [], []
    grid = [(length, depth) for length in cfg.lengths for depth in cfg.depths]
    for length, depth in tqdm(grid, desc="niah", disable=not progress):
        prompts = make_prompts(tok, text, length, depth, cfg.samples, cfg.digits, rng, cfg.needle, cfg.question)
        records = score_prompts(model, tok, prompts, cfg, rng)
        for r in records:
            samples.append({"length": length, "depth": depth, **r})
        cells.append({
            "length": length, "depth": depth, "n": len(records),
            "exact_match": sum(r["exact"] for r in records) / len(records),
            "rank1": sum(r["rank"] == 1 for r in records) / len(records),
            "mean_rank": sum(r["rank"] for r in records) / len(records),
            "chance_rank1": 1 / (cfg.distractors + 1),
        })
    return {"config": asdict(cfg), "cells": cells, "samples": samples}


# -- outputs ----------------------------------------------------------------------------------------------
def write_niah(result: dict, out: str | Path, title: str = "", name: str = "niah") -> dict[str, Path]:
    """OUT/NAME.json (everything), NAME.csv (one row per cell) and NAME.png (the heatmap)."""
    from eval.results import csv_file, json_file, write_files

    paths = {ext: Path(out) / f"{name}.{ext}" for ext in ("json", "csv", "png")}
    write_files({paths["json"]: json_file(result), paths["csv"]: csv_file(result["cells"]),
                 paths["png"]: lambda p: heatmap(result, p, title)})
    return paths


def length_label(n: int) -> str:
    """Tokens as --lengths spells them: 1k for 1024 (k = 1024), else the number."""
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def heatmap(result: dict, path: Path, title: str = "") -> None:
    """Depth rows x length columns, one panel per score; the title says what was measured (checkpoint and step
    in ``title``, samples per cell, chance level of the rank-1 score)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({c["length"] for c in result["cells"]})
    depths = sorted({c["depth"] for c in result["cells"]})
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.6 * len(lengths), 1.2 + 0.35 * len(depths) + 1), squeeze=False)
    for ax, metric, name in zip(axes[0], ("exact_match", "rank1"), ("greedy exact match", "log-likelihood rank 1"),
                                strict=True):
        grid = [[next(c[metric] for c in result["cells"] if c["length"] == n and c["depth"] == d) for n in lengths]
                for d in depths]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_title(name)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    axes[0, 0].set_ylabel("needle depth")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    cells = result["cells"]
    samples = result.get("config", {}).get("samples", "?")
    facts = f"{samples} samples per cell, rank-1 chance {cells[0]['chance_rank1']:.2f}"
    fig.suptitle(f"{title}: {facts}" if title else facts, y=1.04)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
