"""`codegen2 plot RUN_DIR`: PNG curves of a run's JSONL log (loss per objective, throughput and MFU, lr and
gradient norm), for a quick look without starting TensorBoard. matplotlib is imported only when plotting.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .errors import UserError
from .objectives import OBJECTIVE_NAMES

LOSS_KEYS = ("loss", *(f"loss_{name}" for name in OBJECTIVE_NAMES))
HELDOUT_KEYS = {"eval_code_loss": "held-out code", "eval_nl_loss": "held-out prose"}  # train.eval_every


def read_log(run_dir: str | Path) -> list[dict]:
    """The records of RUN_DIR/log.jsonl; a last line cut short by a kill is skipped, any other bad line is an error."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: no training log (is {run_dir} a codegen2 run directory?)")
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):
                break
            raise UserError(f"{path}, line {number}: not JSON ({exc.msg})") from None
    if not records:
        raise UserError(f"{path}: no logged steps yet")
    return records


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write loss.png, throughput.png and optimizer.png for a run; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(run_dir)
    out = Path(out_dir) if out_dir else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key in LOSS_KEYS:
        steps, values = _series(records, key)
        if steps:
            ax.plot(steps, values, label=key.replace("loss_", "") if key != "loss" else "all",
                    linewidth=2 if key == "loss" else 1)
    for key, label in HELDOUT_KEYS.items():
        steps, values = _series(records, key)
        if steps:
            ax.plot(steps, values, label=label, linestyle="--", marker="o", markersize=3)
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title=f"loss: {Path(run_dir).name}")
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(_save(fig, out / "loss.png", plt))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps, tps = _series(records, "tokens_per_s")
    ax.plot(steps, tps, color="tab:blue")
    ax.set(xlabel="step", ylabel="tokens / s", title=f"throughput: {Path(run_dir).name}")
    ax.grid(alpha=0.3)
    steps, mfu = _series(records, "mfu")
    if steps:
        twin = ax.twinx()
        twin.plot(steps, [100 * m for m in mfu], color="tab:orange")
        twin.set_ylabel("MFU (%)", color="tab:orange")
    written.append(_save(fig, out / "throughput.png", plt))

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot(*_series(records, "lr"))
    top.set(ylabel="learning rate")
    bottom.plot(*_series(records, "grad_norm"))
    bottom.set(xlabel="step", ylabel="gradient norm (before clipping)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    written.append(_save(fig, out / "optimizer.png", plt))
    return written


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def cmd_plot(args: argparse.Namespace) -> int:
    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plot", help="PNG loss / throughput / optimizer curves of a run's log")
    p.add_argument("run_dir", help="codegen2 run directory (with log.jsonl)")
    p.add_argument("--out", help="output directory (default RUN_DIR/plots)")
    p.set_defaults(func=cmd_plot)
    return p
