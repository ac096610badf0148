"""CLI glue for `polar mqar train|eval` and `polar diagnose` (heavy modules load inside handlers)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _mqar_config(path: str, overrides: list[str]):
    from eval.mqar import load_mqar_config
    from models.typed_config import parse_override_args

    return load_mqar_config(path, parse_override_args(overrides))


def run_mqar_train(args: argparse.Namespace) -> int:
    from eval.mqar import plan, plan_markdown, results_markdown, train_sweep

    cfg = _mqar_config(args.config, args.overrides)
    if args.plan:
        print(plan_markdown(plan(cfg, args.variant, args.layers)), end="")
        return 0
    print(results_markdown(train_sweep(cfg, args.variant, args.layers, args.force)), end="")
    print(f"wrote {cfg.run.dir / 'results.md'} and results.json")
    return 0


def run_mqar_eval(args: argparse.Namespace) -> int:
    from eval.mqar import evaluate, load_cell_model, rescore_sweep, results_markdown
    from models.typed_config import ConfigError

    path = Path(args.target)
    if path.is_file():  # a sweep config
        print(results_markdown(rescore_sweep(_mqar_config(args.target, args.overrides))), end="")
        return 0
    cfg = _mqar_config(args.config, args.overrides) if args.config else None
    if (path / "model.pt").is_file():  # one sweep cell, scored on its own eval stages unless --config
        model, own = load_cell_model(path)
        cfg = cfg or own
    else:  # anything pretrain.export.load_model accepts
        from eval.mqar import default_device
        from pretrain.export import load_model

        if cfg is None:
            raise ConfigError(f"{path} is not an MQAR cell folder: pass --config CONFIG for the eval stages")
        model = load_model(path, args.step).to(default_device())
    accs = evaluate(model, cfg.data)
    out = (Path(args.out) if args.out else path) / "mqar_eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(accs, indent=2) + "\n")
    for k, v in accs.items():
        print(f"{k:>16}  {100 * v:6.2f}%")
    print(f"wrote {out}")
    return 0


def default_diagnose_out(target: str, step: int | None) -> Path:
    """Like the eval commands: the first target's eval folder (RUN/eval/step-N/diagnose); runs/diagnose/NAME
    for a config YAML or a Hub id."""
    from pretrain.export import eval_folder

    path = Path(target)
    return Path("runs") / "diagnose" / path.stem if path.is_file() else eval_folder(path, step) / "diagnose"


def run_diagnose(args: argparse.Namespace) -> int:
    from eval.diagnostics import diagnose, load_target

    names = [Path(t).stem if Path(t).is_file() else Path(t).name for t in args.targets]
    models = {name: load_target(t, args.step) for name, t in zip(names, args.targets)}
    out = Path(args.out) if args.out else default_diagnose_out(args.targets[0], args.step)
    diagnose(models, out, args.batch, args.seq_len, args.seed)
    print(f"wrote recency, oversmoothing and a_range .json/.png to {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mqar", help="multi-query associative recall: train and score the paper's Table 2",
                       description="Multi-query associative recall (zoology's multiquery_ar; the paper's Table 2). "
                       "See `polar mqar train --help` and `polar mqar eval --help`.")
    mqar = p.add_subparsers(dest="mqar_command", metavar="SUBCOMMAND", required=True)
    t = mqar.add_parser(
        "train", help="train and score every variant x depth of a sweep config",
        description="Train each sweep.variants entry (default, ones, zeros, both) at each sweep.n_layers depth "
        "on the data.train curriculum, score it on data.eval, and write OUT/NAME/results.{json,md} (with the "
        "paper's Table 2 beside ours, cell for cell, when the eval stages are the paper's). Each cell reports its "
        "throughput (training tokens/s). Finished cells are skipped (rerun to continue an interrupted sweep; "
        "--force retrains). Dotted overrides apply (--optim.lr 3e-3 --model.polarize.zero_mode exact). "
        "Example: polar mqar train configs/mqar/paper.yaml; --plan prints each cell's cost first.",
    )
    t.add_argument("config", help="MQAR sweep YAML, e.g. configs/mqar/cpu.yaml or configs/mqar/paper.yaml")
    t.add_argument("--variant", action="append", help="train only this variant (repeatable)")
    t.add_argument("--layers", type=int, action="append", help="train only this depth (repeatable)")
    t.add_argument("--force", action="store_true", help="retrain cells that already have a result")
    t.add_argument("--plan", action="store_true", help="print each cell's parameters, steps, tokens and FLOPs "
                   "(per epoch and at most) without training")
    t.set_defaults(func=run_mqar_train, accepts_overrides=True)
    e = mqar.add_parser(
        "eval", help="score a trained sweep, one cell, or any checkpoint on MQAR",
        description="With a sweep CONFIG: re-score every trained cell and rewrite the table. With a cell folder "
        "(OUT/NAME/VARIANT-LN): score it on its own eval stages (or --config's). With a run directory, "
        "checkpoint tag or exported folder: score it on --config's eval stages (its vocabulary must cover "
        "data.vocab_size). Writes mqar_eval.json to --out (default: TARGET).",
    )
    e.add_argument("target", help="sweep config YAML, cell folder, run directory or exported folder")
    e.add_argument("--config", default=None, help="MQAR config whose data.eval stages to use")
    e.add_argument("--step", type=int, default=None, help="checkpoint step of a run directory (default: latest)")
    e.add_argument("--out", default=None, help="output folder for mqar_eval.json (default: TARGET)")
    e.set_defaults(func=run_mqar_eval, accepts_overrides=True)

    d = sub.add_parser(
        "diagnose", help="recency, over-smoothing and A-range diagnostics (paper Fig. 1, 5, 6)",
        description="For each TARGET (a YAML config: a fresh model from its model section; an MQAR cell folder; "
        "a run directory, checkpoint tag or exported folder; any transformers causal LM folder or Hub id, e.g. "
        "state-spaces/mamba-130m-hf or EleutherAI/pythia-160m) measure on random token sequences, through hooks on "
        "each decoder layer's mixer: the influence "
        "|dy_t/dx_s| of each layer against distance t-s (Fig. 1), the average pairwise difference of token "
        "features after each mixer and block (Fig. 5), and the cumulative histogram of A_max - A_min over "
        "the learned SSM channels (Fig. 6, Mamba only). Writes {recency,oversmoothing,a_range}.{json,png} "
        "to --out, several targets overlaid.",
    )
    d.add_argument("targets", nargs="+", metavar="TARGET", help="config YAML, MQAR cell, run directory, export, "
                   "transformers folder or Hub id")
    d.add_argument("--out", default=None, help="output folder (default: the first TARGET's eval folder, "
                   "RUN/eval/step-N/diagnose; runs/diagnose/NAME for a config YAML)")
    d.add_argument("--step", type=int, default=None, help="checkpoint step for run directories (default: latest)")
    d.add_argument("--batch", type=int, default=4, help="random sequences averaged over (default 4)")
    d.add_argument("--seq-len", type=int, default=128, help="sequence length (default 128)")
    d.add_argument("--seed", type=int, default=0, help="seed of the inputs and the projection (default 0)")
    d.set_defaults(func=run_diagnose)
