"""`codegen2 data prepare`: the command line of the prepare pipeline (codegen2.data.prepare)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_prepare(args: argparse.Namespace) -> int:
    from codegen2.config import load_config
    from codegen2.data.prepare.pipeline import SlurmOptions, prepare
    from codegen2.data.sources import source_from_path

    out = Path(args.out)
    plan = out / "plan.json"
    tasks = args.tasks
    if tasks is None:
        tasks = json.loads(plan.read_text(encoding="utf-8"))["tasks"] if args.resume and plan.is_file() else 1
    if args.resume and plan.is_file() and not (args.config or args.data or args.set):
        from codegen2.config import config_from_dict

        settings = json.loads(plan.read_text(encoding="utf-8"))["settings"]
        config = load_config(args.config, overrides=args.set)
        config = config_from_dict({**config.to_dict(), "data": settings["data"], "prepare": settings["prepare"],
                                   "tokenizer": settings["tokenizer"],
                                   "train": {**config.to_dict()["train"], "seed": settings["seed"]}}).validate()
    else:
        config = load_config(args.config, overrides=args.set)
        if args.data:
            config.data.sources = [source_from_path(p) for p in args.data] + \
                [s for s in config.data.sources if s.path not in args.data]
            config.validate()
    slurm = SlurmOptions(partition=args.partition, time=args.time, cpus_per_task=args.cpus_per_task,
                         venv_path=args.venv, dry_run=args.dry_run)
    prepare(config, out, tasks=tasks, workers=args.workers or tasks, executor=args.executor,
            resume=args.resume, slurm=slurm)
    return 0


def register(sub) -> None:
    data = sub.add_parser("data", help="data preparation").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("prepare", help="filter, deduplicate, decontaminate and tokenize into token shards")
    p.add_argument("--config", help="TOML config ([data] sources, [prepare] filters/dedup, [tokenizer])")
    p.add_argument("--data", action="append", default=[], help="directory, .jsonl[.gz|.zst] or .parquet (repeatable)")
    p.add_argument("--out", required=True, help="the prepared data directory to write")
    p.add_argument("--tasks", type=int, default=None, help="work units (files are split between them; default 1, "
                   "or the resumed prepare's); the output is identical for any value")
    p.add_argument("--workers", type=int, default=0, help="tasks run at once (default: --tasks)")
    p.add_argument("--executor", default="local", choices=["local", "slurm", "ray"])
    p.add_argument("--resume", action="store_true", help="continue a killed prepare (finished tasks are skipped)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    slurm = p.add_argument_group("slurm")
    slurm.add_argument("--partition", default="", help="Slurm partition")
    slurm.add_argument("--time", default="24:00:00", help="time limit of each array job")
    slurm.add_argument("--cpus-per-task", type=int, default=1, dest="cpus_per_task")
    slurm.add_argument("--venv", default="", help="virtualenv the Slurm jobs activate")
    slurm.add_argument("--dry-run", action="store_true", dest="dry_run",
                       help="write the sbatch scripts under OUT/logs without submitting them")
    p.set_defaults(func=cmd_prepare)
