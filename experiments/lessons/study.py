"""The CodeGen2 lessons at small scale, in one command: train every arm for every seed, evaluate each on the
held-out split, and write docs/lessons.md with its table and plots.

    .venv/bin/python experiments/lessons/study.py            # the whole study (about an hour on 2 cores)
    .venv/bin/python experiments/lessons/study.py --report-only

Arms are `experiments/lessons/arms/*.toml` over `common.toml`; each (arm, seed) is a normal `codegen2 train`
run in RUN_ROOT/<arm>-seed<k>, evaluated by `codegen2 eval heldout` into its eval.json. Everything resumes:
a finished run is skipped, a killed one continues from its last checkpoint. All arms share one tokenizer
(trained first, in this process, by one `codegen2 data prepare` of the common data), so their losses are in
the same units; each run then prepares its data with it into its own RUN/prepared (the same filters, dedup and
held-out split for every arm). Each run gets one thread; `--jobs` runs go side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import report  # noqa: E402  (experiments/lessons/report.py)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class Arm:
    name: str
    description: str
    overrides: list[str]  # `--set section.key=value` items


def flatten_overrides(table: dict, section: str = "") -> list[str]:
    """An arm's TOML tables as `--set` items (the arm file may only set keys of existing sections)."""
    items = []
    for key, value in table.items():
        if isinstance(value, dict):
            items.extend(flatten_overrides(value, key))
        elif section:
            items.append(f"{section}.{key}={json.dumps(value)}")
    return items


def load_arms(names: list[str] | None = None) -> list[Arm]:
    arms = []
    for path in sorted((HERE / "arms").glob("*.toml")):
        values = tomllib.loads(path.read_text(encoding="utf-8"))
        arms.append(Arm(path.stem, values.pop("description", path.stem), flatten_overrides(values)))
    if names:
        known = {a.name for a in arms}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise SystemExit(f"error: unknown arm(s) {', '.join(unknown)}; arms: {', '.join(sorted(known))}")
        arms = [a for a in arms if a.name in names]
    return arms


def shared_overrides(root: Path, steps: int | None, extra: list[str]) -> list[str]:
    """Overrides every run gets: the shared tokenizer, a shorter schedule for --steps, then --set."""
    items = [f'tokenizer.path="{root / "shared" / "tokenizer.json"}"']
    if steps is not None:
        items += [f"train.max_steps={steps}", f"train.eval_every={max(1, steps // 4)}",
                  f"train.checkpoint_every={max(1, steps // 2)}", f"train.log_every={max(1, steps // 4)}",
                  f"train.warmup_steps={max(1, steps // 10)}"]
    return items + extra


def prepare_shared(root: Path, seeds: list[int], extra: list[str]) -> None:
    """Train the one tokenizer (a `codegen2 data prepare` of the common data, first seed) before any run starts."""
    from codegen2.config import load_config
    from codegen2.data.prepare.pipeline import prepare

    shared = root / "shared"
    if (shared / "manifest.json").is_file():
        return
    config = load_config(HERE / "common.toml", overrides=[f"train.seed={seeds[0]}"] + extra)
    prepare(config, shared, resume=(shared / "plan.json").is_file())


def codegen2_command() -> list[str]:
    return [sys.executable, "-m", "codegen2.cli"]


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # each run's subprocess environment


def run_one(root: Path, arm: Arm, seed: int, steps: int | None, extra: list[str], n_infill: int,
            eval_tokens: int, progress, reevaluate: bool = False) -> dict:
    """Train (or resume) and evaluate one (arm, seed); returns its timing record. With `reevaluate`, a finished
    run is only evaluated again (its training time is kept)."""
    run_dir = root / f"{arm.name}-seed{seed}"
    eval_path = run_dir / "eval.json"
    if eval_path.is_file() and not reevaluate:
        progress(f"{run_dir.name}: already done")
        return {"run": run_dir.name, "skipped": True}
    if eval_path.is_file():
        return evaluate_run(run_dir, n_infill, eval_tokens, progress,
                            json.loads(eval_path.read_text())["timing"]["train_s"])
    run_dir.mkdir(parents=True, exist_ok=True)
    sets = [f"train.seed={seed}"] + arm.overrides + shared_overrides(root, steps, extra)
    resume = ["--resume"] if (run_dir / "config.toml").is_file() else []  # continue a run cut short
    train_cmd = codegen2_command() + ["train", "--config", str(HERE / "common.toml"), "--out", str(run_dir),
                                      *resume] + [x for item in sets for x in ("--set", item)]
    started = time.perf_counter()
    with open(run_dir / "train.log", "a", encoding="utf-8") as log:
        code = subprocess.run(train_cmd, stdout=log, stderr=subprocess.STDOUT, env=ONE_THREAD).returncode
    if code != 0:
        raise RuntimeError(f"{run_dir.name}: training failed (exit {code}); see {run_dir / 'train.log'}")
    return evaluate_run(run_dir, n_infill, eval_tokens, progress, time.perf_counter() - started)


def evaluate_run(run_dir: Path, n_infill: int, eval_tokens: int, progress, train_s: float) -> dict:
    """`codegen2 eval heldout` of a trained run into its eval.json (written last, atomically: the run's 'done')."""
    started = time.perf_counter()
    eval_cmd = codegen2_command() + ["eval", "heldout", "--checkpoint", str(run_dir), "--max-tokens",
                                     str(eval_tokens), "--n-infill", str(n_infill)]
    result = subprocess.run(eval_cmd, capture_output=True, text=True, env=ONE_THREAD)
    if result.returncode != 0:
        raise RuntimeError(f"{run_dir.name}: evaluation failed: {result.stderr.strip().splitlines()[-1:]}")
    record = {"train_s": train_s, "eval_s": time.perf_counter() - started}
    eval_path = run_dir / "eval.json"
    tmp = eval_path.with_suffix(".json.tmp")
    measured = json.loads((run_dir / "eval" / "heldout.json").read_text(encoding="utf-8"))
    tmp.write_text(json.dumps({**measured, "timing": record}, indent=1), encoding="utf-8")
    tmp.replace(eval_path)
    progress(f"{run_dir.name}: trained in {record['train_s'] / 60:.1f} min, evaluated in {record['eval_s']:.0f} s | "
             + result.stderr.strip().replace("\n", " | "))
    return {"run": run_dir.name, **record}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/lessons", help="directory of the study's runs")
    parser.add_argument("--seeds", default="1,2", help="comma-separated training seeds (at least 2 for a spread)")
    parser.add_argument("--arms", default="", help="comma-separated subset of arms (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (one thread each)")
    parser.add_argument("--steps", type=int, default=None, help="override train.max_steps (smoke tests)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override for every run (after the arm's own), e.g. train.device=\"cuda\"")
    parser.add_argument("--n-infill", type=int, default=128, help="held-out single-line infill tasks")
    parser.add_argument("--eval-tokens", type=int, default=100_000, help="held-out tokens per kind for the loss")
    parser.add_argument("--doc", default="docs/lessons.md", help="report to write")
    parser.add_argument("--plots", default="docs/lessons", help="directory for the PNG plots")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report from finished runs")
    parser.add_argument("--reevaluate", action="store_true",
                        help="evaluate finished runs again (after the held-out metrics changed), then report")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)

    root = Path(args.out).resolve()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    arms = load_arms([a for a in args.arms.split(",") if a.strip()] or None)
    started = time.perf_counter()
    timing_path = root / "study.json"
    if not args.report_only:
        jobs = [(arm, seed) for seed in seeds for arm in arms]  # seed-major: a first full table comes early
        done = [0]

        def progress(message: str) -> None:
            done[0] += 1 if "trained" in message or "already" in message else 0
            print(f"[{done[0]}/{len(jobs)}] {message} ({(time.perf_counter() - started) / 60:.1f} min elapsed)",
                  flush=True)

        print(f"lessons study: {len(arms)} arms x {len(seeds)} seeds in {root}, {args.jobs} at a time", flush=True)
        prepare_shared(root, seeds, args.set)
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = [pool.submit(run_one, root, arm, seed, args.steps, args.set, args.n_infill, args.eval_tokens,
                                   progress, args.reevaluate) for arm, seed in jobs]
            records = [f.result() for f in futures]
        if not all(r.get("skipped") for r in records):
            # A study resumed after a kill is several sessions; the report adds up their wall times.
            previous = json.loads(timing_path.read_text()) if timing_path.is_file() else {"sessions": []}
            session = {"wall_s": time.perf_counter() - started, "jobs": args.jobs, "runs": records, "argv": argv}
            timing_path.write_text(json.dumps({"sessions": previous.get("sessions", []) + [session]}, indent=1),
                                   encoding="utf-8")
    if args.report_only and timing_path.is_file():  # the command that made the runs, not this one
        saved = json.loads(timing_path.read_text())
        argv = saved["sessions"][-1]["argv"] if "sessions" in saved else saved.get("argv", argv)
    kept = [a for a in argv if a not in ("--report-only", "--reevaluate")]  # how the runs were made
    command = " ".join(["python experiments/lessons/study.py", *map(shlex.quote, kept)])
    report.write_report(root, [(a.name, a.description) for a in load_arms()], seeds, Path(args.doc),
                        Path(args.plots), command)
    print(f"wrote {args.doc} and plots in {args.plots}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
