"""The training loop: one process or many under torchrun, resumable bit-for-bit from any checkpoint.

Determinism: sample i of the data is a pure function of (seed, i) and step s always consumes the same
sample indices, so resuming needs only the step, the weights, the optimizer and the scheduler. The loss
of a step is the sum of token losses over the whole global batch divided by its number of target
tokens, so gradient accumulation and data parallelism give the same update as one big batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from .config import Config, ConfigError, save_config
from .distributed import (DistEnv, all_reduce_sum, barrier, full_state, init_distributed, load_full_state,
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
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=True)


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


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
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


def _autocast(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16), True
    return torch.autocast(device_type=device.type, enabled=False), False


def build_model(config: Config, env: DistEnv) -> CodeGenModel:
    """Build on the meta device and materialise on the target device, seeded so every rank agrees."""
    with torch.device("meta"):
        model = CodeGenModel(config.model)
    model.to_empty(device=env.device)
    generator = torch.Generator(device=env.device).manual_seed(config.train.seed)
    model.init_weights(generator=generator)
    if config.train.init_from:
        from .loading import load_checkpoint

        source = load_checkpoint(config.train.init_from).model
        if source.config.vocab_size != config.model.vocab_size or source.config.n_embd != config.model.n_embd:
            raise UserError(f"train.init_from={config.train.init_from}: its shapes differ from model config")
        model.load_state_dict(source.state_dict(), strict=True)
    model.activation_checkpointing = config.train.activation_checkpointing
    return model


def train(config: Config, run_dir: str | Path, resume: bool = False, tokenizer=None,
          stop_after: int | None = None) -> TrainResult:
    """Train according to `config` in `run_dir`; `stop_after` ends early (tests of crash/resume)."""
    from .data import BatchLoader, prepare_data

    run_dir = Path(run_dir)
    env = init_distributed(config.train.device)
    t = config.train
    if t.num_threads > 0:
        torch.set_num_threads(t.num_threads)
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    np.random.seed(t.seed)

    latest = ckpt.latest_checkpoint(run_dir) if resume else None
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_temporaries(run_dir)
        if not (resume and (run_dir / "config.toml").exists()):
            save_config(config, run_dir / "config.toml")
    barrier(env)

    # Data: rank 0 trains the tokenizer and fills the token cache; the others then read the cache.
    if env.is_main:
        tokenizer, dataset, stats = prepare_data(config, run_dir, tokenizer)
    barrier(env)
    if not env.is_main:
        tokenizer, dataset, stats = prepare_data(config, run_dir, tokenizer)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                          f"{config.model.vocab_size}")

    micro_bs, grad_accum = derive_batching(config, env.world_size)
    model = build_model(config, env)
    autocast, bf16 = _autocast(env.device, t.precision)
    model = wrap_model(model, t.parallel if env.distributed else "none", env, bf16=bf16 and t.parallel == "fsdp")
    if t.compile:
        for block in unwrap(model).transformer.h:
            block.compile()
    optimizer = build_optimizer(model, t)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, t) / t.lr)

    step, tokens_seen = 0, 0
    if latest is not None:
        meta = ckpt.read_meta(latest)
        state = ckpt.load_weights(latest / ckpt.WEIGHTS)
        trainer_path = latest / ckpt.TRAINER_STATE
        trainer = torch.load(trainer_path, weights_only=False) if trainer_path.exists() else None
        load_full_state(model, optimizer, state, trainer["optimizer"] if trainer else None)
        if trainer:
            scheduler.load_state_dict(trainer["scheduler"])
            set_rng_state(trainer["rng"][env.rank] if env.rank < len(trainer["rng"]) else trainer["rng"][0])
            step, tokens_seen = meta["step"], meta["tokens_seen"]
        old_world = meta.get("world_size", env.world_size)
        if env.is_main:
            mapping = ("" if old_world == env.world_size else
                       f"; saved with {old_world} ranks, now {env.world_size}: the data position is the global "
                       f"sample index {meta.get('next_sample_index', '?')}, which every layout reaches at step {step}")
            print(f"resuming from {latest} at step {step}{mapping}", file=sys.stderr)
        if old_world != env.world_size and t.global_batch_tokens <= 0:
            raise UserError(f"checkpoint was saved with {old_world} ranks; resuming on {env.world_size} keeps the "
                            f"data order only with train.global_batch_tokens set")
    elif resume and env.is_main:
        print(f"no checkpoint in {run_dir}; starting from step 0", file=sys.stderr)

    loader = BatchLoader(dataset, config.objective, tokenizer.special_ids(), micro_bs, grad_accum, t.seed,
                         rank=env.rank, world_size=env.world_size, start_step=step)
    tokens_per_step = micro_bs * grad_accum * env.world_size * t.seq_len
    peak, peak_source = device_peak_flops(env.device)
    meter = Throughput(flops_per_token(config.model, t.seq_len), peak)
    run_log = RunLog(run_dir, env.is_main, step)
    if env.is_main:
        n_params = unwrap(model).num_parameters() if hasattr(unwrap(model), "num_parameters") else 0
        print(f"training {n_params:,} parameters on {env.world_size}× {env.device.type}"
              f" ({'bf16' if bf16 else 'fp32'}), {tokens_per_step:,} tokens/step, steps {step}->{t.max_steps}; "
              f"data: {json.dumps(stats.get('summary', {}))}; peak {peak / 1e9:.0f} GFLOP/s ({peak_source})",
              file=sys.stderr)

    def save(step_done: int) -> None:
        model_state, optim_state = full_state(model, optimizer)
        rngs = [None] * env.world_size
        if env.distributed:
            torch.distributed.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if env.is_main:
            meta = {"tokens_seen": tokens_seen, "world_size": env.world_size, "grad_accum": grad_accum,
                    "micro_batch_size": micro_bs, "next_sample_index": step_done * micro_bs * grad_accum * env.world_size}
            trainer_state = {"optimizer": optim_state, "scheduler": scheduler.state_dict(), "rng": rngs}
            ckpt.write_checkpoint(run_dir, step_done, model_state, meta, trainer_state)
            ckpt.prune_checkpoints(run_dir, t.keep_last)
        barrier(env)

    history: list[dict] = []
    last_loss = float("nan")
    model.train()
    iterator = iter(loader)
    started = time.perf_counter()
    try:
        while step < t.max_steps:
            micro_batches = next(iterator)
            local_targets = sum(int((mb.labels != -100).sum()) for mb in micro_batches)
            total_targets = all_reduce_sum(torch.tensor(float(local_targets), device=env.device), env).item()
            loss_sum = torch.zeros(3, device=env.device)  # per objective
            count = torch.zeros(3, device=env.device)
            for index, mb in enumerate(micro_batches):
                sync = index == len(micro_batches) - 1
                context = model.no_sync() if (env.distributed and t.parallel == "ddp" and not sync) else contextlib.nullcontext()
                if env.distributed and t.parallel == "fsdp":
                    model.set_requires_gradient_sync(sync)
                with context:
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

            if step % t.log_every == 0 or step == t.max_steps or step == 1:
                stats_vec = all_reduce_sum(torch.cat([loss_sum, count]).detach(), env).cpu()
                sums, counts = stats_vec[:3], stats_vec[3:]
                last_loss = float(sums.sum() / counts.sum().clamp_min(1))
                record = {"step": step, "loss": last_loss, "lr": scheduler.get_last_lr()[0],
                          "grad_norm": float(grad_norm), "tokens": tokens_seen,
                          "tokens_per_s": meter.tokens_per_second(), "mfu": meter.mfu(env.world_size),
                          "elapsed_s": time.perf_counter() - started}
                for code, name in enumerate(OBJECTIVE_NAMES):
                    if counts[code] > 0:
                        record[f"loss_{name}"] = float(sums[code] / counts[code])
                history.append(record)
                run_log.write(record)
                if env.is_main:
                    parts = " ".join(f"{n} {record[f'loss_{n}']:.3f}" for n in OBJECTIVE_NAMES if f"loss_{n}" in record)
                    print(f"step {step}/{t.max_steps} | loss {last_loss:.4f} ({parts}) | lr {record['lr']:.2e} | "
                          f"gnorm {record['grad_norm']:.2f} | {record['tokens_per_s']:,.0f} tok/s | "
                          f"MFU {100 * record['mfu']:.1f}% | ETA {format_duration(meter.eta_seconds(t.max_steps - step))}",
                          file=sys.stderr, flush=True)
            if step % t.checkpoint_every == 0 or step == t.max_steps:
                save(step)
            if stop_after is not None and step >= stop_after:
                break
    finally:
        loader.close() if hasattr(loader, "close") else None
        run_log.close()
    return TrainResult(run_dir=run_dir, final_step=step, tokens_seen=tokens_seen, last_loss=last_loss,
                       history=history)

