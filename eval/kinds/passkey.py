"""The ``passkey`` evaluation: passkey retrieval by length and depth (`polar eval passkey`), the test Mamba
papers report — a 5-digit pass key in repeated noise text, asked for at the end, greedy, scored as RULER's
string match. RULER's machinery with one task (eval/ruler_data.py's ``passkey``): the same options but
--tasks, the same result files (``passkey_<time>.{json,csv,png,md}``) and card table."""

from __future__ import annotations

import argparse

from eval.kinds.ruler import RulerEvaluation
from eval.registry import DOCS, register


class PasskeyEvaluation(RulerEvaluation):
    name = "passkey"
    label = "Passkey retrieval"
    help = "passkey retrieval over a length x depth grid (a 5-digit key in noise text), greedy"
    description = ("Hide 'The pass key is N. Remember it.' at each depth of noise-text prompts of each length; "
                   "score whether the greedy answer contains N. Flat memory for SSMs. "
                   f"Writes passkey_<time>.{{json,csv,png,md}}. See {DOCS}.")

    def add_options(self, p: argparse.ArgumentParser) -> None:
        self.add_grid_options(p)

    def tasks(self, args: argparse.Namespace) -> list[str]:
        return ["passkey"]


register(PasskeyEvaluation())
