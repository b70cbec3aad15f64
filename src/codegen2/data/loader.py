"""Batches for the training loop: which samples each rank reads at each step, prefetched.

Sample indices are a pure function of (step, micro-batch, rank):

    index = ((step * grad_accum + micro) * world_size + rank) * micro_batch_size + b

so across ranks and steps every index is used exactly once, and none is skipped. Each sample is
turned into a training example by `objectives.make_example(mixture[index], index, seed, ...)`,
itself a pure function of the index, so the data after a resume equals the uninterrupted run's.

A background thread builds the next batches into a bounded queue while the model trains.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from codegen2.config import ObjectiveConfig
from codegen2.data.mixture import PackedMixture
from codegen2.errors import UserError
from codegen2.infill import Specials, resolve_format
from codegen2.objectives import OBJECTIVE_CODES, SpecialIds, check_setup, make_example, native_special_ids


@dataclass
class Batch:
    input_ids: torch.Tensor  # int64 [B, T]
    labels: torch.Tensor  # int64 [B, T], -100 = no loss
    doc_ids: torch.Tensor  # int64 [B, T], document of each position within its sequence
    prefix_len: torch.Tensor  # int64 [B], bidirectional prefix length (0 = plain causal)
    objective: torch.Tensor  # int64 [B], objectives.OBJECTIVE_CODES
    sample_index: torch.Tensor  # int64 [B], global sample indices

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(**{name: getattr(self, name).to(device, non_blocking=non_blocking)
                        for name in self.__dataclass_fields__})


_DONE = object()


def objective_setup(objective_cfg: ObjectiveConfig, tokenizer, arch: str) -> tuple[ObjectiveConfig, SpecialIds, str]:
    """The objective a run trains with this tokenizer, the ids it writes, and a note for the log ("" if none).

    A tokenizer with CodeGen2's sentinels trains the configured mixture as it is. Without them (Qwen2.5-Coder,
    StarCoder2, DeepSeek-Coder, CodeLlama), infilling is learnt as FIM in the model's own format: the share the
    config gives span corruption goes to that FIM (`span_rate` 0), and the note says so; span corruption itself is
    the explicit choice `objective.add_sentinels`, which adds the sentinels before this is asked. A model with no infill
    format trains its configured FIM / span share left to right only if both are zero; otherwise it is refused.
    """
    if tokenizer.has_sentinels:
        return objective_cfg, tokenizer.special_ids(), ""
    infill_share = objective_cfg.span_rate + objective_cfg.fim_rate
    if infill_share == 0:
        return objective_cfg, SpecialIds(eot=tokenizer.eot_id, sep=None, eom=None, masks=()), ""
    fmt = resolve_format(None, arch, Specials.of(tokenizer))
    special = native_special_ids(Specials.of(tokenizer), fmt)
    note = ""
    if objective_cfg.span_rate > 0:
        note = (f"objective: the tokenizer has no CodeGen2 sentinels, so span corruption (span_rate "
                f"{objective_cfg.span_rate}) becomes FIM in the model's {fmt.name} format: fim_rate {infill_share} "
                f"(objective.add_sentinels=true adds them and trains span corruption)")
    return dataclasses.replace(objective_cfg, span_rate=0.0, fim_rate=infill_share), special, note


class BatchLoader:
    """Yields, per optimizer step, the list of `grad_accum` micro-batches of this rank."""

    def __init__(self, dataset: PackedMixture, objective_cfg: ObjectiveConfig, special: SpecialIds,
                 micro_batch_size: int, grad_accum: int, seed: int, rank: int = 0, world_size: int = 1,
                 start_step: int = 0, prefetch: int = 2):
        if micro_batch_size < 1 or grad_accum < 1:
            raise UserError(f"micro_batch_size={micro_batch_size} and grad_accum={grad_accum} must be at least 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"rank={rank} must lie in [0, world_size={world_size})")
        if start_step < 0:
            raise UserError(f"start_step={start_step} must be non-negative")
        # Report a sequence too short for the corruption layout now, not from the prefetch thread.
        check_setup(dataset.seq_len, objective_cfg, special)
        self.dataset = dataset
        self.objective_cfg = objective_cfg
        self.special = special
        self.micro_batch_size = micro_batch_size
        self.grad_accum = grad_accum
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.prefetch = max(1, prefetch)
        self.step = start_step  # the next step this loader will yield
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    @property
    def samples_per_step(self) -> int:
        """Samples consumed by all ranks together in one optimizer step."""
        return self.grad_accum * self.world_size * self.micro_batch_size

    def sample_indices(self, step: int, micro: int) -> list[int]:
        first = ((step * self.grad_accum + micro) * self.world_size + self.rank) * self.micro_batch_size
        return list(range(first, first + self.micro_batch_size))

    # ---------------------------------------------------------------------------- building
    def make_batch(self, indices: list[int]) -> Batch:
        chunks = self.dataset.get_batch(indices)
        examples = [make_example(chunk, i, self.seed, self.objective_cfg, self.special)
                    for chunk, i in zip(chunks, indices)]
        return Batch(
            input_ids=torch.from_numpy(np.stack([e.input_ids for e in examples]).astype(np.int64)),
            labels=torch.from_numpy(np.stack([e.labels for e in examples]).astype(np.int64)),
            doc_ids=torch.from_numpy(np.stack([e.doc_ids for e in examples]).astype(np.int64)),
            prefix_len=torch.tensor([e.prefix_len for e in examples], dtype=torch.int64),
            objective=torch.tensor([OBJECTIVE_CODES[e.objective] for e in examples], dtype=torch.int64),
            sample_index=torch.tensor(indices, dtype=torch.int64),
        )

    def step_batches(self, step: int) -> list[Batch]:
        """The micro-batches of `step` for this rank, built synchronously."""
        return [self.make_batch(self.sample_indices(step, micro)) for micro in range(self.grad_accum)]

    # --------------------------------------------------------------------------- iteration
    def _produce(self, first_step: int, out: queue.Queue, stop: threading.Event) -> None:
        step = first_step
        try:
            while not stop.is_set():
                self._put(out, stop, (step, self.step_batches(step)))
                step += 1
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._put(out, stop, (_DONE, exc))

    @staticmethod
    def _put(out: queue.Queue, stop: threading.Event, item: tuple) -> None:
        """Put `item`, giving up if the consumer has gone (so the thread can always finish)."""
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Iterator[list[Batch]]:
        """Endless; stop by breaking out of the loop (or calling close()), which ends the thread."""
        self.close()
        stop = threading.Event()
        items: queue.Queue = queue.Queue(maxsize=self.prefetch)
        thread = threading.Thread(target=self._produce, args=(self.step, items, stop),
                                  name="codegen2-batch-prefetch", daemon=True)
        self._stop, self._thread = stop, thread
        thread.start()
        try:
            while True:
                step, payload = items.get()
                if step is _DONE:
                    raise payload
                self.step = step + 1
                yield payload
        finally:
            stop.set()
            thread.join()
            if self._thread is thread:
                self._stop = self._thread = None

    def close(self) -> None:
        """Stop a running prefetch thread (iteration also stops it when the loop is left)."""
        if self._stop is not None and self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._stop = self._thread = None

    # ------------------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.seed, "samples_per_step": self.samples_per_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the saved step. Global batch and seed must match, else the data would differ."""
        if state.get("seed") != self.seed or state.get("samples_per_step") != self.samples_per_step:
            raise UserError(
                f"cannot resume the data stream: it was saved with seed={state.get('seed')} and "
                f"{state.get('samples_per_step')} samples per step, this run has seed={self.seed} and "
                f"{self.samples_per_step} (micro_batch_size * grad_accum * world_size)"
            )
        self.close()
        self.step = int(state["step"])
