"""The pretrain package's commands: `polar prepare`, `plan`, `train`, `export`, `publish` and `info` — each
parser and its thin handler here, the logic in the module the handler calls. Heavy modules load inside handlers
so `polar --help` stays instant."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

EXIT_CODES = "Exit codes: 0 done, 75 checkpointed after SIGTERM/SIGUSR1 (run again to resume), 3 stopped " \
             "after repeated non-finite losses, 2 bad input, another trainer holding the run, or a failed save " \
             "(one line on stderr; RUN/status.json says why)."


def _field_comments(cls: type) -> dict[str, str]:
    """``name: type = default  # comment`` -> {name: comment}, read from the source of the dataclass and of the
    dataclasses it inherits fields from (a model config extends ModelConfig)."""
    import dataclasses
    import inspect
    import re

    return {m[1]: m[2].strip() for klass in reversed(cls.__mro__) if dataclasses.is_dataclass(klass)
            for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", inspect.getsource(klass), re.M)}


def _default_text(value) -> str:
    import json

    return value if isinstance(value, str) else json.dumps(value)


def config_reference() -> str:
    """Every config key of `polar train` with its type, default and comment, generated from the TrainConfig
    dataclasses (so it cannot drift from the code)."""
    import dataclasses
    import typing

    from pretrain.config import TrainConfig

    lines = ["config keys (YAML sections; override any with --SECTION.KEY VALUE; model: {preset: NAME} "
             "starts from a preset):"]

    def walk(obj, prefix: str) -> None:
        hints, comments = typing.get_type_hints(type(obj)), _field_comments(type(obj))
        for f in dataclasses.fields(obj):
            value, key = getattr(obj, f.name), prefix + f.name
            if dataclasses.is_dataclass(value):
                lines.append(f"  [{key}]")
                walk(value, key + ".")
                continue
            choices = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is typing.Literal else ()
            hint = hints[f.name]
            kind = ("|".join(map(str, choices)) if choices
                    else hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", ""))
            note = f"  # {comments[f.name]}" if f.name in comments else ""
            lines.append(f"  --{key} {_default_text(value)}  ({kind}){note}")

    walk(TrainConfig(), "")
    return "\n".join(lines)


class ConfigHelp(argparse.Action):
    """-h/--help that also prints the config reference (generated on demand: it imports the model code)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.print_help()
        print()
        print(config_reference())
        parser.exit()


def _config(args: argparse.Namespace):
    from models.typed_config import parse_override_args
    from pretrain.config import load_config

    return load_config(args.config, parse_override_args(args.overrides))


def finished_run_report(cfg) -> str | None:
    """The report of a run whose latest checkpoint already reached its step budget, read from its files
    (nothing is built, no wandb run is opened); None when there is training left to do."""
    import torch

    from models.build import build_model
    from models.config import ModelConfig
    from pretrain import checkpoint as ckpt
    from pretrain.export import checkpoint_location
    from pretrain.init_from import adopt_recorded_source
    from pretrain.metrics import loss_summary
    from pretrain.schedule import make_budget

    loc = checkpoint_location(cfg.run.dir)
    if loc is None:
        return None
    saved = ckpt.read_state(*loc)["config"]["model"]
    adopt_recorded_source(cfg.model, saved)
    if ModelConfig.from_dict(saved).to_dict() != cfg.to_dict()["model"]:
        return None  # not this run's model: the trainer refuses it with the difference named
    step = ckpt.step_of(loc[1])
    with torch.device("meta"):
        params = build_model(cfg.model).num_parameters()
    steps = make_budget(cfg, params).steps
    if step < steps:
        return None
    return (f"run already finished at step {step} of {steps} ({cfg.run.dir}): nothing to do (raise schedule.steps "
            f"to train on, or start a new run.name)\nloss: {loss_summary(cfg.run.dir)}")


def run_train(args: argparse.Namespace) -> int:
    from pretrain.runlock import exit_with_launcher

    exit_with_launcher()  # first: no orphaned worker may write to the run
    cfg = _config(args)
    if (report := finished_run_report(cfg)) is not None:
        if int(os.environ.get("RANK", "0")) == 0:
            print(report)
        return 0
    from pretrain.trainer import train

    return train(cfg)


def run_plan(args: argparse.Namespace) -> int:
    from pretrain.memory import per_gpu_memory
    from pretrain.mixture import MAX_EPOCHS, plan_sources
    from pretrain.schedule import plan

    cfg = _config(args)
    p = plan(cfg, args.mfu, args.gpu, args.gpus)
    print(f"parameters        {p['params']:,}")
    print(f"tokens            {p['tokens']:,} ({p['tokens_per_param']:.1f} per parameter)")
    print(f"steps             {p['steps']:,} x {p['tokens_per_step']:,} tokens (warmup {p['warmup_steps']:,})")
    print(f"training FLOPs    {p['train_flops']:.3e}")
    print(f"GPU-hours         {p['gpu_hours']:,.1f} on {p['gpu']} at {p['mfu']:.0%} MFU "
          f"({p['wall_hours']:,.1f} h on {p['gpus']} GPUs)")
    data, per_step = cfg.data, cfg.data.micro_batch_size * args.gpus
    if data.global_batch_size % per_step:
        print(f"warning: data.global_batch_size {data.global_batch_size} is not a multiple of micro_batch_size x "
              f"GPUs = {data.micro_batch_size} x {args.gpus}: polar train will refuse it; use a global batch of "
              f"{max(per_step, data.global_batch_size // per_step * per_step)} or another --gpus")
    else:
        print(f"batch             {data.global_batch_size} = {data.micro_batch_size} per GPU x {args.gpus} GPUs x "
              f"{data.global_batch_size // per_step} accumulation steps")
    for src in plan_sources([(s.label, s.weight, s.path) for s in data.source_list()]):
        epochs = src.epochs(p["tokens"])
        seen = "not prepared yet" if epochs is None else f"{src.tokens:,} tokens, {epochs:.2f} epochs"
        print(f"source {src.name:<10} {src.share:6.1%} of the samples: {seen}")
        if epochs is not None and epochs > MAX_EPOCHS:
            print(f"warning: source {src.name} repeats {epochs:.1f} times at this budget (more than {MAX_EPOCHS}): "
                  "lower its weight or the budget, or add data")
    mem = per_gpu_memory(cfg.model, p["params"], cfg.distributed.zero_stage, args.gpus, data.micro_batch_size,
                         data.seq_len, "fp32" if cfg.precision.dtype == "fp32" else "bf16")
    gib = {k: v / 2**30 for k, v in mem.items()}
    print(f"memory per GPU    ~{gib['total']:.2f} GiB = parameters {gib['params']:.2f} + gradients "
          f"{gib['grads']:.2f} + AdamW {gib['optimizer']:.2f} (ZeRO-{cfg.distributed.zero_stage} over {args.gpus}) "
          f"+ activations {gib['activations']:.2f} (micro-batch {data.micro_batch_size} x {data.seq_len}); "
          "plus ~0.5-1 GiB of CUDA context and workspaces")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from models.hf import config_from_json, stock_class
    from pretrain.export import export

    out = export(args.run, args.out or Path(args.run) / "export", args.step, args.force)
    stock = stock_class(config_from_json(json.loads((out / "config.json").read_text())))
    loads = f"transformers.{stock}" if stock else "polar-mamba's models.hf"
    print(f"exported {args.run} -> {out} (loads with {loads}.from_pretrained)")
    return 0


def run_publish(args: argparse.Namespace) -> int:
    from pretrain.publish import publish

    print(publish(args.run, args.repo_id, args.step, args.revision, args.private, args.dry_run, args.license,
                  force=args.force, project_url=args.project_url, out=args.out))
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    import time

    from pretrain.prepare import PrepareConfig, prepare

    cfg = PrepareConfig(
        dataset=args.dataset,
        tokenizer=args.tokenizer,
        out=args.out,
        val_fraction=args.val_fraction,
        num_proc=args.num_proc,
        workers=args.workers,
        tasks=args.tasks,
        force=args.force,
        text_field=args.text_field,
        shard_tokens=args.shard_tokens,
    )
    if args.slurm:
        from pretrain.prepare import submit
        from pretrain.prepare_engine import SlurmOptions

        print(submit(cfg, SlurmOptions(args.partition, args.time, args.cpus_per_task, args.mem_per_cpu_gb, args.qos,
                                       not args.no_requeue, args.max_parallel)))
        return 0
    t0 = time.perf_counter()
    manifest = prepare(cfg)
    dt = time.perf_counter() - t0
    total = sum(s["tokens"] for s in manifest["splits"].values())
    for name, s in manifest["splits"].items():
        print(f"{name:<5} {s['documents']:>10,} docs {s['tokens']:>14,} tokens in {len(s['shards'])} shard(s)")
    print(f"wrote {cfg.out} ({manifest['dtype']}) in {dt:.1f}s: {total / dt / 1e6:.2f}M tokens/s")
    return 0

def run_info(args: argparse.Namespace) -> int:
    from pretrain.info import print_info

    print_info()
    return 0

def register(sub: argparse._SubParsersAction) -> None:
    from tokenizer.commands import SPEC_HELP

    p = sub.add_parser(
        "prepare",
        help="tokenize a dataset into train/val token shards",
        description="Tokenize a dataset into token shards (OUT/{train,val}_NNNNN.bin, documents ended by EOS, a "
        "document index .idx beside each) plus OUT/manifest.json, written atomically, as datatrove tasks, here "
        "(--workers) or as a SLURM job array (--slurm); rerun after a kill, it redoes only unfinished tasks. See "
        "docs/data.md.",
    )
    p.add_argument("--dataset", required=True, metavar="SPEC", help=SPEC_HELP)
    p.add_argument("--tokenizer", required=True, metavar="REF",
                   help="a `polar tokenizer train` folder or SentencePiece .model file, a tokenizer.json or "
                   "transformers tokenizer folder, or a Hub id (EleutherAI/gpt-neox-20b)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--val-fraction", type=float, default=0.01, metavar="F", help="share of documents held out")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes running the tokenize tasks (datatrove's local executor)")
    p.add_argument("--tasks", type=int, default=64, metavar="N",
                   help="tokenize tasks, at most one per file or Hub shard; a rerun redoes only unfinished ones")
    p.add_argument("--num-proc", type=int, metavar="N", help="encoder threads per worker (default: cores / workers)")
    p.add_argument("--text-field", default="text", metavar="F", help="text field of json/parquet/hub records")
    p.add_argument("--shard-tokens", type=int, default=1 << 28, metavar="N", help="tokens per shard file")
    p.add_argument("--force", action="store_true", help="replace an existing --out (only once the new one is done)")
    slurm = p.add_argument_group("cluster (--slurm): the tasks as a SLURM job array, then a merge job")
    slurm.add_argument("--slurm", action="store_true",
                       help="submit instead of running here: one array task per tokenize task (datatrove's SLURM "
                       "executor), the merge as a job depending on it; returns once submitted")
    slurm.add_argument("--partition", metavar="P", help="SLURM partition (default: the cluster's default)")
    slurm.add_argument("--time", default="24:00:00", metavar="T", help="time limit per task (default 24:00:00)")
    slurm.add_argument("--cpus-per-task", type=int, default=4, metavar="N",
                       help="CPUs per array task, also its encoder threads (default 4)")
    slurm.add_argument("--mem-per-cpu-gb", type=int, metavar="G", help="memory per CPU (default: the cluster's)")
    slurm.add_argument("--qos", metavar="Q", help="SLURM QOS (default: none)")
    slurm.add_argument("--max-parallel", type=int, metavar="N", help="array tasks running at once (default: all)")
    slurm.add_argument("--no-requeue", action="store_true",
                       help="do not requeue a preempted or failed array task (default: requeue)")
    p.set_defaults(func=run_prepare)

    p = sub.add_parser(
        "train", add_help=False,
        help="train a model from a YAML recipe (DeepSpeed ZeRO; resumes automatically)",
        description="Train from a YAML recipe with DeepSpeed ZeRO; override any key with dotted flags (--optim.lr "
        "1e-3). Runs alone "
        "or under torchrun/deepspeed/srun; resumes from RUN/checkpoints/latest. Exit codes: 0 done, 75 preempted "
        "(rerun), 3 non-finite, 2 bad input. See docs/training.md.",
    )
    p.add_argument("-h", "--help", action=ConfigHelp, help="show this help, with every config key and its default")
    p.add_argument("config", help="YAML recipe, e.g. configs/demo-cpu.yaml")
    p.set_defaults(func=run_train, accepts_overrides=True)

    p = sub.add_parser(
        "plan", add_help=False,
        help="print a recipe's parameters, tokens, steps, FLOPs and GPU-hours",
        description="Budget a recipe without training: counted parameters, tokens, steps, FLOPs, GPU-hours at "
        "--mfu, the batch "
        "split over --gpus and memory per GPU. Accepts dotted overrides. See docs/training.md.",
    )
    p.add_argument("-h", "--help", action=ConfigHelp, help="show this help, with every config key and its default")
    p.add_argument("config", help="YAML recipe, e.g. configs/chinchilla-130m.yaml")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default 0.4)")
    p.add_argument("--gpu", default="H100", help="GPU model for the peak FLOP/s table (default H100)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs in the job, for wall-clock hours, the batch split and "
                   "memory per GPU (default 8)")
    p.set_defaults(func=run_plan, accepts_overrides=True)

    p = sub.add_parser(
        "export",
        help="consolidate a checkpoint into a Hugging Face folder",
        description="Consolidate a checkpoint (any ZeRO stage) into config.json + model.safetensors + the "
        "tokenizer, loadable by "
        "polar and by the architecture's stock transformers class. See docs/publish.md.",
    )
    p.add_argument("run", help="run directory (runs/NAME), its checkpoints/ folder or one checkpoint tag folder")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/export)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=run_export)

    p = sub.add_parser(
        "publish",
        help="publish a checkpoint to the Hugging Face Hub (model card, tokenizer, stock-transformers weights)",
        description="Build a Hub-ready folder from a checkpoint (stock-transformers weights, tokenizer, a model "
        "card with that "
        "step's losses and evaluations), check it and upload it as one commit to branch stepN; --dry-run only "
        "builds it. See docs/publish.md.",
    )
    p.add_argument("run", help="run directory (runs/NAME) or a checkpoint tag folder")
    p.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub (created if missing)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--revision", default=None, help="branch to upload to (default: stepN)")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--license", default="apache-2.0", help="license in the card metadata (default apache-2.0)")
    p.add_argument("--project-url", default=None, help="link to the code in the card (default: none; the card "
                   "names polar-mamba's version and license without a link)")
    p.add_argument("--dry-run", action="store_true", help="build and check the folder, do not upload")
    p.add_argument("--out", metavar="DIR", default=None, help="folder to build (default: a temporary one; "
                   "RUN/hub/step-N with --dry-run)")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    p.set_defaults(func=run_publish)

    p = sub.add_parser(
        "info",
        help="versions, chosen kernel backends and model presets",
        description="Print library versions, the kernel backend each op uses on this machine "
        "(POLAR_KERNELS overrides it) and every model preset with its counted parameters.",
    )
    p.set_defaults(func=run_info)
