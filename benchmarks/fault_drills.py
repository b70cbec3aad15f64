"""Inject the faults of issue 24 at random moments over many rounds, and count what survived.

    python benchmarks/fault_drills.py --rounds 20 --out /tmp/drills [--faults kill-train,full-disk] [--seed 0]

Faults (each round on a fresh directory, tiny model of benchmarks/kill_resume_stress.py, one process):

    kill-train    SIGKILL a training launch at a random moment (a random delay after its start, after a random
                  `step k` line, or after the staging directory of a random checkpoint appears), then `--resume`
                  to the end
    kill-prepare  SIGKILL `codegen2 data prepare` at a random moment (stages slowed down), then run it again
    full-disk     train under a random RLIMIT_FSIZE (the child's file size limit: no mount needed), then
                  `--resume` without the limit
    two-starts    a second `train --resume` while the first one runs: it must be refused (exit 75)
    hostile       `data prepare` of a corpus holding every odd on-disk entry (benchmarks/fault_corpus.py)
    server        `codegen2 serve` under load with half-open connections and clients hanging up, then SIGTERM

Survived: the command after the fault finished, and a training run's final weights and per-step log equal an
uninterrupted run's bit for bit. Work lost: a committed checkpoint that is gone after the fault (steps since the
last checkpoint are not counted: a kill loses them by design), a prepared directory whose manifest differs from an
uninterrupted one, a request the server accepted (it started answering) that ended neither in 200 nor 503.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import kill_resume_stress as stress  # noqa: E402
import load_serve  # noqa: E402
from codegen2.checkpoint import list_checkpoints  # noqa: E402
from codegen2.data.prepare.steps import PAUSE_ENV  # noqa: E402
from codegen2.distributed import HANG_ENV  # noqa: E402
from common import cpu_model  # noqa: E402
from fault_corpus import hostile_corpus  # noqa: E402

FAULTS = ["kill-train", "kill-prepare", "full-disk", "two-starts", "hostile", "server"]
MAX_STEPS = 8
SAVE_PAUSE_S = 0.05  # seconds slept after each checkpoint file, so that kills land inside saves too


@dataclass
class Tally:
    rounds: int = 0
    survived: int = 0
    lost: int = 0
    one_line: int = 0
    tracebacks: int = 0
    hit: int = 0  # rounds where the fault landed (a kill before the end, a limit the run reached, a refusal)
    seconds: float = 0.0  # wall time of all rounds

    def outputs(self, *texts: str) -> None:
        """Count each failed launch's output: one `error:` line, or a traceback."""
        for text in texts:
            if "Traceback" in text:
                self.tracebacks += 1
            elif "error:" in text:
                self.one_line += 1


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "codegen2.cli", *args]


def run(command: list[str], timeout: float = 300, **kwargs) -> tuple[int, str]:
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                          env=stress.launch_env(), **kwargs)
    return done.returncode, done.stdout


def committed(run_dir: Path) -> list[int]:
    return [int(p.name.split("_")[-1]) for p in list_checkpoints(run_dir)] if run_dir.is_dir() else []


def finish(tally: Tally, shared: dict, run_dir: Path, before: list[int]) -> None:
    """Resume to the end; the round survived when it finishes with the weights and log of the uninterrupted run,
    and no checkpoint committed before the fault (`before`) was lost."""
    after = committed(run_dir)
    tally.lost += int(bool(before) and (not after or max(after) < max(before)))
    code, out = run(stress.train_command(shared["config"], run_dir, 1, "none"))
    tally.outputs(out if code else "")
    tally.survived += int(code == 0 and not stress.compare_runs(shared["reference"], run_dir))


def kill_train(rng: random.Random, work: Path, shared: dict, tally: Tally) -> None:
    """SIGKILL at a random moment: a random delay after the start, after a random `step k` line, or inside the
    save of a random checkpoint (the triggers of kill_resume_stress.py)."""
    run_dir = work / "run"
    kill = stress.plan_kill(rng, shared["train_config"], 0, ["start", "step", "save"], SAVE_PAUSE_S,
                            shared["step_s"], shared["start_s"], 1)
    kill.target = rng.randint(1, MAX_STEPS) if kill.kind == "step" else kill.target  # any step of the run
    launch = stress.Launch.start(stress.train_command(shared["config"], run_dir, 1, "none"),
                                 stress.launch_env(SAVE_PAUSE_S))
    landed = stress.execute_kill(launch, run_dir, kill)
    if not landed:
        launch.wait()
    tally.hit += int(landed)
    finish(tally, shared, run_dir, kill.committed if landed else committed(run_dir))


def kill_prepare(rng: random.Random, work: Path, source_config: Path, reference: dict, seconds: float,
                 tally: Tally) -> None:
    out = work / "prepared"
    command = cli("data", "prepare", "--config", str(source_config), "--out", str(out))
    launch = stress.Launch.start(command, {**stress.launch_env(), PAUSE_ENV: "0.3"})
    time.sleep(rng.uniform(0.3, 0.95) * seconds)
    tally.hit += int(launch.proc.poll() is None)
    launch.kill_all()
    launch.wait()
    code, text = run(command + (["--resume"] if out.exists() else []))
    tally.outputs(text if code else "")
    manifest = out / "manifest.json"
    same = manifest.is_file() and manifest_totals(manifest) == reference
    tally.survived += int(code == 0 and same)
    tally.lost += int(code == 0 and not same)


def manifest_totals(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))["totals"]


def full_disk(rng: random.Random, work: Path, shared: dict, tally: Tally) -> None:
    run_dir = work / "run"
    limit = rng.randint(20_000, 1_300_000)  # under the largest checkpoint file (1.36 MB)

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    code, out = run(stress.train_command(shared["config"], run_dir, 1, "none"), preexec_fn=cap)
    tally.outputs(out if code else "")
    tally.hit += int(code != 0)
    finish(tally, shared, run_dir, committed(run_dir))


def two_starts(rng: random.Random, work: Path, shared: dict, tally: Tally) -> None:
    run_dir, config_path = work / "run", shared["config"]
    # The first run stalls 8 s inside step 6 (the hung-rank hook), so that the second start overlaps it.
    first = stress.Launch.start(stress.train_command(config_path, run_dir, 1, "none"),
                                {**stress.launch_env(SAVE_PAUSE_S), HANG_ENV: "0:at step 6:8"})
    while not (run_dir / "config.toml").is_file() and first.proc.poll() is None:
        time.sleep(0.1)
    time.sleep(rng.uniform(0.0, 4.0))
    code, out = run(stress.train_command(config_path, run_dir, 1, "none"))
    tally.outputs(out if code else "")
    first_code = first.wait()
    refused = code == 75 and "in use" in out
    tally.hit += int(refused)
    # A second start after the first one ended is no overlap: it resumes a finished run (exit 0).
    same = not stress.compare_runs(shared["reference"], run_dir)  # the refused start left the first run alone
    tally.survived += int(first_code == 0 and same and (refused or code == 0))


def hostile(rng: random.Random, work: Path, tally: Tally) -> None:
    root = work / "corpus"
    expected = hostile_corpus(root, work / "outside")
    for i in range(rng.randint(0, 5)):
        (root / f"extra_{i}.py").write_text(f"def extra_{i}():\n    return {i}\n")
    out = work / "out"
    code, text = run(cli("data", "prepare", "--data", str(root), "--out", str(out), "--set",
                         "tokenizer.vocab_size=400", "--set", f"data.heldout_fraction={rng.choice([0.0, 0.3])}"))
    tally.outputs(text if code else "")
    tally.hit += 1
    rows = (out / "removed.jsonl").read_text().splitlines() if (out / "removed.jsonl").is_file() else []
    on_disk = [r for r in expected.values() if r not in ("vanished", "changed_while_read", "unreadable",
                                                         "unreadable_dir")]
    tally.survived += int(code == 0 and "Traceback" not in text and len(rows) >= len(on_disk))


def server(rng: random.Random, work: Path, checkpoint: Path, tally: Tally) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(cli("serve", "--checkpoint", str(checkpoint), "--port", str(port), "--model-name",
                                "bench", "--threads", "1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        load_serve.wait_for_server(port, proc)
        held = load_serve.open_half_open(port, rng.randint(20, 100))
        hanger = threading.Thread(target=load_serve.hang_up_clients, args=(port, rng.randint(20, 100), 64, 50.0))
        hanger.start()
        result: dict = {}
        loader = threading.Thread(target=lambda: result.update(load_serve.run_load(
            port, load_serve.make_requests(60, 16, seed=rng.randint(0, 999)), 8, proc.pid)))
        loader.start()
        time.sleep(rng.uniform(0.5, 4.0))
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        exit_s = time.monotonic() - began
        loader.join()
        hanger.join()
        for s in held:
            s.close()
    finally:
        if proc.poll() is None:
            proc.kill()
    text = proc.stdout.read()
    tally.outputs(text)
    tally.hit += int(bool(result))
    statuses = [r[0] for r in result.get("results", []) if r is not None]
    # Accepted and lost: a request answered with something other than 200 / 503 (a refusal) / 0 (not accepted).
    tally.lost += sum(1 for s in statuses if s not in (0, 200, 503))
    tally.survived += int(exit_s < 10 and code in (0, 143, -15) and "Traceback" not in text)


def drill(fault: str, rounds: int, rng: random.Random, base: Path, shared: dict) -> Tally:
    tally = Tally()
    started = time.monotonic()
    for i in range(rounds):
        with tempfile.TemporaryDirectory(dir=base) as tmp:
            work = Path(tmp)
            tally.rounds += 1
            if fault == "kill-train":
                kill_train(rng, work, shared, tally)
            elif fault == "kill-prepare":
                kill_prepare(rng, work, shared["source_config"], shared["totals"], shared["prepare_s"], tally)
            elif fault == "full-disk":
                full_disk(rng, work, shared, tally)
            elif fault == "two-starts":
                two_starts(rng, work, shared, tally)
            elif fault == "hostile":
                hostile(rng, work, tally)
            else:
                server(rng, work, shared["checkpoint"], tally)
        tally.seconds = time.monotonic() - started
        print(f"{fault} round {i + 1}/{rounds}: {tally}", file=sys.stderr, flush=True)
    return tally


def set_up(base: Path) -> dict:
    """The shared tiny config (prepared once) and its uninterrupted run (the reference every resumed run must equal,
    and the timings kills are drawn from), a config with sources for prepare and its manifest, a server model."""
    config = stress.tiny_config(base, **{"train.max_steps": MAX_STEPS, "train.checkpoint_every": 4})
    source_config = stress.write_config(config, base / "sources.toml")
    stress.share_prepared(config, base)
    totals = manifest_totals(base / "prepared" / "manifest.json")
    for stale in ("reference-run", "timing-prepared", "model"):
        shutil.rmtree(base / stale, ignore_errors=True)
    (base / "model").mkdir()
    config_path = stress.write_config(config, base / "config.toml")
    reference = timed(stress.train_command(config_path, base / "reference-run", 1, "none"),
                      stress.launch_env(SAVE_PAUSE_S))
    step_s, start_s = stress.timings(reference)
    prepare = timed(cli("data", "prepare", "--config", str(source_config), "--out", str(base / "timing-prepared")),
                    {**stress.launch_env(), PAUSE_ENV: "0.3"})
    prepare_s = time.monotonic() - prepare.started
    return {"config": config_path, "train_config": config, "source_config": source_config, "totals": totals,
            "reference": base / "reference-run", "step_s": step_s, "start_s": start_s,
            "checkpoint": load_serve.build_small_run(base / "model"),
            "prepare_s": prepare_s}


def timed(command: list[str], env: dict[str, str]) -> stress.Launch:
    """An uninterrupted launch, run to its end (its output lines keep their times: the window kills are drawn in)."""
    launch = stress.Launch.start(command, env)
    if launch.wait() != 0:
        raise RuntimeError("".join(launch.transcript[-20:]))
    return launch


def cpu_line() -> str:
    """The CPU, its cores and which of the vector extensions the kernels care about it has (lscpu's flags)."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    have = " ".join(flag for flag in ("avx2", "avx512_vnni", "amx_int8") if flag in flags) or "none of them"
    return (f"CPU: {cpu_model()}, {os.cpu_count()} cores; avx2/avx512_vnni/amx_int8: {have}; "
            f"load average {os.getloadavg()[0]:.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="rounds per fault")
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, of {', '.join(FAULTS)}")
    parser.add_argument("--out", default=None, help="work directory (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    base = Path(args.out or tempfile.mkdtemp(prefix="fault-drills-"))
    base.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    print(cpu_line(), flush=True)
    shared = set_up(base)
    rows = {fault: drill(fault, args.rounds, rng, base, shared) for fault in args.faults.split(",")}
    print("| fault | rounds | fault landed | survived | work lost | one-line errors | tracebacks | wall s |\n"
          "|---|---|---|---|---|---|---|---|")
    for fault, t in rows.items():
        print(f"| {fault} | {t.rounds} | {t.hit} | {t.survived} | {t.lost} | {t.one_line} | {t.tracebacks} "
              f"| {t.seconds:.0f} |")
    return 0 if all(t.survived == t.rounds and not t.lost and not t.tracebacks for t in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
