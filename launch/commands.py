"""The launch package's commands: `polar launch slurm` (render + submit launch/slurm/train.sbatch) and `polar
launch local` (torchrun on this node), each validating the recipe first."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from launch.render import render_slurm, validated


def run_slurm(args: argparse.Namespace) -> int:
    script = render_slurm(args.config, args.overrides, args.nodes, args.gpus_per_node, args.nproc_per_node,
                          args.time, args.partition, args.account)
    if not args.submit:
        print(script, end="")
        return 0
    validated(args.config, args.overrides).run.dir.joinpath("logs").mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["sbatch", "--parsable"], input=script, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"sbatch failed: {out.stderr.strip()}")
    print(f"submitted job {out.stdout.strip()}")
    return 0


def run_local(args: argparse.Namespace) -> int:
    validated(args.config, args.overrides)
    env = {**os.environ}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc_per_node)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc_per_node}",
           "-m", "pretrain.cli", "train", args.config, *args.overrides]
    return subprocess.call(cmd, env=env)


def register(sub: argparse._SubParsersAction) -> None:
    launch = sub.add_parser("launch", help="run training on SLURM or on this node (torchrun)",
                            description="Launch `polar train` on a SLURM cluster or on this node.")
    kinds = launch.add_subparsers(dest="launcher", metavar="LAUNCHER", required=True)

    p = kinds.add_parser(
        "slurm", help="render (and submit) the multi-node SLURM script for a recipe",
        description="Validate CONFIG, then print launch/slurm/train.sbatch with this job's resources (--dry-run, "
        "default) or "
        "submit it (--submit); the job checkpoints on SIGUSR1/SIGTERM, requeues and resumes. Dotted overrides go "
        "to polar train. See docs/slurm.md.",
    )
    p.add_argument("config", help="training recipe (configs/*.yaml)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node; 0 for CPU-only nodes (default 8)")
    p.add_argument("--nproc-per-node", type=int, default=None, help="processes per node (default: GPUs per node)")
    p.add_argument("--time", help="time limit, e.g. 24:00:00")
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--account", help="SLURM account")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the script (default)")
    mode.add_argument("--submit", action="store_true", help="submit it with sbatch")
    p.set_defaults(func=run_slurm, accepts_overrides=True)

    p = kinds.add_parser(
        "local", help="train on this node with torchrun",
        description="Validate CONFIG, then run `torchrun --standalone --nproc-per-node N -m pretrain.cli train "
        "CONFIG` (OMP_NUM_THREADS defaults to cores / N). Dotted overrides are passed to polar train.",
    )
    p.add_argument("config", help="training recipe (configs/*.yaml)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes on this node (default 1)")
    p.set_defaults(func=run_local, accepts_overrides=True)
