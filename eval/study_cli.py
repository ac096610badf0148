"""CLI glue for `polar study depth` (the paper's Fig. 4 sweep; logic in eval.study): print the grid, then run
the cells here one after another, one cell (`--cell I`, what SLURM array tasks run), only the combining
step (`--combine`), or render/submit the SLURM array (`--slurm`). Heavy modules load inside the handler."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parents[1] / "launch" / "slurm" / "study.sbatch"


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"expected comma-separated integers like 2,4,8, got {text!r}") from None


def render_study_sbatch(config: str, overrides: list[str], out_dir: Path, combine: bool, cells: int,
                        extra: list[str]) -> str:
    """study.sbatch with this study's variables and #SBATCH directives (array or combining job) filled in."""
    directives = [f"--output={out_dir.resolve()}/logs/slurm-%A_%a.out"]
    directives += [f"--array=0-{cells - 1}"] if not combine else ["--job-name=polar-study-combine"]
    directives += extra
    env = {"STUDY_CONFIG": str(Path(config).resolve()), "POLAR_OVERRIDES": " ".join(overrides),
           "POLAR_PYTHON": sys.executable, **({"COMBINE": "1"} if combine else {})}
    lines = TEMPLATE.read_text().splitlines()
    first_cmd = next(i for i, line in enumerate(lines) if i > 0 and line.strip() and not line.startswith("#"))
    block = [f"#SBATCH {d}" for d in directives] + [""] + [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    return "\n".join(lines[:first_cmd] + block + [""] + lines[first_cmd:]) + "\n"


def _sbatch(script: str, *args: str) -> str:
    out = subprocess.run(["sbatch", "--parsable", *args], input=script, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"sbatch failed: {out.stderr.strip()}")
    return out.stdout.strip().split(";")[0]


def run_study_cmd(args: argparse.Namespace) -> int:
    from eval.study import combine, expand_grid, grid_table, load_study_config, run_cell, run_study
    from models.typed_config import parse_override_args

    overrides = parse_override_args(args.overrides)
    if args.depths:
        overrides["study.depths"] = _ints(args.depths)
    if args.seq_lens:
        overrides["study.seq_lens"] = _ints(args.seq_lens)
    cfg = load_study_config(args.config, overrides)
    cells = expand_grid(cfg)
    if args.cell is not None:  # one array task: no grid print, no combining
        if not 0 <= args.cell < len(cells):
            raise ValueError(f"--cell {args.cell}: the grid has cells 0..{len(cells) - 1}")
        return 0 if run_cell(cfg, cells[args.cell]) else 1
    if args.combine:
        table = combine(cfg, cells)
        print(table.read_text() if table else "no cell has scores yet", end="")
        return 0
    print(grid_table(cells), end="")
    if args.plan:
        return 0
    if args.slurm:
        flat = [*args.overrides, *(["--study.depths", f"[{args.depths}]"] if args.depths else []),
                *(["--study.seq_lens", f"[{args.seq_lens}]"] if args.seq_lens else [])]
        extra = [f"--{k}={v}" for k, v in (("time", args.time), ("partition", args.partition),
                                           ("account", args.account)) if v]
        extra += [f"--gpus-per-task={args.gpus}"] if args.gpus else []
        array = render_study_sbatch(args.config, flat, cfg.study.dir, False, len(cells), extra)
        final = render_study_sbatch(args.config, flat, cfg.study.dir, True, len(cells), extra)
        if not args.submit:
            print(array, "\n# --- then, after the array (sbatch --dependency=afterany:ARRAY_JOB) ---\n", final, sep="")
            return 0
        (cfg.study.dir / "logs").mkdir(parents=True, exist_ok=True)
        job = _sbatch(array)
        done = _sbatch(final, f"--dependency=afterany:{job}")
        print(f"submitted array job {job} ({len(cells)} cells) and combining job {done}")
        return 0
    failed = run_study(cfg, cells)
    table = cfg.study.dir / "study.md"
    if table.is_file():
        print(table.read_text(), end="")
        print(f"wrote {table}, study.csv, study.json and study.png in {cfg.study.dir}")
    if failed:
        print(f"failed cells (rerun to retry them): {', '.join(failed)}")
    return 1 if failed else 0


def register(sub: argparse._SubParsersAction) -> None:
    st = sub.add_parser("study", help="the paper's studies as sweeps: depth x context length at fixed size (Fig. 4)",
                        description="Sweeps that reproduce the paper's studies. See `polar study depth --help`.")
    kinds = st.add_subparsers(dest="study_command", metavar="STUDY", required=True)
    p = kinds.add_parser(
        "depth", help="train and score a depth x context-length grid at fixed parameter count (Fig. 4)",
        description="Expand the study CONFIG's base training recipe into variant (baseline/polarized) x depth x "
        "training context length cells, each depth with the d_model whose counted parameters are within "
        "study.param_tolerance of the base model's; print the grid; then train every cell (here one after "
        "another, or with --slurm as one SLURM job array), score each final checkpoint on held-out loss at several "
        "context lengths and on NIAH, and write study.{json,csv,md,png} (metric vs depth, one line per context "
        "length, variants side by side) to STUDY_DIR. Finished cells are skipped; a failed cell is reported and "
        "retried (resuming from its checkpoint), never fatal to the others. Dotted overrides apply to the study "
        "config (--train.schedule.steps 100 --eval.windows 32). "
        "Example: polar study depth configs/studies/depth-cpu.yaml --depths 1,2,4 --seq-lens 64,128",
    )
    p.add_argument("config", help="study config (configs/studies/*.yaml)")
    p.add_argument("--depths", default=None, help="comma-separated layer counts (default: the config's)")
    p.add_argument("--seq-lens", default=None, help="comma-separated training context lengths (default: the config's)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--plan", action="store_true", help="print the grid with counted parameters and stop")
    mode.add_argument("--cell", type=int, default=None, metavar="I",
                      help="train and score only cell I (what SLURM array tasks run)")
    mode.add_argument("--combine", action="store_true", help="only write the combined table and plot")
    mode.add_argument("--slurm", action="store_true", help="render the SLURM array + combining job (add --submit)")
    p.add_argument("--submit", action="store_true", help="with --slurm: submit them with sbatch")
    p.add_argument("--time", help="with --slurm: time limit per cell, e.g. 04:00:00")
    p.add_argument("--partition", help="with --slurm: partition")
    p.add_argument("--account", help="with --slurm: account")
    p.add_argument("--gpus", type=int, default=0, help="with --slurm: GPUs per cell (default 0)")
    p.set_defaults(func=run_study_cmd, accepts_overrides=True)
