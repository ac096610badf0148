"""Rendering SLURM scripts: the multi-node training script (launch/slurm/train.sbatch) for a validated recipe, and
the template filling other scripts (a study's job array, eval/study.py) share."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

TEMPLATE = Path(__file__).with_name("slurm") / "train.sbatch"


def fill_sbatch(template: Path, directives: list[str], env: dict[str, str]) -> str:
    """``template`` with ``#SBATCH`` ``directives`` and exported ``env`` variables inserted after its own #SBATCH
    block (later directives win) and before its first command."""
    lines = template.read_text().splitlines()
    first_cmd = next(i for i, line in enumerate(lines) if i > 0 and line.strip() and not line.startswith("#"))
    block = [f"#SBATCH {d}" for d in directives] + [""] + [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    return "\n".join(lines[:first_cmd] + block + [""] + lines[first_cmd:]) + "\n"


def validated(config: str, overrides: list[str]):
    from models.typed_config import parse_override_args
    from pretrain.config import load_config

    return load_config(config, parse_override_args(overrides))


def render_slurm(config: str, overrides: list[str], nodes: int, gpus_per_node: int, nproc_per_node: int | None,
                 time: str | None, partition: str | None, account: str | None) -> str:
    """The train.sbatch script with this job's #SBATCH resources and variables filled in."""
    cfg = validated(config, overrides)
    run_dir = cfg.run.dir.resolve()
    directives = [f"--job-name=polar-{cfg.run.name}", f"--nodes={nodes}", f"--output={run_dir}/logs/slurm-%j.out"]
    if gpus_per_node:
        directives.append(f"--gpus-per-node={gpus_per_node}")
    directives += [f"--{k}={v}" for k, v in (("time", time), ("partition", partition), ("account", account)) if v]
    env = {
        "CONFIG": str(Path(config).resolve()),
        "POLAR_OVERRIDES": " ".join(overrides),  # split on spaces by the script
        "NPROC_PER_NODE": str(nproc_per_node or gpus_per_node or 1),
        "POLAR_PYTHON": sys.executable,
    }
    return fill_sbatch(TEMPLATE, directives, env)

