"""The `polar` command line: one entry point over the packages' commands.

Every command is declared in its package's ``commands.py`` (tokenizer, pretrain, launch, eval): one
``register(subparsers)`` adding each parser (short help, a docs link for the long story) with its thin
handler (``func``; ``accepts_overrides=True`` when it takes dotted ``--section.key VALUE`` overrides), while
the logic stays in the module the handler calls. Heavy imports happen inside the handlers so ``polar --help``
stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from models.plugins import load_plugins
from pretrain.console import configure_logging

SUBCOMMAND_MODULES = ["tokenizer.commands", "pretrain.commands", "launch.commands", "eval.commands"]

# Bad input (config typos, missing files, corrupt data) surfaces as these; they print as one line.
USER_ERRORS = (ValueError, OSError, RuntimeError)  # OSError covers missing files, full disks, permissions


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polar",
        description="polar-mamba: pretrain, evaluate and publish baseline and polarized Mamba language "
        "models (Wang et al., ICLR 2025). Run `polar COMMAND --help` for each command.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level, library chatter included "
                        "(always in the log file: $POLAR_LOG, default ~/.cache/polar-mamba/polar.log)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        # before the parser: plugins add architectures, evaluations (subcommands, options) and training hooks
        load_plugins()
    except USER_ERRORS as e:
        print(f"polar: error: {e}", file=sys.stderr)
        return 2
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    configure_logging(args.verbose)
    try:
        return args.func(args) or 0
    except USER_ERRORS as e:
        if os.environ.get("POLAR_DEBUG"):
            raise
        print(f"polar {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
