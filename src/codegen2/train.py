"""The training loop: one process or many under torchrun (DDP or FSDP2), resumable bit-for-bit from any checkpoint.

Determinism: sample i of the data is a pure function of (seed, i) and step s always consumes the global
sample indices [s*G, (s+1)*G) with G = micro_batch_size * grad_accum * world_size, whatever the layout.
So the data-loader position is just the step (there is no token buffer to save), and resuming needs the
step, the weights, the optimizer, the scheduler and the RNG states. The loss of a step is the sum of
token losses over the whole global batch divided by its number of target tokens, so gradient
accumulation and data parallelism give the same update as one big batch.

Every step also folds a digest of the exact samples it trained on (index and tokens, summed over all
ranks, so independent of the layout) into a hash chain that is logged (`data_hash`) and checkpointed:
two runs saw the same data in the same order up to step s iff their `data_hash` at s agree.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint as ckpt
from .config import Config, ConfigError, dump_toml
from .data import BatchLoader, prepare_data
from .data.heldout import HeldoutProbe, run_heldout_documents
from .data.loader import objective_setup
from .distributed import (
    DistEnv,
    all_reduce_sum,
    barrier,
    broadcast_object,
    build_sharded,
    collectives_guarded,
    init_distributed,
    load_full_state,
    shutdown,
    unwrap,
    wrap_model,
)
from .errors import RetryLater, UserError
from .fsutil import DirectoryLock, atomic_write_text
from .head_loss import chunk_positions, head_loss
from .lora import LoraSettings, attach_lora, initial_adapter_state, initial_rows_state, train_rows
from .metrics import MemoryPlan, Throughput, device_peak_flops, flops_per_token, format_duration, plan_training_memory
from .models import architecture, build_model
from .models.vocab import grow_model
from .objectives import OBJECTIVE_NAMES

log = logging.getLogger("codegen2")


@dataclass
class TrainResult:
    run_dir: Path
    final_step: int
    tokens_seen: int
    last_loss: float
    history: list[dict] = field(default_factory=list)
    interrupted: str = ""  # the signal ("SIGINT", "SIGTERM") that stopped training early, after a checkpoint


def lr_at(step: int, cfg) -> float:
    """Linear warm-up to `lr`, then cosine decay to `lr * min_lr_ratio` at `max_steps`."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW; biases, LayerNorm weights (all 1-D tensors) get no weight decay."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel (one pass over each tensor instead of a chain of foreach ops) is what transformers'
    # Trainer uses; on the 125m shape it takes the CPU optimizer step from 36 to 31 s per 2048 tokens.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)


# ------------------------------------------------------------------------------------------- batching
def derive_batching(config: Config, world_size: int) -> tuple[int, int]:
    """(micro_batch_size, grad_accum) per rank; from `global_batch_tokens` when it is set."""
    t = config.train
    if t.global_batch_tokens <= 0:
        return t.micro_batch_size, t.grad_accum
    per_micro = t.seq_len * t.micro_batch_size * world_size
    if t.global_batch_tokens % per_micro:
        raise ConfigError(
            f"train.global_batch_tokens={t.global_batch_tokens} is not a multiple of seq_len * micro_batch_size "
            f"* ranks = {t.seq_len} * {t.micro_batch_size} * {world_size} = {per_micro}")
    return t.micro_batch_size, t.global_batch_tokens // per_micro


def resume_batching(config: Config, world_size: int, meta: dict) -> tuple[int, int, str]:
    """(micro_batch_size, grad_accum, note) that keep the checkpoint's samples per step on `world_size` ranks.

    The data position of a checkpoint is the global sample index step * G; it stays a step boundary
    only if G (samples per step) is unchanged, so a new rank count changes grad_accum (and, if it must,
    the micro-batch size), never G.
    """
    micro, accum = derive_batching(config, world_size)
    saved_world = int(meta.get("world_size", world_size))
    saved_micro = int(meta.get("micro_batch_size", micro))
    saved_accum = int(meta.get("grad_accum", accum))
    samples = saved_micro * saved_accum * saved_world
    if micro * accum * world_size != samples:
        candidates = [m for m in range(min(micro, samples), 0, -1) if samples % (m * world_size) == 0]
        if not candidates:
            raise UserError(f"checkpoint step {meta.get('step')} was trained with {samples} samples per step "
                            f"({saved_world} ranks x {saved_micro} x {saved_accum}); {world_size} ranks cannot "
                            f"split that evenly - resume on a rank count that divides {samples}")
        micro = candidates[0]
        accum = samples // (micro * world_size)
    if (saved_world, saved_micro, saved_accum) == (world_size, micro, accum):
        return micro, accum, ""
    step = int(meta.get("step", 0))
    note = (f"checkpoint layout {saved_world} ranks x micro-batch {saved_micro} x accumulation {saved_accum}, "
            f"now {world_size} x {micro} x {accum}: both take {samples} samples per step, so the data continues "
            f"at global sample index {step} * {samples} = {step * samples}, exactly where it stopped")
    return micro, accum, note


# ---------------------------------------------------------------------------------------- run state
def sample_digest(micro_batches) -> int:
    """Sum over this rank's samples of a 40-bit digest of (sample index, input ids, labels).

    40 bits keep the cross-rank int64 sum exact for any batch under 2^23 samples; summing makes the
    step's digest independent of how samples are spread over ranks and micro-batches.
    """
    total = 0
    for mb in micro_batches:
        for index, ids, labels in zip(mb.sample_index.tolist(), mb.input_ids.numpy(), mb.labels.numpy()):
            h = hashlib.blake2b(index.to_bytes(8, "little"), digest_size=5)
            h.update(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
            h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
            total += int.from_bytes(h.digest(), "little")
    return total


def chain_hash(previous: str, step: int, step_digest: int) -> str:
    return hashlib.blake2b(f"{previous}:{step}:{step_digest}".encode(), digest_size=8).hexdigest()


def fold_digests(data_hash: str, pending: list[tuple[int, torch.Tensor]]) -> str:
    """Fold the steps' digests (device tensors, read only now) into the chain, oldest first; empties `pending`."""
    for step, digest in pending:
        data_hash = chain_hash(data_hash, step, int(digest))
    pending.clear()
    return data_hash


class RunLog:
    """JSONL log (plus TensorBoard when installed) written by rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int):
        self.enabled = enabled
        self.path = run_dir / "log.jsonl"
        self.writer = None
        if not enabled:
            return
        if self.path.exists():
            # Steps after the checkpoint we resume from are about to be redone: drop their records.
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)
        except Exception:  # tensorboard is optional
            self.writer = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ------------------------------------------------------------------------------------------- model
def _autocast(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16), True
    return torch.autocast(device_type=device.type, enabled=False), False


def compile_blocks(model: torch.nn.Module) -> None:
    """Compile each block in place (parameter names unchanged); one compiled graph serves every layer."""
    for block in architecture(model.config).blocks(model):
        block.compile()


def build_training_model(config: Config, env: DistEnv, parallel: str = "none", bf16: bool = False,
                         initial: dict[str, torch.Tensor] | None = None, base_bf16: bool = False,
                         rows: range = range(0)) -> torch.nn.Module:
    """Build on the meta device, then materialise on the target device, seeded so that every rank and
    every layout starts from the same weights, and wrap for `parallel`.

    FSDP shards while still on the meta device, so each rank only ever allocates its own shards (what
    makes the big presets fit); the other layouts materialise the whole model. A LoRA run (`train.lora.rank`)
    freezes the loaded weights (in bf16 when `base_bf16`) and attaches float32 adapters, drawn from the same
    seeded generator, before the model is compiled or wrapped (under FSDP: on the meta device, before sharding);
    the rows of tokens added to its vocabulary (`rows`) train with them.
    """
    t = config.train
    generator = torch.Generator(device=env.device).manual_seed(t.seed)
    settings = lora_settings(config)
    sharded = parallel == "fsdp" and env.distributed
    if sharded:
        model = _build_sharded_model(config, env, bf16, settings, base_bf16, generator, rows)
    else:
        with torch.device("meta"):
            model = build_model(config.model)
        model.to_empty(device=env.device)
        architecture(config.model).init_weights(model, generator)
    if t.init_from:
        state = initial if initial is not None else init_state(t.init_from, config)
        if sharded and settings is not None:  # the rows' and adapters' first values, as one process makes them
            state = {**initial_rows_state(model, state), **initial_adapter_state(model, generator, env.device)}
        try:
            load_full_state(model, None, state, None)
        except UserError as exc:
            raise UserError(f"train.init_from={t.init_from}: {exc}") from None
        del state
    if settings is not None and not sharded:  # before compile and DDP: both must see the adapters
        attach_adapters(model, settings, base_bf16, generator, rows)
    if t.compile and not sharded:
        compile_blocks(model)
    model.activation_checkpointing = t.activation_checkpointing
    if parallel == "ddp" and env.distributed:
        model = wrap_model(model, "ddp", env, bf16=False)
    return model


def _build_sharded_model(config: Config, env: DistEnv, bf16: bool, settings: LoraSettings | None, base_bf16: bool,
                         generator: torch.Generator, rows: range = range(0)) -> torch.nn.Module:
    """FSDP2: the model built on the meta device, its LoRA adapters (and trained rows) attached and its blocks
    compiled there, then sharded (frozen base, adapters and rows alike) and initialised one module at a time."""
    t = config.train

    def make_meta():
        with torch.device("meta"):
            return build_model(config.model)

    def prepare(model: torch.nn.Module) -> None:
        if settings is not None:  # no values yet: the caller loads the base and `initial_adapter_state`
            attach_adapters(model, settings, base_bf16, None, rows)
        if t.compile:
            compile_blocks(model)

    return build_sharded(make_meta, env, bf16, architecture(config.model).init_weights, generator,
                         prepare=prepare if settings is not None or t.compile else None)


# ------------------------------------------------------------------------------------------- LoRA
def lora_settings(config: Config) -> LoraSettings | None:
    """`[train.lora]` as LoraSettings, or None for full training; the checks that need no model, in one line."""
    lora = config.train.lora
    if lora.rank <= 0:
        return None
    if not config.train.init_from:
        raise ConfigError("train.lora (--lora) adapts existing weights: give the base with --init-from RUN_OR_HF_DIR")
    targets = lora.targets[0] if len(lora.targets) == 1 and lora.targets[0] in ("all-linear", "attention") \
        else tuple(lora.targets)
    return LoraSettings(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, targets=targets).check()


def attach_adapters(model: torch.nn.Module, settings: LoraSettings, base_bf16: bool,
                    generator: torch.Generator, rows: range = range(0)) -> None:
    """Freeze the base (bf16 when training in bf16) and attach float32 adapters, and the added tokens' rows (`rows`)
    as float32 parameters beside them; names the count in the log."""
    try:
        names = attach_lora(model, settings, base_dtype=torch.bfloat16 if base_bf16 else None, generator=generator)
        train_rows(model, rows)
    except UserError as exc:
        raise UserError(f"train.lora: {exc}") from None
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA rank %d on %d layers: %s trainable parameters", settings.rank, len(names), f"{trained:,}")


def lora_meta(config: Config, settings: LoraSettings | None, rows: range = range(0)) -> dict | None:
    """What every checkpoint of a LoRA run records: the settings, the base's fingerprint and the trained rows of
    the tokens added to the base's vocabulary ([start, stop), when there are any)."""
    if settings is None:
        return None
    from .loading import base_fingerprint

    targets = settings.targets if isinstance(settings.targets, str) else list(settings.targets)
    return {"rank": settings.rank, "alpha": settings.alpha, "dropout": settings.dropout, "targets": targets,
            "base": base_fingerprint(config.train.init_from), **({"rows": [rows.start, rows.stop]} if rows else {})}


def check_resumed_base(config: Config, saved_meta: dict | None, run_dir: Path) -> None:
    """--resume of a LoRA run refuses a base that changed since its checkpoint (one line)."""
    if saved_meta is None or "lora" not in saved_meta:
        return
    from .loading import check_base

    check_base(saved_meta["lora"]["base"], f"--resume {run_dir}", config.train.init_from)


def init_state(path: str, config: Config, rows: range = range(0)) -> dict[str, torch.Tensor]:
    """Weights to start from (run or HF directory), converted to this run's layout (CodeGen: its `mp_num`); with
    `rows` (sentinels added to its tokenizer: `add_sentinels`), its vocabulary grown to this run's."""
    from .loading import load_checkpoint

    source = load_checkpoint(path, inference=False).model
    if rows:
        source = grow_model(source, config.model.vocab_size, rows)
    fields = ("arch", "vocab_size", "n_layer", "n_embd", "n_head", "kv_heads", "rotary_dim", "inner_dim",
              "tie_word_embeddings")  # a tied head has no lm_head tensor, and a missing one would load silently
    differ = [f"{f} {getattr(source.config, f)} vs {getattr(config.model, f)}" for f in fields
              if getattr(source.config, f) != getattr(config.model, f)]
    if differ:
        raise UserError(f"train.init_from={path}: its shapes differ from the model config ({', '.join(differ)})")
    return architecture(config.model).hf.convert_state(source.state_dict(), source.config, config.model)


def _scalar(value: torch.Tensor) -> float:
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        value = value.full_tensor()
    return float(value)


def memory_plan(config: Config, world_size: int = 1, parallel: str = "none") -> MemoryPlan:
    """The training memory of this config per rank (`metrics.plan_training_memory`; `codegen2 info` prints it)."""
    m, t = config.model, config.train
    settings = lora_settings(config) if t.lora.rank > 0 and t.init_from else None
    base_bytes = 2 if t.precision == "bf16" or (t.precision == "auto" and torch.cuda.is_available()) else 4
    return plan_training_memory(m, t.seq_len, t.micro_batch_size, checkpointing=t.activation_checkpointing,
                                world_size=world_size, parallel=parallel, lora=settings, base_bytes=base_bytes)


def training_memory_bytes(config: Config, world_size: int = 1, parallel: str = "none") -> tuple[int, int, int]:
    """(parameters, bytes per rank, of which activations): a floor on what training holds in memory."""
    plan = memory_plan(config, world_size, parallel)
    return plan.parameters, plan.total, plan.activations


def available_memory_bytes(device: torch.device) -> int | None:
    """Free memory of the device training runs on (CPU: MemAvailable), or None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory_fit(config: Config, env: DistEnv, parallel: str) -> None:
    """Refuse, before any work, a model whose weights, gradients and optimizer state cannot fit the device."""
    plan = memory_plan(config, env.world_size, parallel)
    n, per_rank, activations = plan.parameters, plan.total, plan.activations
    available = available_memory_bytes(env.device)
    if available is None:
        return
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if env.device.type == "cpu" else 1
    need = per_rank * ranks_here
    if need > available:
        preset = f"the {config.preset} preset" if config.preset else "this model"
        raise UserError(
            f"{preset} ({n:,} parameters) needs at least {need / 2**30:.1f} GiB to train (weights, gradients, "
            f"AdamW state and {activations / 2**30:.1f} GiB of activations per micro-batch"
            f"{f', on {ranks_here} ranks' if ranks_here > 1 else ''}) but {env.device.type} memory has "
            f"{available / 2**30:.1f} GiB available; choose a smaller model (--preset tiny), a smaller "
            f"train.micro_batch_size, train.activation_checkpointing=true, or more devices with --parallel fsdp")


class StopRequest:
    """SIGINT / SIGTERM during the loop: finish the step in progress, save a checkpoint, then stop.

    A second signal gets the previous handler (Ctrl-C twice stops at once; checkpoints are atomic, so
    that never leaves a partial one). Under torchrun the ranks agree on the step to stop after."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        self.signum = signum
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def requested(self, env: DistEnv) -> bool:
        if not env.distributed:
            return self.signum is not None
        flag = torch.tensor([0 if self.signum is None else 1], dtype=torch.int64, device=env.device)
        return bool(all_reduce_sum(flag, env).item())

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a signal on another rank"


# ------------------------------------------------------------------------------------------ one step
@dataclass
class StepSettings:
    """What a training step needs besides the model, the optimizer and the batch."""

    device: torch.device = torch.device("cpu")
    world_size: int = 1
    parallel: str = "none"  # none | ddp | fsdp
    autocast: Any = field(default_factory=contextlib.nullcontext)
    grad_clip: float = 0.0  # 0 = no clipping (the norm is still computed and returned)
    document_mask: bool = False
    prefix_lm: bool = False


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batches, total_targets: torch.Tensor,
               settings: StepSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer update over `micro_batches` (gradient accumulation); returns (grad_norm, loss_sum, count).

    The loss is the sum of token losses over the global batch divided by `total_targets` (its number of
    target tokens over all ranks), so any split into micro-batches and ranks gives the same update.
    `loss_sum` / `count` [len(OBJECTIVE_NAMES)] are this rank's summed token losses and targets per
    objective, left on the device. The caller steps the learning-rate scheduler. The model returns its final hidden
    states and `head_loss` runs the head and the cross-entropy on a chunk of positions at a time, so the full
    [tokens, vocab] logits and their gradient never exist (the same loss and gradients, less memory).
    """
    s = settings
    n = len(OBJECTIVE_NAMES)
    loss_sum = torch.zeros(n, device=s.device)
    count = torch.zeros(n, device=s.device)
    for index, mb in enumerate(micro_batches):
        sync = index == len(micro_batches) - 1
        if s.parallel == "fsdp":
            model.set_requires_gradient_sync(sync)
        with model.no_sync() if s.parallel == "ddp" and not sync else contextlib.nullcontext():
            labels = mb.labels.to(s.device, non_blocking=True)
            kwargs = {}
            if s.document_mask:
                kwargs["doc_ids"] = mb.doc_ids.to(s.device)
            if s.prefix_lm:
                kwargs["prefix_len"] = mb.prefix_len.to(s.device)
            with s.autocast:
                hidden = model(mb.input_ids.to(s.device, non_blocking=True), return_hidden=True, **kwargs)
            total, token_loss = head_loss(hidden, labels, *output_head(model, s.autocast))
            # Gradient averaging over ranks (DDP, FSDP) divides by world_size: undo it so the update
            # is d(sum of token losses / all targets of the global batch).
            (total / total_targets * s.world_size).backward()
            with torch.no_grad():
                codes = mb.objective.to(s.device)
                loss_sum.index_add_(0, codes, token_loss.sum(dim=1))
                count.index_add_(0, codes, (labels != -100).sum(dim=1).float())
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip if s.grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, loss_sum, count


def output_head(model: torch.nn.Module, autocast) -> tuple[Any, list[torch.Tensor], int]:
    """(head, params, chunk) for `head_loss`: the model's logits under `autocast`, the trained parameters outside the
    blocks (those the head may read: an untied head, a tied embedding, added rows) and the positions per chunk.

    Taken after the forward: under FSDP the root's parameters are then the unsharded ones the head computes with."""
    core = unwrap(model)

    def head(hidden: torch.Tensor) -> torch.Tensor:
        with autocast:
            return core.logits(hidden)

    inside = {id(p) for block in architecture(core.config).blocks(core) for p in block.parameters()}
    params = [p for p in core.parameters() if p.requires_grad and id(p) not in inside]
    return head, params, chunk_positions(core.config.vocab_size, core.config.n_embd, head_trains=bool(params))


def is_due(step: int, every: int, last_step: int) -> bool:
    """The one cadence rule for logging, evaluation and checkpoints: every `every` steps and at the last step."""
    return step == last_step or (every > 0 and step % every == 0)


# ------------------------------------------------------------------------------------------ the loop
def train(config: Config, run_dir: str | Path, resume: bool = False, tokenizer=None,
          stop_after: int | None = None, overwrite: bool = False) -> TrainResult:
    """Train according to `config` in `run_dir`; `stop_after` ends early (tests of crash/resume).

    A new run refuses a directory that holds another run unless `overwrite` (which replaces its files);
    `resume` continues the run there from its newest intact checkpoint. One process writes a run: rank 0 holds
    RUN/.lock until it returns or dies, and a second trainer is refused (RetryLater) naming the holder. Under
    torchrun, a collective that fails because another rank hung or died ends each rank in one line (RetryLater).
    """
    run_dir = Path(run_dir)
    ckpt.check_run_directory(run_dir, resume, overwrite)
    env = init_distributed(config.train.device)
    lock = None
    with collectives_guarded(env):
        try:
            env.enter("at start-up")
            tokenizer, rows = add_sentinels(config, tokenizer, env)  # may grow model.vocab_size: before memory check
            check_memory_fit(config, env, config.train.parallel if env.distributed else "none")  # before any file
            lock = _lock_run(run_dir, env)
            # Weights to start from are read before any work, so that a wrong --init-from fails at once (passed
            # inline, not held here, so that they are freed once copied into the model).
            run = _set_up(config, run_dir, env, resume, overwrite, tokenizer,
                          init_state(config.train.init_from, config, rows) if config.train.init_from else None, rows)
            return _run_loop(run, stop_after)
        finally:
            if lock is not None:
                lock.release()
            shutdown(env)


def _lock_run(run_dir: Path, env: DistEnv) -> DirectoryLock | None:
    """Rank 0 takes the run's lock (held for the run's life, dropped by the OS if the process dies); when another
    process holds it, every rank stops with the same line naming that process."""
    lock = problem = None
    if env.is_main:
        try:
            lock = DirectoryLock(run_dir, "training run").acquire()
        except RetryLater as exc:
            problem = str(exc)
    problem = broadcast_object(problem, env)
    if problem:
        raise RetryLater(problem)
    return lock


def seed_rngs(seed: int, rank: int) -> None:
    """Seed the global RNGs. Only dropout draws from torch's (weights and adapters use their own seeded
    generator, and DDP/FSDP start every rank from the same weights), so each rank gets `seed + rank`: ranks draw
    their own dropout masks rather than one mask copied across the batch, and one process is unchanged."""
    torch.manual_seed(seed + rank)
    random.seed(seed)
    np.random.seed(seed)


def _start_run_directory(config: Config, run_dir: Path, resume: bool, overwrite: bool, env: DistEnv) -> Path | None:
    """Seed every RNG, create the run directory (config.toml unless resuming) and find the checkpoint to resume:
    the newest whose files are whole (damaged ones are named and skipped)."""
    t = config.train
    if t.num_threads > 0:
        torch.set_num_threads(t.num_threads)
    seed_rngs(t.seed, env.rank)
    if env.is_main:
        replaced = None if resume else ckpt.check_run_directory(run_dir, resume, overwrite)
        if replaced:
            ckpt.clear_run_directory(run_dir)
            print(f"--overwrite: removed the previous run in {run_dir} ({replaced})", file=sys.stderr)
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_temporaries(run_dir)
        if not resume:
            atomic_write_text(run_dir / "config.toml", dump_toml(config))
    barrier(env)
    if not resume:
        return None
    latest = next(iter(ckpt.resumable_checkpoints(run_dir)), None)
    found = ckpt.list_checkpoints(run_dir)
    if latest is None and found:
        raise UserError(f"{run_dir}: no intact checkpoint to resume from (all {len(found)} are damaged, see above); "
                        f"start afresh with --overwrite")
    if latest is not None and found[-1] != latest and env.is_main:
        print(f"warning: resuming from the newest intact checkpoint, {latest.name}; the damaged newer ones are "
              f"left in place for you to inspect", file=sys.stderr)
    return latest


def init_tokenizer(config: Config):
    """The tokenizer of `train.init_from`: weights are only meaningful with the token ids they were trained on."""
    from .hf import load_hf_tokenizer

    if config.tokenizer.path:
        raise ConfigError(f"train.init_from={config.train.init_from} brings its own tokenizer; remove "
                          f"tokenizer.path={config.tokenizer.path}")
    return load_hf_tokenizer(config.train.init_from, config.model.vocab_size)


def add_sentinels(config: Config, tokenizer, env: DistEnv):
    """(tokenizer, rows): with `objective.add_sentinels` and a starting tokenizer (`--init-from`'s, or the one
    given) that lacks CodeGen2's sentinels, that tokenizer with them added and the rows of their ids; the model's
    vocabulary grows to cover them (config.model.vocab_size, saved in config.toml), said in one line. Otherwise the
    tokenizer as given and no rows. The same on every start of the run, so --resume rebuilds the same model."""
    if not config.objective.add_sentinels or (tokenizer is None and not config.train.init_from):
        return tokenizer, range(0)  # a tokenizer trained by the data preparation has the sentinels
    base = tokenizer if tokenizer is not None else init_tokenizer(config)
    if base.has_sentinels:
        return tokenizer, range(0)
    extended = base.with_sentinels(config.tokenizer.num_masks)
    rows = extended.sentinel_rows
    config.model.vocab_size = max(config.model.vocab_size, extended.vocab_size)
    config.tokenizer.vocab_size = config.model.vocab_size
    if env.is_main:
        head = "embedding (tied head) has" if config.model.tie_word_embeddings else "embedding and output head have"
        print(f"objective.add_sentinels: span corruption adds <sep>, <eom> and <mask_1>..<mask_{extended.num_masks}> "
              f"to the tokenizer (ids {rows.start}..{rows.stop - 1}); the {head} {config.model.vocab_size} rows, the "
              f"new tokens' starting as the mean of the tokenizer's own", file=sys.stderr)
    return extended, rows


def _prepare_data_on_ranks(config: Config, run_dir: Path, tokenizer, env: DistEnv):
    """Rank 0 prepares the run's data if it is not prepared yet (the others wait for its manifest, then the
    barrier); then every rank memory-maps the shards."""
    from .data.pipeline import run_prepared_dir
    from .data.prepare.shards import MANIFEST

    if tokenizer is None and config.train.init_from and not (run_dir / "tokenizer.json").is_file():
        tokenizer = init_tokenizer(config)
    if env.is_main:
        tokenizer, dataset, stats = prepare_data(config, run_dir, tokenizer)
    else:
        manifest = run_prepared_dir(config, run_dir) / MANIFEST
        if not manifest.is_file():
            if env.rank == 1:
                waiting = "rank 1 waits" if env.world_size == 2 else f"ranks 1-{env.world_size - 1} wait"
                print(f"{waiting} for rank 0 to prepare the data in {manifest.parent}", file=sys.stderr, flush=True)
            # Polled rather than a barrier alone, whose timeout (30 minutes) a large preparation can exceed;
            # if rank 0 fails, torchrun stops this rank.
            while not manifest.is_file():
                time.sleep(1.0)
    barrier(env)
    if not env.is_main:
        tokenizer, dataset, stats = prepare_data(config, run_dir, tokenizer)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                          f"{config.model.vocab_size}")
    return tokenizer, dataset, stats


def data_summary(stats: dict) -> dict:
    """The data line of the training summary: per source its documents and tokens, what was skipped (binary,
    not UTF-8, empty, bad lines...) or removed (filters, duplicates, benchmark text) and how many documents are
    held out, so that nothing is dropped without a word."""
    summary = dict(stats.get("summary", {}))
    for source in stats.get("sources", []):
        skipped = [f"{count:,} {reason.replace('_', ' ')}"
                   for reason, count in sorted(source.get("skipped", {}).items()) if count]
        notes = [f"skipped {', '.join(skipped)}"] if skipped else []
        if source.get("truncated"):
            notes.append(f"{source['truncated']:,} cut to data.max_doc_chars")
        removed = [f"{count:,} {reason.replace('_', ' ')}"
                   for reason, count in sorted(source.get("removed", {}).items()) if count]
        if removed:
            notes.append(f"removed {', '.join(removed)}")
        if source.get("heldout_docs"):
            notes.append(f"{source['heldout_docs']:,} held out")
        if notes and source["name"] in summary:
            summary[source["name"]] += "; " + "; ".join(notes)
    return summary


def _log_record(step: int, tokens: int, t, loss_sum: torch.Tensor, count: torch.Tensor, grad_norm, scheduler,
                meter: Throughput, env: DistEnv, extra: dict) -> dict:
    """The logged record of `step` (a collective: the per-objective losses are summed over ranks)."""
    n = len(OBJECTIVE_NAMES)
    stats_vec = all_reduce_sum(torch.cat([loss_sum, count]).detach(), env).cpu()
    sums, counts = stats_vec[:n], stats_vec[n:]
    record = {"step": step, "loss": float(sums.sum() / counts.sum().clamp_min(1)), "lr": scheduler.get_last_lr()[0],
              "grad_norm": _scalar(grad_norm), "tokens": tokens, "tokens_per_s": meter.tokens_per_second(),
              "mfu": meter.mfu(env.world_size), "eta_s": meter.eta_seconds(t.max_steps - step), **extra}
    for code, name in enumerate(OBJECTIVE_NAMES):
        if counts[code] > 0:
            record[f"loss_{name}"] = float(sums[code] / counts[code])
    if env.device.type == "cuda":
        record["peak_mem_gib"] = torch.cuda.max_memory_allocated(env.device) / 2**30
    return record


def _print_record(record: dict, max_steps: int) -> None:
    parts = " ".join(f"{n} {record[f'loss_{n}']:.3f}" for n in OBJECTIVE_NAMES if f"loss_{n}" in record)
    print(f"step {record['step']}/{max_steps} | loss {record['loss']:.4f} ({parts}) | lr {record['lr']:.2e} | "
          f"gnorm {record['grad_norm']:.2f} | {record['tokens_per_s']:,.0f} tok/s | "
          f"MFU {100 * record['mfu']:.1f}% | ETA {format_duration(record['eta_s'])}", file=sys.stderr, flush=True)


@dataclass
class TrainingRun:
    """What the training loop works with, set up once by `_set_up`; `step`, `tokens_seen` and `data_hash` are
    the position the loop advances (and checkpoints)."""

    config: Config
    run_dir: Path
    env: DistEnv
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    settings: StepSettings
    dataset: Any
    run_id: str
    micro_bs: int
    grad_accum: int
    step: int = 0
    tokens_seen: int = 0
    data_hash: str = ""
    # Made once the step to start from is known (the loader and the log start there):
    loader: BatchLoader | None = None
    meter: Throughput | None = None
    run_log: RunLog | None = None
    probe: HeldoutProbe | None = None
    lora: dict | None = None  # a LoRA run's settings and base fingerprint (checkpointed)

    @property
    def sharded_checkpoints(self) -> bool:
        """FSDP runs write DCP shards; a LoRA run's adapters are small, so every layout gathers them into the one
        format a single process writes (and any layout resumes)."""
        return self.settings.parallel == "fsdp" and not self.lora

    @property
    def samples_per_step(self) -> int:
        return self.micro_bs * self.grad_accum * self.env.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.samples_per_step * self.config.train.seq_len

    def checkpoint_meta(self) -> dict:
        """What a checkpoint of the current step records besides the tensors: where the data continues."""
        next_index = self.step * self.samples_per_step
        return {"run_id": self.run_id, "tokens_seen": self.tokens_seen, "world_size": self.env.world_size,
                "grad_accum": self.grad_accum, "micro_batch_size": self.micro_bs, "parallel": self.settings.parallel,
                "next_sample_index": next_index, "epochs": self.dataset.epochs_at(next_index),
                "data_hash": self.data_hash, **({"lora": self.lora} if self.lora else {})}


def _set_up(config: Config, run_dir: Path, env: DistEnv, resume: bool, overwrite: bool, tokenizer,
            initial: dict[str, torch.Tensor] | None, rows: range = range(0)) -> TrainingRun:
    """The run directory, the data, the model and optimizer (restored when resuming) and the loader."""
    t = config.train
    latest = _start_run_directory(config, run_dir, resume, overwrite, env)
    saved_meta = ckpt.read_meta(latest) if latest is not None else None
    check_resumed_base(config, saved_meta, run_dir)
    tokenizer, dataset, stats = _prepare_data_on_ranks(config, run_dir, tokenizer, env)
    if saved_meta is not None:
        micro_bs, grad_accum, layout_note = resume_batching(config, env.world_size, saved_meta)
    else:
        (micro_bs, grad_accum), layout_note = derive_batching(config, env.world_size), ""
    parallel = t.parallel if env.distributed else "none"
    autocast, bf16 = _autocast(env.device, t.precision)
    model = build_training_model(config, env, parallel, bf16=bf16 and parallel == "fsdp", initial=initial,
                                 base_bf16=bf16, rows=rows)
    del initial
    optimizer = build_optimizer(model, t)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, t) / t.lr)
    settings = StepSettings(device=env.device, world_size=env.world_size, parallel=parallel, autocast=autocast,
                            grad_clip=t.grad_clip, document_mask=t.document_mask, prefix_lm=config.objective.prefix_lm)
    run = TrainingRun(config=config, run_dir=run_dir, env=env, model=model, optimizer=optimizer, scheduler=scheduler,
                      settings=settings, dataset=dataset, micro_bs=micro_bs, grad_accum=grad_accum,
                      run_id=uuid.uuid4().hex[:12],  # marks this run's checkpoints: pruning never touches another's
                      lora=lora_meta(config, lora_settings(config), rows))
    _restore(run, latest, saved_meta, layout_note, resume)
    objective, special, note = objective_setup(config.objective, tokenizer, config.model.arch)
    if note and env.is_main:
        print(note)
    run.loader = BatchLoader(dataset, objective, special, micro_bs, grad_accum, t.seed,
                             rank=env.rank, world_size=env.world_size, start_step=run.step)
    peak, peak_source = device_peak_flops(env.device)
    run.meter = Throughput(flops_per_token(config.model, t.seq_len), peak)
    run.run_log = RunLog(run_dir, env.is_main, run.step)
    if t.eval_every > 0:
        run.probe = HeldoutProbe(run_heldout_documents(config, run_dir), tokenizer, t.seq_len, t.eval_tokens, micro_bs)
    if env.is_main:
        adapted = f" (LoRA rank {config.train.lora.rank}: {_trainable(model):,} trained)" if run.lora else ""
        print(f"training {unwrap(model).num_parameters():,} parameters{adapted} on {env.world_size}x {env.device.type} "
              f"({parallel}, {'bf16' if bf16 else 'fp32'}), {micro_bs} x {grad_accum} x {env.world_size} = "
              f"{run.samples_per_step} samples = {run.tokens_per_step:,} tokens/step, steps {run.step}->"
              f"{t.max_steps}; peak {peak / 1e9:.0f} GFLOP/s ({peak_source})", file=sys.stderr)
        for name, text in data_summary(stats).items():  # one line per source: what it gave and what it lost
            print(f"  {name}: {text}", file=sys.stderr)
    return run


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _restore(run: TrainingRun, latest: Path | None, saved_meta: dict | None, layout_note: str, resume: bool) -> None:
    """Load the checkpoint to resume from (if any) into the run; every rank then agrees on the run id."""
    env = run.env
    if latest is not None:
        meta = ckpt.restore_checkpoint(latest, run.model, run.optimizer, run.scheduler, env)
        run.step, run.tokens_seen, run.data_hash = meta["step"], meta["tokens_seen"], meta.get("data_hash", "")
        if "format" in saved_meta:  # imported weights (no format) start a new run
            run.run_id = saved_meta.get("run_id")
        if env.is_main:
            position = (f"global sample index {meta['next_sample_index']}" if "next_sample_index" in meta
                        else "imported weights: data from the start")
            print(f"resuming from {latest} at step {run.step} ({position})"
                  + (f"; {layout_note}" if layout_note else ""), file=sys.stderr)
    elif resume and env.is_main:
        print(f"no checkpoint in {run.run_dir}; starting from step 0", file=sys.stderr)
    run.run_id = broadcast_object(run.run_id, env)


def _run_loop(run: TrainingRun, stop_after: int | None) -> TrainResult:
    """Steps until max_steps, `stop_after` or a signal; logs, evaluates and checkpoints when due."""
    t, env = run.config.train, run.env
    history: list[dict] = []
    pending_digests: list[tuple[int, torch.Tensor]] = []  # (step, data digest) not yet in data_hash
    last_loss = float("nan")
    interrupted = ""
    run.model.train()
    iterator = iter(run.loader)
    started = time.perf_counter()
    run.meter.start()
    stop = StopRequest().install()
    try:
        while run.step < t.max_steps:
            env.enter(f"at step {run.step + 1}")  # names the step in the line of a failed collective
            grad_norm, loss_sum, count = _step(run, next(iterator), pending_digests)
            log_due = is_due(run.step, t.log_every, t.max_steps) or run.step == 1
            checkpoint_due = is_due(run.step, t.checkpoint_every, t.max_steps)
            if log_due or checkpoint_due:
                run.data_hash = fold_digests(run.data_hash, pending_digests)
            evaluation = _probe(run, log_due)
            if log_due:
                extra = {"elapsed_s": time.perf_counter() - started, "data_hash": run.data_hash, **evaluation}
                record = _log_record(run.step, run.tokens_seen, t, loss_sum, count, grad_norm, run.scheduler,
                                     run.meter, env, extra)
                last_loss = record["loss"]
                history.append(record)
                run.run_log.write(record)
                if env.is_main:
                    _print_record(record, t.max_steps)
            stopping = stop.requested(env)
            if checkpoint_due or stopping:
                if stopping and not checkpoint_due:
                    run.data_hash = fold_digests(run.data_hash, pending_digests)
                env.enter(f"while saving the checkpoint of step {run.step}")
                ckpt.save_checkpoint(run.run_dir, run.step, run.model, run.optimizer, run.scheduler, env,
                                     run.sharded_checkpoints, run.checkpoint_meta(), t.keep_last)
            if stopping:
                interrupted = stop.name
                _say_stopped(run, interrupted)
                break
            if stop_after is not None and run.step >= stop_after:
                break
    finally:
        stop.restore()
        run.loader.close()
        run.run_log.close()
    env.enter("at the end of the run")
    return TrainResult(run_dir=run.run_dir, final_step=run.step, tokens_seen=run.tokens_seen, last_loss=last_loss,
                       history=history, interrupted=interrupted)


def _step(run: TrainingRun, micro_batches, pending_digests: list[tuple[int, torch.Tensor]]):
    """One training step; its data digest joins `pending_digests`. Returns train_step's (grad_norm, loss_sum, count)."""
    local_targets = sum(int((mb.labels != -100).sum()) for mb in micro_batches)
    # One collective for the step's target count (the loss normaliser) and its data digest.
    step_totals = torch.tensor([local_targets, sample_digest(micro_batches)], dtype=torch.int64,
                               device=run.env.device)
    step_totals = all_reduce_sum(step_totals, run.env)  # stays on the device: no host sync per step
    pending_digests.append((run.step + 1, step_totals[1]))
    result = train_step(run.model, run.optimizer, micro_batches, step_totals[0].float(), run.settings)
    run.scheduler.step()
    run.step += 1
    run.tokens_seen += run.tokens_per_step
    run.meter.update(run.tokens_per_step)
    return result


def _probe(run: TrainingRun, log_due: bool) -> dict:
    """The held-out losses when an evaluation is due (their time is left out of the throughput); logged on their
    own line unless the step's record, which carries them, is written too."""
    t = run.config.train
    if run.probe is None or not is_due(run.step, t.eval_every, t.max_steps):
        return {}
    eval_started = time.perf_counter()
    evaluation = run.probe(run.model, run.settings.autocast)
    run.meter.exclude(time.perf_counter() - eval_started)
    if run.env.is_main:
        print(f"eval step {run.step} | tokens {run.tokens_seen:,} | " + " | ".join(
            f"held-out {k[5:-5].replace('nl', 'prose')} loss {v:.4f}" for k, v in evaluation.items()),
            file=sys.stderr, flush=True)
    if evaluation and not log_due:
        run.run_log.write({"step": run.step, "tokens": run.tokens_seen, **evaluation})
    return evaluation


def _say_stopped(run: TrainingRun, signal_name: str) -> None:
    if run.env.is_main:
        print(f"{signal_name}: stopped after step {run.step} and saved its checkpoint "
              f"({run.run_dir / ckpt.CHECKPOINTS / ckpt.checkpoint_name(run.step)}); continue with --resume",
              file=sys.stderr, flush=True)
