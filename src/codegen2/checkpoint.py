"""Run-directory checkpoints, written atomically so a kill at any moment leaves the last one usable.

Layout of a run directory:

    RUN_DIR/config.toml                       the full Config the run was made with
    RUN_DIR/tokenizer.json                    the tokenizer (plus HF-loadable side files)
    RUN_DIR/log.jsonl                         one JSON object per logged step
    RUN_DIR/checkpoints/step_00000600/
        model.safetensors                     weights (names as CodeGenModel, qkv in config.model.mp_num layout)
        trainer_state.pt                      optimizer, scheduler, RNG states (absent for imported weights)
        meta.json                             step, tokens seen, data position, world size

A checkpoint is first written to `step_XXXXXXXX.tmp-<pid>`, every file fsynced, then renamed into
place and the parent directory fsynced; directories with a `.tmp-` suffix are ignored and cleaned up.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"
WEIGHTS = "model.safetensors"
TRAINER_STATE = "trainer_state.pt"
META = "meta.json"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def fsync_path(path: Path) -> None:
    """fsync a file or directory so a rename that follows is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary directory; on success fsync its files and rename it to `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        for child in tmp.iterdir():
            fsync_path(child)
        fsync_path(tmp)
        if final.exists():
            # Only reachable when re-saving the same step (e.g. after a resume); move the old aside first.
            trash = final.parent / f"{final.name}.tmp-old-{os.getpid()}"
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fsync_path(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and ".tmp-" not in p.name
             and (p / WEIGHTS).is_file() and (p / META).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def remove_stale_temporaries(run_dir: str | Path) -> None:
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if ".tmp-" in p.name:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def save_weights(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    save_file(tensors, str(path), metadata={"format": "pt", "producer": "codegen2"})


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return load_file(str(path), device=str(device))


def read_meta(checkpoint_dir: Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint_dir) / META).read_text())


def write_checkpoint(
    run_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    meta: dict[str, Any],
    trainer_state: dict[str, Any] | None = None,
) -> Path:
    """Write one complete checkpoint atomically and return its directory."""
    final = Path(run_dir) / CHECKPOINTS / checkpoint_name(step)
    with atomic_directory(final) as tmp:
        save_weights(model_state, tmp / WEIGHTS)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
        (tmp / META).write_text(json.dumps({"step": step, **meta}, indent=2))
    return final
