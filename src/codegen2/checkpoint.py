"""Run-directory checkpoints, written atomically so a kill at any moment leaves the last one usable.

Layout of a run directory:

    RUN_DIR/config.toml                       the full Config the run was made with
    RUN_DIR/tokenizer.json                    the tokenizer (plus HF-loadable side files)
    RUN_DIR/log.jsonl                         one JSON object per logged step
    RUN_DIR/checkpoints/step_00000600/
        model.safetensors                     full weights (the model's own names; CodeGen qkv in config.model.mp_num
                                              layout); for FSDP runs consolidated from `sharded/`; for a LoRA
                                              run only the adapters (meta.json's `lora` names the base)
        sharded/                              FSDP runs only: model + optimizer shards written by every rank
                                              with torch.distributed.checkpoint (reshardable to any rank count)
        trainer_state.pt                      scheduler, RNG states, data-hash chain, and the full optimizer
                                              state when there is no `sharded/` (absent for imported weights)
        meta.json                             step, tokens seen, data position, world size, batch layout

A checkpoint is first written to a staging directory `step_XXXXXXXX.tmp-<PID>@<HOST>` (every rank of an FSDP
run writes its shard there), then committed with `fsutil.commit_directory`: every file fsynced, the directory
renamed into place, the parent fsynced. A staging name is never a checkpoint; what a dead process of this host
left is cleaned up at the next start. A checkpoint that does not fit on the disk is refused before it is
written, in one line naming the directory, the bytes needed and the bytes free. Pruning renames a checkpoint
to a staging name before deleting it, so a half-deleted one is never read. The sharded (DCP) format is written and read
here too (`save_sharded`, `load_sharded`, `consolidate_sharded`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import fsutil, safetensors_io
from .distributed import DistEnv, barrier, broadcast_object, full_state, gather_objects, load_full_state
from .errors import RetryLater, UserError

CHECKPOINTS = "checkpoints"
WEIGHTS = "model.safetensors"
TRAINER_STATE = "trainer_state.pt"
META = "meta.json"
SHARDED = "sharded"
MODEL_KEY = "model"  # top-level key of the model in a sharded (DCP) checkpoint
OPTIM_KEY = "optim"

# Seconds to sleep after each file written into a checkpoint: only for kill-during-save tests, which need
# the save to last long enough for a SIGKILL to land inside it. Unset (0) in normal use.
SAVE_PAUSE_ENV = "CODEGEN2_SAVE_PAUSE_S"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_step(path: Path) -> int:
    return int(Path(path).name.split("_")[1])


def save_pause() -> None:
    """Test hook: widen the save window (see SAVE_PAUSE_ENV)."""
    seconds = float(os.environ.get(SAVE_PAUSE_ENV, "0") or 0)
    if seconds > 0:
        time.sleep(seconds)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and not fsutil.is_staging(p)
             and (p / WEIGHTS).is_file() and (p / META).is_file()]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def select_checkpoint(run_dir: str | Path, step: int | None = None) -> Path:
    """The checkpoint of `step` (None: the newest); a UserError listing the steps there are otherwise."""
    found = list_checkpoints(run_dir)
    if not found:
        raise UserError(f"{run_dir}: no complete checkpoint yet ({CHECKPOINTS}/step_*/{WEIGHTS})")
    if step is None:
        return found[-1]
    for path in found:
        if checkpoint_step(path) == step:
            return path
    raise UserError(f"{run_dir}: no checkpoint for step {step} (available: "
                    f"{', '.join(str(checkpoint_step(p)) for p in found)})")


def remove_stale_temporaries(run_dir: str | Path) -> None:
    """Delete what an interrupted save or prune left behind; restore a checkpoint caught mid-swap."""
    fsutil.remove_stale_temporaries(Path(run_dir) / CHECKPOINTS)


def prune_checkpoints(run_dir: str | Path, keep_last: int, run_id: str | None = None,
                      before_step: int | None = None) -> None:
    """Keep the newest `keep_last` checkpoints (0 keeps all) of run `run_id`, counting and deleting only its
    own checkpoints older than `before_step`: a checkpoint another run wrote, or a later one of this run
    (left behind by a resume from an earlier step), is never touched."""
    if keep_last <= 0:
        return
    own = []
    for path in list_checkpoints(run_dir):
        if before_step is not None and checkpoint_step(path) > before_step:
            continue
        try:
            if read_meta(path).get("run_id") == run_id:
                own.append(path)
        except (OSError, ValueError):  # unreadable meta: not provably ours, so left alone
            continue
    for old in own[:-keep_last]:
        fsutil.remove_atomically(old, "prune")  # invisible at once: a kill mid-delete leaves no partial checkpoint


# ------------------------------------------------------------------------- run directories
# What a training run writes into its directory (besides checkpoints/): the files `--overwrite` replaces.
RUN_FILES = ("config.toml", "log.jsonl", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "vocab.json", "merges.txt", "added_tokens.json", "tensorboard", "data", CHECKPOINTS)


def describe_run(run_dir: str | Path) -> str | None:
    """A short description of the run `run_dir` holds ("config.toml, log.jsonl, 2 checkpoints up to step
    150"), or None when it holds none."""
    run_dir = Path(run_dir)
    parts = [name for name in ("config.toml", "log.jsonl") if (run_dir / name).is_file()]
    steps = [checkpoint_step(p) for p in list_checkpoints(run_dir)]
    if steps:
        parts.append(f"{len(steps)} checkpoint{'s' * (len(steps) > 1)} up to step {max(steps)}")
    return ", ".join(parts) or None


def trained_step(run_dir: str | Path) -> int:
    """The newest step this run trained to (0 when it has only imported weights or no checkpoint)."""
    steps = [0]
    for path in list_checkpoints(run_dir):
        with contextlib.suppress(OSError, ValueError):
            if "format" in read_meta(path):  # written by training (imported weights carry no format)
                steps.append(checkpoint_step(path))
    return max(steps)


def check_run_directory(run_dir: str | Path, resume: bool, overwrite: bool) -> str | None:
    """The one rule for where training may write: a new run never lands on another run's files, and
    `resume` needs a run to continue. Returns the description of the run that `overwrite` will replace."""
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise UserError("--resume continues the run in the directory and --overwrite replaces it: choose one")
    existing = describe_run(run_dir)
    if resume:
        if not (run_dir / "config.toml").is_file():
            raise UserError(f"nothing to resume in {run_dir} (no config.toml); drop --resume to start a new run there")
        return None
    if existing and not overwrite:
        raise UserError(f"{run_dir} already holds a run ({existing}); pass --resume to continue it or --overwrite "
                        f"to replace it")
    return existing


def clear_run_directory(run_dir: str | Path) -> None:
    """Remove a previous run's files (`RUN_FILES`) from `run_dir`, leaving anything else there alone."""
    for name in RUN_FILES:
        fsutil.remove_atomically(Path(run_dir) / name, "overwrite")


# ------------------------------------------------------------------------- integrity
def checkpoint_problem(path: Path, need_trainer_state: bool = False) -> str | None:
    """Why checkpoint `path` cannot be used ("FILE: what is wrong"), or None when its files look whole."""
    path = Path(path)
    try:
        meta = read_meta(path)
        if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
            return f"{path / META}: no step number"
    except (OSError, ValueError) as exc:
        return f"{path / META}: unreadable ({type(exc).__name__}: {exc})"
    if not (path / SHARDED).is_dir():
        problem = safetensors_io.file_problem(path / WEIGHTS)
        if problem:
            return f"{path / WEIGHTS}: {problem}"
    trainer = path / TRAINER_STATE
    if trainer.exists():
        import zipfile

        try:
            with zipfile.ZipFile(trainer) as archive:
                bad = archive.testzip()
            if bad is not None:
                return f"{trainer}: corrupt ({bad} fails its checksum)"
        except (OSError, zipfile.BadZipFile) as exc:
            return f"{trainer}: unreadable ({exc})"
    elif need_trainer_state and meta.get("format") is not None:
        return f"{trainer}: missing"
    return None


def save_weights(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    safetensors_io.write_file(tensors, path, metadata={"format": "pt", "producer": "codegen2"})


def read_meta(checkpoint_dir: Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint_dir) / META).read_text(encoding="utf-8"))


def write_files(directory: Path, step: int, model_state: dict[str, torch.Tensor] | None, meta: dict[str, Any],
                trainer_state: dict[str, Any] | None) -> None:
    """Write the checkpoint files (weights unless None, trainer state, meta last) into `directory`."""
    if model_state is not None:
        save_weights(model_state, directory / WEIGHTS)
        save_pause()
    if trainer_state is not None:
        torch.save(trainer_state, directory / TRAINER_STATE)
        save_pause()
    (directory / META).write_text(json.dumps({"step": step, **meta}, indent=2))


def write_checkpoint(
    run_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    meta: dict[str, Any],
    trainer_state: dict[str, Any] | None = None,
) -> Path:
    """Write one complete checkpoint atomically and return its directory."""
    final = Path(run_dir) / CHECKPOINTS / checkpoint_name(step)
    with fsutil.atomic_directory(final) as tmp:
        write_files(tmp, step, model_state, meta, trainer_state)
    return final


# ------------------------------------------------------------------------- the sharded (DCP) format
def save_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its own shards of the model and optimizer with DCP (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({MODEL_KEY: model_state, OPTIM_KEY: optim_state}, checkpoint_id=str(directory))


def load_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load a DCP checkpoint into this model's current layout; DCP reads whichever saved shards overlap ours."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    if optimizer is None:
        model_state = get_model_state_dict(model)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({MODEL_KEY: model_state}, checkpoint_id=str(directory))
        set_model_state_dict(model, model_state)
        return
    model_state, optim_state = get_state_dict(model, optimizer)  # creates empty optimizer state to fill
    state = {MODEL_KEY: model_state, OPTIM_KEY: optim_state}
    with warnings.catch_warnings():  # one process reading a multi-rank checkpoint is intended here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state[MODEL_KEY], optim_state_dict=state[OPTIM_KEY])


def consolidate_sharded(sharded_dir: str | Path) -> dict[str, torch.Tensor]:
    """Full model tensors from a torch.distributed.checkpoint directory, read without a process group.

    Every tensor saved under the `model` key is allocated at its global size and filled from all the
    shards that cover it, which is how a sharded FSDP checkpoint becomes one safetensors file.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(str(sharded_dir)).read_metadata()
    prefix = MODEL_KEY + "."
    model = {key[len(prefix):]: torch.empty(item.size, dtype=item.properties.dtype)
             for key, item in metadata.state_dict_metadata.items()
             if key.startswith(prefix) and isinstance(item, TensorStorageMetadata)}
    if not model:
        raise ValueError(f"{sharded_dir}: no '{MODEL_KEY}' tensors in this distributed checkpoint")
    with warnings.catch_warnings():  # DCP warns that it reads in one process, which is the point here
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({MODEL_KEY: model}, checkpoint_id=str(sharded_dir), no_dist=True)
    return model


# ------------------------------------------------------------------------- training checkpoints
def rng_state() -> dict:
    """Every RNG a training step may draw from (Python, NumPy, torch CPU and CUDA): saved per rank."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def estimate_checkpoint_bytes(model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool,
                              frozen: bool = True) -> int:
    """About how many bytes the checkpoint of this model and optimizer takes: the weights, the optimizer's
    tensors (AdamW: two per parameter, in float32, before its first step too), and for a sharded run the shards
    besides the consolidated weights; plus 1 MiB for the small files. `frozen=False` (LoRA): the trained tensors
    only."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if frozen or p.requires_grad)
    optim = sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
                if isinstance(t, torch.Tensor))
    optim = max(optim, 2 * 4 * sum(p.numel() for p in model.parameters() if p.requires_grad))
    return weights + optim + (weights + optim if sharded else 0) + (1 << 20)


def _space_problem(directory: Path, needed: int, env: DistEnv) -> None:
    """Rank 0 checks that a checkpoint fits before anything is written; every rank stops with its line if not."""
    problem = None
    if env.is_main:
        try:
            fsutil.check_space(directory, needed, "a checkpoint")
        except RetryLater as exc:
            problem = str(exc)
    problem = broadcast_object(problem, env)
    if problem:
        raise RetryLater(problem)


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, env: DistEnv, sharded: bool,
                    meta: dict, keep_last: int) -> None:
    """Write the checkpoint of `step` atomically (a collective: every rank calls it).

    Sharded (FSDP): every rank writes its DCP shards into the staging directory, then rank 0 consolidates
    the model into one safetensors file. Otherwise rank 0 writes the gathered full state. A checkpoint that
    cannot fit is refused before writing, and a write that fails anyway removes its staging directory; either
    way the earlier checkpoints stay as they are and the error is one line (RetryLater, StorageError).
    """
    final = run_dir / CHECKPOINTS / checkpoint_name(step)
    _space_problem(final.parent, estimate_checkpoint_bytes(model, optimizer, sharded, frozen="lora" not in meta), env)
    staging = fsutil.staging_path(final, str(broadcast_object(fsutil.staging_token(), env)))
    try:
        with fsutil.storage_errors(final.parent, f"the checkpoint of step {step}"):
            _write_checkpoint_collective(staging, final, step, model, optimizer, scheduler, env, sharded, meta)
    except BaseException:
        if env.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if env.is_main:
        prune_checkpoints(run_dir, keep_last, run_id=meta.get("run_id"), before_step=step)
    barrier(env)


def _write_checkpoint_collective(staging: Path, final: Path, step: int, model, optimizer, scheduler, env: DistEnv,
                                 sharded: bool, meta: dict) -> None:
    """Every rank's part of `save_checkpoint`: the shards or the gathered state, then rank 0 writes and commits."""
    if env.is_main:
        staging.mkdir(parents=True)
    barrier(env)
    model_state = optim_state = None
    if sharded:
        save_sharded(staging / SHARDED, model, optimizer)
        save_pause()
    else:
        model_state, optim_state = full_state(model, optimizer, frozen="lora" not in meta)  # LoRA: adapters only
    rngs = gather_objects(rng_state(), env)
    barrier(env)
    if env.is_main:
        if sharded:
            model_state = consolidate_sharded(staging / SHARDED)
        trainer_state = {"scheduler": scheduler.state_dict(), "rng": rngs}
        if not sharded:
            trainer_state["optimizer"] = optim_state
        write_files(staging, step, model_state, {**meta, "format": "sharded" if sharded else "full"},
                    trainer_state)
        fsutil.commit_directory(staging, final)


def resumable_checkpoints(run_dir: str | Path) -> Iterator[Path]:
    """The run's checkpoints, newest first, skipping (and saying so) those whose files are not whole."""
    for path in reversed(list_checkpoints(run_dir)):
        problem = checkpoint_problem(path, need_trainer_state=True)
        if problem is None:
            yield path
        else:
            print(f"warning: checkpoint {path.name} cannot be resumed from: {problem}; trying an earlier one",
                  file=sys.stderr)


def restore_checkpoint(path: Path, model, optimizer, scheduler, env: DistEnv) -> dict:
    """Load a checkpoint of any format and layout into this run; returns its meta.

    A file that fails to load raises UserError naming it (the caller may fall back to an earlier checkpoint).
    """
    meta = read_meta(path)
    trainer_path = path / TRAINER_STATE
    try:
        trainer = torch.load(trainer_path, weights_only=False) if trainer_path.exists() else None
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle means the file is damaged
        raise UserError(f"{trainer_path}: cannot be loaded ({type(exc).__name__}: {exc})") from None
    if (path / SHARDED).is_dir():
        load_sharded(path / SHARDED, model, optimizer if trainer else None)
    else:
        state = safetensors_io.read_file(path / WEIGHTS)
        optim_state = trainer.get("optimizer") if trainer else None
        load_full_state(model, optimizer, state, optim_state, where=str(path / WEIGHTS), frozen="lora" not in meta)
    if trainer:
        scheduler.load_state_dict(trainer["scheduler"])
        rngs = trainer["rng"]
        set_rng_state(rngs[env.rank] if env.rank < len(rngs) else rngs[0])
    else:  # imported weights: a fresh run from them
        meta = {**meta, "step": 0, "tokens_seen": 0, "data_hash": ""}
    return meta
