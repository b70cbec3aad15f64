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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from .config import Config, ConfigError, dump_toml
from .distributed import (DistEnv, all_reduce_sum, barrier, broadcast_object, build_sharded, full_state,
                          gather_objects, init_distributed, load_full_state, load_sharded, save_sharded, shutdown,
                          unwrap, wrap_model)
from .errors import UserError
from .metrics import Throughput, device_peak_flops, flops_per_token, format_duration
from .model import CodeGenModel

log = logging.getLogger("codegen2")

OBJECTIVE_NAMES = ("causal", "span", "fim")


@dataclass
class TrainResult:
    run_dir: Path
    final_step: int
    tokens_seen: int
    last_loss: float
    history: list[dict] = field(default_factory=list)


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
def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
            ckpt.atomic_write_text(self.path, "".join(line + "\n" for line in kept))
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


def _compile_blocks(model: CodeGenModel) -> None:
    """Compile each block in place (parameter names unchanged); one compiled graph serves every layer."""
    for block in model.transformer.h:
        block.compile()


def build_model(config: Config, env: DistEnv, parallel: str = "none", bf16: bool = False) -> torch.nn.Module:
    """Build on the meta device, then materialise on the target device, seeded so that every rank and
    every layout starts from the same weights, and wrap for `parallel`.

    FSDP shards while still on the meta device, so each rank only ever allocates its own shards (what
    makes the big presets fit); the other layouts materialise the whole model.
    """
    t = config.train
    generator = torch.Generator(device=env.device).manual_seed(t.seed)
    if parallel == "fsdp" and env.distributed:
        def make_meta():
            with torch.device("meta"):
                return CodeGenModel(config.model)

        model = build_sharded(make_meta, env, bf16, CodeGenModel.init_weights, generator,
                              prepare=_compile_blocks if t.compile else None)
    else:
        with torch.device("meta"):
            model = CodeGenModel(config.model)
        model.to_empty(device=env.device)
        model.init_weights(generator=generator)
        if t.compile:
            _compile_blocks(model)
    if t.init_from:
        load_full_state(model, None, init_state(t.init_from, config), None)
    model.activation_checkpointing = t.activation_checkpointing
    if parallel == "ddp" and env.distributed:
        model = wrap_model(model, "ddp", env, bf16=False)
    return model


def init_state(path: str, config: Config) -> dict[str, torch.Tensor]:
    """Weights to start from (run or HF directory), with qkv regrouped to this run's `mp_num`."""
    from .hf_weights import regroup_state_dict
    from .loading import load_checkpoint

    source = load_checkpoint(path, inference=False).model
    fields = ("vocab_size", "n_layer", "n_embd", "n_head", "rotary_dim", "inner_dim")
    differ = [f"{f} {getattr(source.config, f)} vs {getattr(config.model, f)}" for f in fields
              if getattr(source.config, f) != getattr(config.model, f)]
    if differ:
        raise UserError(f"train.init_from={path}: its shapes differ from the model config ({', '.join(differ)})")
    state = source.state_dict()
    if source.config.mp_num != config.model.mp_num:
        state = regroup_state_dict(state, config.model.n_head, source.config.mp_num, config.model.mp_num)
    return state


def _scalar(value: torch.Tensor) -> float:
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        value = value.full_tensor()
    return float(value)


# -------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, env: DistEnv, sharded: bool,
                    meta: dict, keep_last: int) -> None:
    """Write the checkpoint of `step` atomically (a collective: every rank calls it).

    Sharded (FSDP): every rank writes its DCP shards into the staging directory, then rank 0 consolidates
    the model into one safetensors file. Otherwise rank 0 writes the gathered full state.
    """
    final = run_dir / ckpt.CHECKPOINTS / ckpt.checkpoint_name(step)
    staging = ckpt.staging_path(final, str(broadcast_object(os.getpid(), env)))
    if env.is_main:
        staging.mkdir(parents=True)
    barrier(env)
    model_state = optim_state = None
    if sharded:
        save_sharded(staging / ckpt.SHARDED, model, optimizer)
        ckpt.save_pause()
    else:
        model_state, optim_state = full_state(model, optimizer)
    rngs = gather_objects(rng_state(), env)
    barrier(env)
    if env.is_main:
        if sharded:
            model_state = ckpt.consolidate_sharded(staging / ckpt.SHARDED)
        trainer_state = {"scheduler": scheduler.state_dict(), "rng": rngs}
        if not sharded:
            trainer_state["optimizer"] = optim_state
        ckpt.write_files(staging, step, model_state, {**meta, "format": "sharded" if sharded else "full"},
                         trainer_state)
        ckpt.commit_directory(staging, final)
        ckpt.prune_checkpoints(run_dir, keep_last)
    barrier(env)


def restore_checkpoint(path: Path, model, optimizer, scheduler, env: DistEnv) -> dict:
    """Load a checkpoint of any format and layout into this run; returns its meta."""
    meta = ckpt.read_meta(path)
    trainer_path = path / ckpt.TRAINER_STATE
    trainer = torch.load(trainer_path, weights_only=False) if trainer_path.exists() else None
    if (path / ckpt.SHARDED).is_dir():
        load_sharded(path / ckpt.SHARDED, model, optimizer if trainer else None)
    else:
        state = ckpt.load_weights(path / ckpt.WEIGHTS)
        load_full_state(model, optimizer, state, trainer.get("optimizer") if trainer else None)
    if trainer:
        scheduler.load_state_dict(trainer["scheduler"])
        rngs = trainer["rng"]
        set_rng_state(rngs[env.rank] if env.rank < len(rngs) else rngs[0])
    else:  # imported weights: a fresh run from them
        meta = {**meta, "step": 0, "tokens_seen": 0, "data_hash": ""}
    return meta


# ------------------------------------------------------------------------------------------ the loop
def train(config: Config, run_dir: str | Path, resume: bool = False, tokenizer=None,
          stop_after: int | None = None) -> TrainResult:
    """Train according to `config` in `run_dir`; `stop_after` ends early (tests of crash/resume)."""
    from .data import BatchLoader, prepare_data

    run_dir = Path(run_dir)
    env = init_distributed(config.train.device)
    try:
        return _train(config, run_dir, resume, tokenizer, stop_after, env, BatchLoader, prepare_data)
    finally:
        shutdown(env)


def _train(config, run_dir, resume, tokenizer, stop_after, env, BatchLoader, prepare_data) -> TrainResult:
    t = config.train
    if t.num_threads > 0:
        torch.set_num_threads(t.num_threads)
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    np.random.seed(t.seed)

    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_temporaries(run_dir)
        if not (resume and (run_dir / "config.toml").exists()):
            ckpt.atomic_write_text(run_dir / "config.toml", dump_toml(config))
    barrier(env)
    latest = ckpt.latest_checkpoint(run_dir) if resume else None
    saved_meta = ckpt.read_meta(latest) if latest is not None else None

    # Data: rank 0 trains the tokenizer and fills the token cache; the others then read the cache.
    if env.is_main:
        tokenizer, dataset, stats = prepare_data(config, run_dir, tokenizer)
    barrier(env)
    if not env.is_main:
        tokenizer, dataset, stats = prepare_data(config, run_dir, tokenizer)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                          f"{config.model.vocab_size}")

    if saved_meta is not None:
        micro_bs, grad_accum, layout_note = resume_batching(config, env.world_size, saved_meta)
    else:
        (micro_bs, grad_accum), layout_note = derive_batching(config, env.world_size), ""
    parallel = t.parallel if env.distributed else "none"
    autocast, bf16 = _autocast(env.device, t.precision)
    model = build_model(config, env, parallel, bf16=bf16 and parallel == "fsdp")
    sharded = parallel == "fsdp"
    optimizer = build_optimizer(model, t)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, t) / t.lr)

    step, tokens_seen, data_hash = 0, 0, ""
    if latest is not None:
        meta = restore_checkpoint(latest, model, optimizer, scheduler, env)
        step, tokens_seen, data_hash = meta["step"], meta["tokens_seen"], meta.get("data_hash", "")
        if env.is_main:
            print(f"resuming from {latest} at step {step} (global sample index {meta.get('next_sample_index', '?')})"
                  + (f"; {layout_note}" if layout_note else ""), file=sys.stderr)
    elif resume and env.is_main:
        print(f"no checkpoint in {run_dir}; starting from step 0", file=sys.stderr)

    loader = BatchLoader(dataset, config.objective, tokenizer.special_ids(), micro_bs, grad_accum, t.seed,
                         rank=env.rank, world_size=env.world_size, start_step=step)
    samples_per_step = micro_bs * grad_accum * env.world_size
    tokens_per_step = samples_per_step * t.seq_len
    peak, peak_source = device_peak_flops(env.device)
    meter = Throughput(flops_per_token(config.model, t.seq_len), peak)
    run_log = RunLog(run_dir, env.is_main, step)
    probe = None
    if t.eval_every > 0:
        from .eval.heldout import HeldoutProbe

        probe = HeldoutProbe(config.data, tokenizer, t.seq_len, t.eval_tokens, micro_bs)
    if env.is_main:
        n_params = unwrap(model).num_parameters() if hasattr(unwrap(model), "num_parameters") else 0
        print(f"training {n_params:,} parameters on {env.world_size}x {env.device.type} ({parallel}, "
              f"{'bf16' if bf16 else 'fp32'}), {micro_bs} x {grad_accum} x {env.world_size} = {samples_per_step} "
              f"samples = {tokens_per_step:,} tokens/step, steps {step}->{t.max_steps}; "
              f"data: {json.dumps(stats.get('summary', {}))}; peak {peak / 1e9:.0f} GFLOP/s ({peak_source})",
              file=sys.stderr)

    def checkpoint_meta(step_done: int) -> dict:
        next_index = step_done * samples_per_step
        return {"tokens_seen": tokens_seen, "world_size": env.world_size, "grad_accum": grad_accum,
                "micro_batch_size": micro_bs, "parallel": parallel, "next_sample_index": next_index,
                "epochs": dataset.epochs_at(next_index), "data_hash": data_hash}

    history: list[dict] = []
    pending_digests: list[tuple[int, torch.Tensor]] = []  # (step, data digest) not yet in data_hash
    last_loss = float("nan")
    model.train()
    iterator = iter(loader)
    started = time.perf_counter()
    meter.start()
    try:
        while step < t.max_steps:
            micro_batches = next(iterator)
            local_targets = sum(int((mb.labels != -100).sum()) for mb in micro_batches)
            # One collective for the step's target count (the loss normaliser) and its data digest.
            step_totals = torch.tensor([local_targets, sample_digest(micro_batches)], dtype=torch.int64,
                                       device=env.device)
            step_totals = all_reduce_sum(step_totals, env)  # stays on the device: no host sync per step
            total_targets = step_totals[0].float()
            pending_digests.append((step + 1, step_totals[1]))
            loss_sum = torch.zeros(3, device=env.device)  # per objective
            count = torch.zeros(3, device=env.device)
            for index, mb in enumerate(micro_batches):
                sync = index == len(micro_batches) - 1
                no_sync = parallel == "ddp" and not sync
                if parallel == "fsdp":
                    model.set_requires_gradient_sync(sync)
                with model.no_sync() if no_sync else contextlib.nullcontext():
                    input_ids = mb.input_ids.to(env.device, non_blocking=True)
                    labels = mb.labels.to(env.device, non_blocking=True)
                    kwargs = {}
                    if t.document_mask:
                        kwargs["doc_ids"] = mb.doc_ids.to(env.device)
                    if config.objective.prefix_lm:
                        kwargs["prefix_len"] = mb.prefix_len.to(env.device)
                    with autocast:
                        logits = model(input_ids, **kwargs)
                    token_loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                                 reduction="none").view_as(labels)
                    # Gradient averaging over ranks (DDP, FSDP) divides by world_size: undo it so the update
                    # is d(sum of token losses / all targets of the global batch).
                    loss = token_loss.sum() / total_targets * env.world_size
                    loss.backward()
                    with torch.no_grad():
                        per_row = token_loss.sum(dim=1)
                        rows_targets = (labels != -100).sum(dim=1).float()
                        codes = mb.objective.to(env.device)
                        loss_sum.index_add_(0, codes, per_row)
                        count.index_add_(0, codes, rows_targets)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf"))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            meter.update(tokens_per_step)

            if step % t.log_every == 0 or step == t.max_steps or step == 1 or step % t.checkpoint_every == 0:
                data_hash = fold_digests(data_hash, pending_digests)
            evaluation = {}
            if probe is not None and (step % t.eval_every == 0 or step == t.max_steps):
                eval_started = time.perf_counter()
                evaluation = probe(model, autocast)
                meter.exclude(time.perf_counter() - eval_started)
                if env.is_main:
                    print(f"eval step {step} | tokens {tokens_seen:,} | " + " | ".join(
                        f"held-out {k[5:-5].replace('nl', 'prose')} loss {v:.4f}" for k, v in evaluation.items()),
                        file=sys.stderr, flush=True)
            if evaluation and not (step % t.log_every == 0 or step == t.max_steps or step == 1):
                run_log.write({"step": step, "tokens": tokens_seen, **evaluation})
            if step % t.log_every == 0 or step == t.max_steps or step == 1:
                stats_vec = all_reduce_sum(torch.cat([loss_sum, count]).detach(), env).cpu()
                sums, counts = stats_vec[:3], stats_vec[3:]
                last_loss = float(sums.sum() / counts.sum().clamp_min(1))
                eta = meter.eta_seconds(t.max_steps - step)
                record = {"step": step, "loss": last_loss, "lr": scheduler.get_last_lr()[0],
                          "grad_norm": _scalar(grad_norm), "tokens": tokens_seen,
                          "tokens_per_s": meter.tokens_per_second(), "mfu": meter.mfu(env.world_size),
                          "eta_s": eta, "elapsed_s": time.perf_counter() - started, "data_hash": data_hash,
                          **evaluation}
                for code, name in enumerate(OBJECTIVE_NAMES):
                    if counts[code] > 0:
                        record[f"loss_{name}"] = float(sums[code] / counts[code])
                if env.device.type == "cuda":
                    record["peak_mem_gib"] = torch.cuda.max_memory_allocated(env.device) / 2**30
                history.append(record)
                run_log.write(record)
                if env.is_main:
                    parts = " ".join(f"{n} {record[f'loss_{n}']:.3f}" for n in OBJECTIVE_NAMES if f"loss_{n}" in record)
                    print(f"step {step}/{t.max_steps} | loss {last_loss:.4f} ({parts}) | lr {record['lr']:.2e} | "
                          f"gnorm {record['grad_norm']:.2f} | {record['tokens_per_s']:,.0f} tok/s | "
                          f"MFU {100 * record['mfu']:.1f}% | ETA {format_duration(eta)}",
                          file=sys.stderr, flush=True)
            if step % t.checkpoint_every == 0 or step == t.max_steps:
                save_checkpoint(run_dir, step, model, optimizer, scheduler, env, sharded, checkpoint_meta(step),
                                t.keep_last)
            if stop_after is not None and step >= stop_after:
                break
    finally:
        loader.close()
        run_log.close()
    return TrainResult(run_dir=run_dir, final_step=step, tokens_seen=tokens_seen, last_loss=last_loss,
                       history=history)
