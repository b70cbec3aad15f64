"""`codegen2 data prepare`: run the prepare stages (see `steps`) on a datatrove executor.

Local (default): `LocalPipelineExecutor`, `tasks` tasks run `workers` at a time on this machine.
Slurm: one `SlurmPipelineExecutor` array job per stage, chained with `afterok` dependencies (submitted from
this process, which then exits; `dry_run` writes the sbatch scripts without submitting).
Ray: one `RayPipelineExecutor` per stage on the Ray cluster `ray.init()` finds (a local one if none).

The output directory holds `plan.json` (what is being prepared) from the start and `manifest.json` once done.
A directory that holds a plan is only continued with `resume=True` and the same settings; datatrove's
completion files (`logs/STAGE/completions/`) tell which tasks are finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from codegen2.config import Config
from codegen2.data.formats import mark_not_data, walk_files
from codegen2.data.prepare.decontaminate import benchmark_patterns
from codegen2.data.prepare.shards import MANIFEST, PreparedData
from codegen2.data.prepare.steps import (
    BandsStep,
    ClusterStep,
    MergeStep,
    ReadStep,
    TokenizerStep,
    TokenizeStep,
    quiet_datatrove_logs,
    write_json,
)
from codegen2.data.sources import data_sources
from codegen2.errors import UserError
from codegen2.fsutil import LOCK_FILE, DirectoryLock, check_space, storage_errors

EXECUTORS = ("local", "slurm", "ray")
PLAN = "plan.json"


@dataclasses.dataclass
class SlurmOptions:
    partition: str = ""
    time: str = "24:00:00"
    cpus_per_task: int = 1
    mem_per_cpu_gb: int = 2
    venv_path: str = ""
    dry_run: bool = False


def prepare_settings(config: Config) -> dict[str, Any]:
    """Everything that changes the prepared output (and nothing that does not, like tasks or workers)."""
    data = dataclasses.asdict(config.data)
    for key in ("prepared", "max_doc_chars"):
        data.pop(key, None)
    return {"data": data, "prepare": dataclasses.asdict(config.prepare),
            "tokenizer": dataclasses.asdict(config.tokenizer), "seed": config.train.seed}


def settings_fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def _check_out_dir(out: Path, plan: dict[str, Any], resume: bool) -> bool:
    """Validate `out` against the plan; True when it already holds the finished result."""
    plan_path = out / PLAN
    if plan_path.is_file():
        try:
            old = json.loads(plan_path.read_text(encoding="utf-8"))
        except ValueError:
            raise UserError(f"{plan_path}: unreadable; this directory was not written by codegen2 data prepare") \
                from None
        if not resume:
            done = "a finished" if (out / MANIFEST).is_file() else "an unfinished"
            raise UserError(f"--out {out} holds {done} prepare; pass --resume to continue it, or choose another --out")
        for key in ("fingerprint", "tasks"):
            if old.get(key) != plan[key]:
                what = "the settings (sources, filters, dedup, tokenizer)" if key == "fingerprint" else "--tasks"
                raise UserError(f"--out {out} was started with other {what} ({key} {old.get(key)} != {plan[key]}); "
                                "resume with the same ones, or choose another --out")
        return (out / MANIFEST).is_file()
    if out.exists() and any(p.name not in (".codegen2-not-data", LOCK_FILE) for p in out.iterdir()):
        raise UserError(f"--out {out} exists and is not a prepare directory; choose a new or empty directory")
    return False


def build_stages(config: Config, out: Path, tasks: int, patterns: dict[str, str],
                 fingerprint: str, settings: dict[str, Any]) -> list[tuple[str, list, int]]:
    """(name, pipeline, tasks) of each stage, in order."""
    band_tasks = max(1, min(tasks, config.prepare.minhash_bands))
    o = str(out)
    return [
        ("read", [ReadStep(config, o, tasks, patterns)], tasks),
        ("bands", [BandsStep(config, o, tasks)], band_tasks),
        ("cluster", [ClusterStep(config, o, tasks, band_tasks)], 1),
        ("tokenizer", [TokenizerStep(config, o, tasks)], 1),
        ("tokenize", [TokenizeStep(config, o, tasks)], tasks),
        ("merge", [MergeStep(config, o, tasks, fingerprint, settings)], 1),
    ]


def _executor(kind: str, pipeline: list, tasks: int, workers: int, logging_dir: Path, depends, name: str,
              slurm: SlurmOptions | None):
    if kind == "local":
        from datatrove.executor import LocalPipelineExecutor

        return LocalPipelineExecutor(pipeline, tasks=tasks, workers=max(1, min(workers, tasks)), start_method="fork",
                                     logging_dir=str(logging_dir), skip_completed=True)
    if kind == "ray":
        from datatrove.executor.ray import RayPipelineExecutor

        return RayPipelineExecutor(pipeline, tasks=tasks, workers=max(1, min(workers, tasks)),
                                   logging_dir=str(logging_dir), skip_completed=True, cpus_per_task=1,
                                   mem_per_cpu_gb=1)
    from datatrove.executor import SlurmPipelineExecutor

    slurm = slurm or SlurmOptions()
    if not slurm.partition:
        raise UserError("--executor slurm needs --partition NAME")
    return SlurmPipelineExecutor(pipeline, tasks=tasks, time=slurm.time, partition=slurm.partition,
                                 cpus_per_task=slurm.cpus_per_task, mem_per_cpu_gb=slurm.mem_per_cpu_gb,
                                 workers=workers if workers > 0 else -1, job_name=f"codegen2-prepare-{name}",
                                 venv_path=f"{slurm.venv_path}/bin/activate" if slurm.venv_path else None,
                                 logging_dir=str(logging_dir), depends=depends, skip_completed=True, mail_type="NONE")


def prepare(config: Config, out: str | Path, tasks: int = 1, workers: int = 1, executor: str = "local",
            resume: bool = False, slurm: SlurmOptions | None = None, log=None) -> dict[str, Any] | list[str]:
    """Prepare `config`'s data into `out`; returns the manifest (for slurm: the job scripts or ids)."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    if executor not in EXECUTORS:
        raise UserError(f"--executor {executor!r}: choose one of {', '.join(EXECUTORS)}")
    if tasks < 1 or workers < 1:
        raise UserError(f"--tasks {tasks} and --workers {workers} must be at least 1")
    config.validate()
    out = Path(out).expanduser().resolve()
    for split in ("train", "heldout"):
        data_sources(config.data, split, all_kinds=True)  # bad paths and formats fail here, before any work
    settings = prepare_settings(config)
    fingerprint = settings_fingerprint(settings)
    plan = {"fingerprint": fingerprint, "tasks": tasks, "settings": settings}
    if _check_out_dir(out, plan, resume):
        log(f"{out}: already prepared (manifest.json present); nothing to do")
        return PreparedData.open(out).manifest
    with DirectoryLock(out, "data preparation"):  # one writer: a second prepare of `out` is refused while this runs
        return _prepare_locked(config, out, tasks, workers, executor, resume, slurm, plan, log)


def _prepare_locked(config: Config, out: Path, tasks: int, workers: int, executor: str, resume: bool,
                    slurm: SlurmOptions | None, plan: dict[str, Any], log) -> dict[str, Any] | list[str]:
    """`prepare` once it holds `out`'s lock: checked again (another process may have finished it meanwhile),
    then the stages built and run or submitted."""
    if _check_out_dir(out, plan, resume):
        log(f"{out}: already prepared (manifest.json present); nothing to do")
        return PreparedData.open(out).manifest
    fingerprint, settings = plan["fingerprint"], plan["settings"]
    patterns = benchmark_patterns(config.prepare.decontaminate, config.prepare.decontaminate_min_chars)
    mark_not_data(out)
    if not (out / PLAN).is_file():
        write_json(out / PLAN, plan)
    quiet_datatrove_logs()
    stages = build_stages(config, out, tasks, patterns, fingerprint, settings)
    previous = None
    executors = []
    for number, (name, pipeline, stage_tasks) in enumerate(stages, start=1):
        ex = _executor(executor, pipeline, stage_tasks, workers, out / "logs" / f"{number}-{name}", previous, name,
                       slurm)
        executors.append((number, name, ex))
        previous = ex
    if executor == "slurm":
        return _submit_slurm(executors, slurm or SlurmOptions(), log)
    _run_here(executors, executor, workers, out, source_bytes(config), log)
    manifest = PreparedData.open(out).manifest
    log(summary(manifest, out))
    return manifest


def _run_here(executors, kind: str, workers: int, out: Path, raw_bytes: int, log) -> None:
    """Run the stages one after the other from this process (local or ray), skipping the tasks already done, and
    record each stage's time in logs/timings.json. A stage whose output cannot fit in `out` is refused before it
    starts, and one that fills the disk anyway ends in one line (RetryLater); `--resume` continues there."""
    timings_path = out / "logs" / "timings.json"
    if kind == "ray":
        import ray

        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=False,
                     include_dashboard=False, configure_logging=False)
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    for number, name, ex in executors:
        incomplete = ex.get_incomplete_ranks()
        if not incomplete:
            log(f"stage {number}/{len(executors)} {name}: all {ex.world_size} tasks already done")
            continue
        log(f"stage {number}/{len(executors)} {name}: {len(incomplete)} of {ex.world_size} tasks "
            f"({kind}, {min(workers, ex.world_size)} at a time)")
        check_space(out, stage_bytes(name, raw_bytes, len(incomplete), ex.world_size), f"prepare stage {name}")
        started = time.perf_counter()
        ex.depends = None  # stages run one after the other here
        with storage_errors(out, f"prepare stage {name}"):
            ex.run()
        quiet_datatrove_logs()
        left = ex.get_incomplete_ranks()
        if left:
            raise UserError(f"prepare stage {name}: tasks {left} did not finish; see {ex.logging_dir.path}/logs, "
                            "then rerun with --resume")
        timings[name] = {"seconds": round(time.perf_counter() - started, 3), "tasks": len(incomplete),
                         "workers": min(workers, ex.world_size)}
        write_json(timings_path, timings)


# Bytes a stage writes per byte of raw source data, at most: read copies the kept text (as JSON lines), tokenize
# writes its tokens (up to 4 bytes each, about one per 3 characters of code), merge the final shards and the
# held-out documents; bands, cluster and tokenizer write small tables.
STAGE_BYTES_PER_RAW_BYTE = {"read": 1.3, "bands": 0.2, "cluster": 0.05, "tokenizer": 0.01, "tokenize": 1.4,
                            "merge": 1.5}


def stage_bytes(stage: str, raw_bytes: int, tasks_left: int, tasks: int) -> int:
    """About how many bytes `stage` still writes: its share of raw data for the tasks not yet done."""
    share = raw_bytes * tasks_left / max(1, tasks)
    return int(STAGE_BYTES_PER_RAW_BYTE.get(stage, 1.0) * share) + (1 << 20)


def source_bytes(config: Config) -> int:
    """Bytes of raw data the sources of `config` hold (the files a preparation reads)."""
    total = 0
    for source in data_sources(config.data, "train", all_kinds=True):
        for root in source.roots:
            for path in [root] if root.is_file() else [p for _, p in walk_files(root)] if root.is_dir() else []:
                with contextlib.suppress(OSError):  # a file gone since the walk is skipped by the read too
                    total += path.stat().st_size
    return total


def _submit_slurm(executors, slurm: SlurmOptions, log) -> list[str]:
    """Submit the chained array jobs (or, with dry_run, only write and return their sbatch scripts)."""
    if slurm.dry_run:  # the real submission path, with sbatch replaced by a recorder
        import datatrove.executor.slurm as slurm_module

        scripts: list[str] = []

        def record(contents: str, _retriever, *args) -> str:
            scripts.append(contents + "\n# sbatch arguments: " + " ".join(args) + "\n")
            return f"dry-run-{len(scripts)}"

        submit, slurm_module.launch_slurm_job = slurm_module.launch_slurm_job, record
        try:
            executors[-1][2].run()
        finally:
            slurm_module.launch_slurm_job = submit
        for number, name, ex in executors:
            log(f"stage {number} {name}: {ex.world_size} tasks, job {ex.job_id} (dry run, not submitted); "
                f"script {ex.logging_dir.path}/launch_script.slurm")
        return scripts
    executors[-1][2].run()  # submits every stage, each depending on the one before
    ids = [str(ex.job_id) for _, _, ex in executors]
    log(f"submitted Slurm jobs {', '.join(ids)}; the manifest appears in the output directory when the last finishes")
    return ids


def summary(manifest: dict[str, Any], out: Path) -> str:
    lines = [f"prepared {out}: {manifest['totals']['docs']:,} documents, {manifest['totals']['tokens']:,} tokens"]
    for source in manifest["sources"]:
        if source.get("git"):
            lines.append(f"  {source['name']}: {git_summary(source['git'])}")
        for split, s in source["splits"].items():
            removed = ", ".join(f"{k} {v:,}" for k, v in s["removed"].items() if v) or "none removed"
            skipped = ", ".join(f"{k} {v:,}" for k, v in s.get("skipped", {}).items() if v)
            redacted = ", ".join(f"{k} {v:,}" for k, v in s.get("redacted", {}).items() if v)
            lines.append(f"  {source['name']}/{split}: {s['docs_in']:,} in -> {s['docs']:,} kept, "
                         f"{s['tokens']:,} tokens in {len(s['shards'])} shard(s); {removed}"
                         + (f"; skipped {skipped}" if skipped else "")
                         + (f"; secrets redacted: {redacted}" if redacted else ""))
    return "\n".join(lines)


def git_summary(git: dict[str, Any]) -> str:
    """How a source in a git work tree was read, for the summary."""
    commit = (git["commit"] or "")[:12] or "no commit yet"
    edits = ", with uncommitted edits" if git["dirty"] else ""
    return (f"git work tree at {commit}{edits}: the {git['tracked_files']:,} tracked file(s) "
            "(untracked and ignored files not read)")
