"""Kill training runs with SIGKILL at random moments, resume each, and check nothing changed.

An uninterrupted reference run is trained first. Then one run directory is trained again, but each
launch (`codegen2 train --resume`, under torchrun for several processes) is killed with SIGKILL at a
random moment chosen among:

    start   a random delay after launch (data loading, model build, checkpoint restore)
    step    a random delay after rank 0 reports step s (lands mid-step or between steps)
    save    a random delay after the staging directory of checkpoint c appears (lands while shards,
            weights or trainer state are being written, or just after the rename)

and "all" kills take the launcher and every worker down at once (a lost node), "rank" kills one worker
and lets torchrun tear the others down (a crashed process). After the last kill the run is resumed to
the end. It passes when the final weights are bitwise identical to the reference, and every step of
the log (loss, grad norm, lr, and the hash chain of the exact samples trained on) equals the reference.

Saves are slowed down by CODEGEN2_SAVE_PAUSE_S (a sleep after each file) so that kills land inside them.

    python benchmarks/kill_resume_stress.py --kills 10 --nproc 2 --parallel fsdp --out /tmp/stress [--arch llama]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from codegen2.checkpoint import (
    CHECKPOINTS,
    SAVE_PAUSE_ENV,
    WEIGHTS,
    checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
    read_meta,
)
from codegen2.config import Config, SourceConfig, dump_toml, load_config
from codegen2.safetensors_io import read_file

DONE_MARKER = "reference-complete"
CORPUS_FILES = ["textwrap.py", "glob.py", "fnmatch.py", "shlex.py", "bisect.py", "heapq.py", "colorsys.py",
                "keyword.py", "string.py", "genericpath.py", "posixpath.py", "queue.py", "sched.py", "this.py"]
TINY = {
    "model.vocab_size": 512, "model.n_layer": 2, "model.n_embd": 64, "model.n_head": 4, "model.rotary_dim": 8,
    "model.n_ctx": 128, "model.mp_num": 2, "tokenizer.vocab_size": 512, "tokenizer.num_masks": 8,
    "tokenizer.train_chars": 200000, "objective.max_spans": 4, "objective.span_len_max": 8, "train.seq_len": 64,
    "train.micro_batch_size": 4, "train.global_batch_tokens": 512, "train.lr": 3e-3, "train.warmup_steps": 2,
    "train.max_steps": 24, "train.checkpoint_every": 4, "train.keep_last": 2, "train.log_every": 1,
    "train.num_threads": 1, "data.heldout_fraction": 0.0,
}
# The same run on another architecture (`--arch`): the tiny shape, with grouped-query attention for LLaMA.
ARCH_OVERRIDES = {
    "codegen": {},
    "llama": {"model.arch": "llama", "model.rotary_dim": 16, "model.n_kv_head": 2, "model.n_inner": 96},
    "qwen2": {"model.arch": "qwen2", "model.rotary_dim": 16, "model.n_kv_head": 2, "model.n_inner": 96,
              "model.tie_word_embeddings": True},
    # A window shorter than train.seq_len, and dropouts: resume must restore every rank's RNG to draw the same masks.
    "starcoder2": {"model.arch": "starcoder2", "model.rotary_dim": 16, "model.n_kv_head": 2, "model.n_inner": 96,
                   "model.sliding_window": 24, "model.embedding_dropout": 0.1, "model.residual_dropout": 0.1,
                   "model.attention_dropout": 0.1},
}


# ----------------------------------------------------------------------------------------- set-up
def tiny_config(workdir: Path, **overrides) -> Config:
    """A tiny model on a few standard-library files: seconds per run on a laptop CPU."""
    corpus = workdir / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in CORPUS_FILES:
        (corpus / name).write_text((stdlib / name).read_text(encoding="utf-8"), encoding="utf-8")
    values = {**TINY, **overrides}
    config = load_config(None, overrides=[f"{k}={json.dumps(v)}" for k, v in values.items()])
    config.data.sources = [SourceConfig(path=str(corpus), kind="code", weight=1.0, include=["*.py"])]
    return config.validate()


def share_prepared(config: Config, workdir: Path) -> Config:
    """Run `codegen2 data prepare` once and point the config at the prepared directory (no sources, no
    tokenizer path): launches then memory-map its shards instead of each preparing the data again."""
    from codegen2.data.prepare.pipeline import prepare

    out = workdir / "prepared"
    if not (out / "manifest.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        prepare(config, out, log=lambda message: None)
    config.data.prepared, config.data.sources, config.tokenizer.path = str(out), [], ""
    return config


def write_config(config: Config, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_toml(config), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------- launching
def train_command(config_path: Path, run_dir: Path, nproc: int, parallel: str) -> list[str]:
    # --resume once the run exists (a kill can land before config.toml is written: then start it afresh)
    resume = ["--resume"] if (run_dir / "config.toml").is_file() else []
    cli = ["-m", "codegen2.cli", "train", "--config", str(config_path), "--out", str(run_dir), *resume]
    if nproc == 1:
        return [sys.executable, *cli]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            *cli, "--parallel", parallel]


LAUNCH_ENV = "CODEGEN2_STRESS_LAUNCH"  # inherited by torchrun and every worker: how we find them all


@dataclass
class Launch:
    """A training launch with rank 0's output lines collected as they come.

    torchrun starts each worker in a session of its own, so killing torchrun's process group would leave
    the workers training on. Every process of a launch instead carries a unique environment marker,
    and a kill finds them by it.
    """

    proc: subprocess.Popen
    token: str
    started: float
    wall_started: float = field(default_factory=time.time)
    lines: queue.Queue[tuple[float, str]] = field(default_factory=queue.Queue)
    transcript: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, command: list[str], env: dict[str, str]) -> Launch:
        token = f"{os.getpid()}-{time.monotonic_ns()}"
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**env, LAUNCH_ENV: token}, start_new_session=True)
        launch = cls(proc=proc, token=token, started=time.monotonic())
        threading.Thread(target=launch._pump, daemon=True).start()
        return launch

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.transcript.append(line)
            self.lines.put((time.monotonic(), line))
        self.lines.put((time.monotonic(), ""))  # end of output

    def processes(self) -> list[int]:
        """Live processes of this launch (the launcher and every worker), by their environment marker."""
        needle = f"{LAUNCH_ENV}={self.token}\0".encode()
        found = []
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                if needle in environ.read_bytes():
                    found.append(int(environ.parent.name))
            except OSError:  # gone, or not ours
                continue
        return found

    def workers(self) -> list[int]:
        return [pid for pid in self.processes() if pid != self.proc.pid]

    def kill_all(self) -> None:
        """SIGKILL the launcher first (so it spawns nothing more), then every process still carrying the marker."""
        with_suppressed(lambda: os.kill(self.proc.pid, signal.SIGKILL))
        for _ in range(100):
            alive = self.processes()
            if not alive:
                return
            for pid in alive:
                with_suppressed(lambda: os.kill(pid, signal.SIGKILL))
            time.sleep(0.01)
        raise RuntimeError(f"processes {self.processes()} of a killed launch do not die")

    def kill_one_rank(self) -> None:
        """SIGKILL one worker; torchrun then takes the others down. With no worker (1 process), the launcher."""
        workers = self.workers()
        with_suppressed(lambda: os.kill(random.choice(workers) if workers else self.proc.pid, signal.SIGKILL))

    def wait(self, timeout: float = 600) -> int:
        """Wait for the launch to end; whatever happens, none of its processes outlive this call."""
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.kill_all()
            self.proc.wait()


def with_suppressed(action) -> None:
    try:
        action()
    except ProcessLookupError:
        pass


def launch_env(pause_s: float = 0.0) -> dict[str, str]:
    env = dict(os.environ)
    env.pop(SAVE_PAUSE_ENV, None)
    if pause_s > 0:
        env[SAVE_PAUSE_ENV] = str(pause_s)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_to_end(config_path: Path, run_dir: Path, nproc: int, parallel: str, pause_s: float = 0.0) -> Launch:
    launch = Launch.start(train_command(config_path, run_dir, nproc, parallel), launch_env(pause_s))
    if launch.wait() != 0:
        raise RuntimeError(f"training in {run_dir} failed:\n{''.join(launch.transcript[-40:])}")
    return launch


def reference_run(config_path: Path, run_dir: Path, nproc: int, parallel: str, in_process: bool = False) -> Path:
    """The uninterrupted run (reused when `run_dir` already holds a finished one with the same config).

    `in_process` trains a single process in this interpreter (same config file, same result as the CLI).
    """
    marker = run_dir / DONE_MARKER
    if marker.is_file() and marker.read_text() == config_path.read_text():
        return run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
    if in_process and nproc == 1:
        from codegen2.train import train

        train(load_config(config_path), run_dir)
    else:
        run_to_end(config_path, run_dir, nproc, parallel)
    marker.write_text(config_path.read_text())
    return run_dir


def suite_setup(config: Config, base: Path) -> tuple[Config, Path]:
    """The test suite's shared data and config file under `base` (shared by its test modules)."""
    config = share_prepared(config, base)
    path = base / "config.toml"
    if not path.is_file() or path.read_text() != dump_toml(config):
        write_config(config, path)
    return config, path


# ----------------------------------------------------------------------------------------- killing
@dataclass
class Kill:
    kind: str  # start | step | save
    target: int  # step s, or checkpoint step c (0 for start)
    delay: float  # seconds after the trigger
    how: str = "all"  # all | rank
    resumed_from: int = 0  # the checkpoint step this launch resumed from
    landed: str = ""  # where it actually hit, filled in afterwards
    committed: list[int] = field(default_factory=list)  # the steps of the checkpoints committed when it hit


def checkpoint_steps(config: Config) -> list[int]:
    t = config.train
    return sorted({s for s in range(t.checkpoint_every, t.max_steps + 1, t.checkpoint_every)} | {t.max_steps})


def plan_kill(rng: random.Random, config: Config, resume_step: int, kinds: list[str], pause_s: float,
              step_seconds: float, start_seconds: float, nproc: int, kind: str | None = None,
              how: str | None = None) -> Kill:
    """A random kill (of `kind`, else a random one of `kinds`) that a launch resuming at `resume_step` can reach."""
    t = config.train
    saves = [c for c in checkpoint_steps(config) if c > resume_step]
    kind = kind or rng.choice([k for k in kinds if k != "save" or saves])
    how = how or (rng.choice(["all", "rank"]) if nproc > 1 else "all")
    if kind == "start":
        return Kill("start", 0, rng.uniform(0, start_seconds), how)
    # Targets within the next two checkpoints, so that successive kills spread over the whole run.
    if kind == "save":
        return Kill("save", rng.choice(saves[:2]), rng.uniform(0, 3 * pause_s), how)
    last = min(t.max_steps, resume_step + 2 * t.checkpoint_every)
    return Kill("step", rng.randint(resume_step + 1, last), rng.uniform(0, 1.5 * step_seconds), how)


def staging_dirs(run_dir: Path, step: int) -> list[Path]:
    root = run_dir / CHECKPOINTS
    return sorted(root.glob(f"step_{step:08d}.tmp-*")) if root.is_dir() else []


def execute_kill(launch: Launch, run_dir: Path, kill: Kill, timeout: float = 300) -> bool:
    """Wait for the kill's trigger, wait its delay, kill. False when the run finished first."""
    deadline = time.monotonic() + timeout
    trigger = None
    training = False  # stale staging dirs are cleaned up before the "training ..." line
    if kill.kind == "start":
        trigger = launch.started
    while trigger is None and time.monotonic() < deadline:
        try:
            stamp, line = launch.lines.get(timeout=0.005)
        except queue.Empty:
            stamp, line = None, None
        if line == "":
            return False
        if line is not None:
            training = training or line.startswith("training ")
            if kill.kind == "step" and line.startswith(f"step {kill.target}/"):
                trigger = stamp
        if kill.kind == "save" and training and staging_dirs(run_dir, kill.target):
            trigger = time.monotonic()
    if trigger is None:
        raise RuntimeError(f"{kill} never triggered")
    time.sleep(max(0.0, trigger + kill.delay - time.monotonic()))
    if launch.proc.poll() is not None:
        return False
    kill.landed = describe_state(run_dir, launch)
    kill.committed = [checkpoint_step(path) for path in list_checkpoints(run_dir)]
    launch.kill_one_rank() if kill.how == "rank" else launch.kill_all()
    launch.wait()
    return True


def describe_state(run_dir: Path, launch: Launch) -> str:
    """Where the run was when the kill hit: inside which save (and what it had written), or after which step."""
    for staging in sorted((run_dir / CHECKPOINTS).glob("step_*.tmp-*")) if (run_dir / CHECKPOINTS).is_dir() else []:
        if ".tmp-old-" in staging.name or ".tmp-prune" in staging.name:
            continue
        try:
            if staging.stat().st_mtime < launch.wall_started:
                continue  # left by an earlier launch, not yet cleaned up by this one
        except FileNotFoundError:
            continue
        written = sorted(p.name for p in staging.iterdir()) if staging.exists() else []
        return f"inside save of step {int(staging.name[5:13])} (written: {', '.join(written) or 'nothing'})"
    steps = [line for line in launch.transcript if line.startswith("step ")]
    latest = latest_checkpoint(run_dir)
    saved = f"last checkpoint: step {read_meta(latest)['step']}" if latest else "no checkpoint yet"
    if steps:
        return f"after {steps[-1].split('|')[0].strip()} ({saved})"
    return f"before this launch's first step ({saved})"


def killed_run(config: Config, config_path: Path, run_dir: Path, nproc: int, parallel: str, kills: int,
               rng: random.Random, kinds: list[str], pause_s: float, step_seconds: float = 0.1,
               start_seconds: float = 3.0, in_order: bool = False) -> list[Kill]:
    """Launch, kill, relaunch with --resume ... `kills` times, then resume to the end.

    With `in_order`, kill i is of kind kinds[i % len(kinds)] and, with several processes, alternates
    between taking every process and a single rank down; otherwise both are drawn at random.
    """
    done: list[Kill] = []
    attempts = 0
    while len(done) < kills:
        attempts += 1
        if attempts > 4 * kills:
            raise RuntimeError(f"only {len(done)} of {kills} kills landed in {attempts} launches")
        latest = latest_checkpoint(run_dir)
        resume_step = read_meta(latest)["step"] if latest else 0
        if resume_step >= config.train.max_steps:  # finished before a kill landed: start the killed run over
            shutil.rmtree(run_dir)
            resume_step = 0
        kind = kinds[len(done) % len(kinds)] if in_order else None
        how = (("all", "rank")[len(done) % 2] if nproc > 1 else "all") if in_order else None
        kill = plan_kill(rng, config, resume_step, kinds, pause_s, step_seconds, start_seconds, nproc, kind, how)
        kill.resumed_from = resume_step
        launch = Launch.start(train_command(config_path, run_dir, nproc, parallel), launch_env(pause_s))
        if execute_kill(launch, run_dir, kill):
            done.append(kill)
        else:
            launch.wait()
    run_to_end(config_path, run_dir, nproc, parallel)
    return done


# --------------------------------------------------------------------------------------- comparing
def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]


def compare_runs(reference: Path, candidate: Path) -> list[str]:
    """Differences between two finished runs (empty when identical): weights bit for bit, and the log."""
    problems = []
    a = read_file(latest_checkpoint(reference) / WEIGHTS)
    b = read_file(latest_checkpoint(candidate) / WEIGHTS)
    if a.keys() != b.keys():
        problems.append(f"weight names differ: {sorted(a.keys() ^ b.keys())}")
    for name in sorted(a.keys() & b.keys()):
        if not torch.equal(a[name], b[name]):
            problems.append(f"{name}: max |diff| {(a[name] - b[name]).abs().max().item():.3g}")
    log_a, log_b = read_log(reference), read_log(candidate)
    steps_b = [r["step"] for r in log_b]
    if steps_b != [r["step"] for r in log_a]:
        problems.append(f"logged steps differ: {steps_b}")
    for ra, rb in zip(log_a, log_b):
        for key in ("data_hash", "loss", "grad_norm", "lr", "tokens"):
            if ra.get(key) != rb.get(key):
                problems.append(f"step {ra['step']}: {key} {ra.get(key)} != {rb.get(key)}")
    checkpoints = [p.name for p in list_checkpoints(candidate)]
    if checkpoints != [p.name for p in list_checkpoints(reference)]:
        problems.append(f"checkpoints differ: {checkpoints}")
    return problems


def timings(reference: Launch) -> tuple[float, float]:
    """(seconds per step, seconds from launch to step 1) of the reference launch."""
    stamps = []
    while True:
        try:
            stamp, line = reference.lines.get_nowait()
        except queue.Empty:
            break
        if line.startswith("step "):
            stamps.append(stamp)
    if len(stamps) < 2:
        return 0.1, 5.0
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1), stamps[0] - reference.started


# ---------------------------------------------------------------------------------------------- main
def stress(workdir: Path, nproc: int, parallel: str, kills: int, seed: int, pause_s: float,
           kinds: list[str], config: Config | None = None) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    config = share_prepared(config or tiny_config(workdir), workdir)
    config_path = write_config(config, workdir / f"config-{nproc}-{parallel}.toml")
    ref_dir = workdir / f"reference-{nproc}-{parallel}"
    shutil.rmtree(ref_dir, ignore_errors=True)
    started = time.perf_counter()
    reference = run_to_end(config_path, ref_dir, nproc, parallel)
    step_seconds, start_seconds = timings(reference)
    run_dir = workdir / f"killed-{nproc}-{parallel}"
    shutil.rmtree(run_dir, ignore_errors=True)
    done = killed_run(config, config_path, run_dir, nproc, parallel, kills, random.Random(seed), kinds, pause_s,
                      step_seconds, start_seconds)
    problems = compare_runs(ref_dir, run_dir)
    return {"nproc": nproc, "parallel": parallel if nproc > 1 else "none", "seed": seed,
            "steps": config.train.max_steps,
            "kills": [vars(k) for k in done], "problems": problems, "identical": not problems,
            "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--parallel", choices=["ddp", "fsdp"], default="fsdp")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pause", type=float, default=0.3, help="seconds slept after each checkpoint file")
    parser.add_argument("--kinds", default="start,step,save,save")
    parser.add_argument("--out", type=Path, default=Path("runs/kill-stress"))
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--arch", choices=list(ARCH_OVERRIDES), default="codegen", help="model architecture")
    args = parser.parse_args(argv)
    config = tiny_config(args.out, **ARCH_OVERRIDES[args.arch])
    result = stress(args.out, args.nproc, args.parallel, args.kills, args.seed, args.pause, args.kinds.split(","),
                    config)
    for i, kill in enumerate(result["kills"], 1):
        print(f"kill {i:2d}: resumed from step {kill['resumed_from']:2d}, {kill['kind']:5s} target "
              f"{kill['target']:3d} +{kill['delay']:.3f}s ({kill['how']}) -> {kill['landed']}")
    verdict = "bitwise identical" if result["identical"] else "DIFFERENT: " + "; ".join(result["problems"][:5])
    print(f"{result['nproc']} process(es), {result['parallel']}, {result['steps']} steps, {len(result['kills'])} "
          f"kills: final weights and per-step log vs the uninterrupted run: {verdict} ({result['seconds']:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
