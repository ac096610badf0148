"""benchmarks/study_document_boundaries.py: the generated corpus keeps every speech of a play once, in order, in
short documents that never cross a scene; the table averages over seeds and pairs reset with carry by seed."""

from __future__ import annotations

import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from study_document_boundaries import COLUMNS, passages, table  # noqa: E402

PLAY = """# A Play

## ACT I

### SCENE I. A room.

_Enter A and B_

**A**
{a}

**B**
{b}

### SCENE II. Another room.

**C**
{c}

**A**
Short.
"""


def test_passages_keep_every_block_in_order_within_scenes():
    """Catches headings leaking into documents, blocks dropped or repeated, or a document spanning two scenes."""
    rng = random.Random(0)
    lines = {k: "\n".join(f"{k} line {i} of the speech, with words." for i in range(rng.randint(5, 40)))
             for k in "abc"}
    docs = passages(PLAY.format(**lines), random.Random(1))
    text = "\n\n".join(docs)
    assert "#" not in text and "*" not in text and "_" not in text
    assert text.index("a line 0") < text.index("b line 0") < text.index("c line 0")
    assert all(text.count(f"{k} line 0 ") == 1 for k in "abc")
    assert not any("b line" in d and "c line" in d for d in docs)  # scene I and scene II never share a document
    assert all(len(d) >= 100 for d in docs)


def test_table_averages_seeds_and_pairs_reset_with_carry():
    """Catches a spread over the wrong runs or pairs that mix seeds: reset - carry per seed here is exactly 0.1."""
    rows = []
    for seed in (1, 2):
        for mode, shift in (("carry", 0.0), ("reset", 0.1)):
            scores = {}
            for _, kind, metric in COLUMNS:
                scores.setdefault(kind, {})[metric] = [seed + shift, None]
            rows.append({"variant": "baseline", "mode": mode, "seed": seed, "scores": scores})
    md = table(rows, [1, 2])
    assert "| baseline | carry | 2 | 1.5000 ± 0.7071 |" in md and "| baseline | reset | 2 | 1.6000 ± 0.7071 |" in md
    assert f"| baseline | 2 | {' | '.join(['+0.1000 ± 0.0000'] * len(COLUMNS))} |" in md
    assert "| polarized | carry | 0 |" in md and "| polarized | 0 |" in md
