"""torchrun integration: process groups, DDP / FSDP2 wrapping, meta-device initialisation, and state exchange.

The *full* state (model and optimizer unsharded, keyed by parameter name) is gathered and loaded here with
`torch.distributed.checkpoint.state_dict`, into any layout (none, DDP, FSDP with any rank count). The
*sharded* (DCP) checkpoint format is written and read by `codegen2.checkpoint`.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .errors import RetryLater, UserError
from .models import architecture
from .options import resolve_device
from .safetensors_io import require_all


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    process_group: bool = False  # launched by torchrun: collectives go through a process group
    owns_group: bool = False  # this process created the process group (and so tears it down)
    stage: str = "at start-up"  # what the run does now: the line of a failed collective names it

    def enter(self, stage: str) -> None:
        """Name what this rank does next ("at step 6"), for the line a failed collective ends in; the test hook
        CODEGEN2_HANG_AT stalls here."""
        self.stage = stage
        stall_for_test(self.rank, stage)

    @property
    def is_main(self) -> bool:
        return is_main_process(self.rank)

    @property
    def distributed(self) -> bool:
        """True under torchrun, even with one process (so `--parallel fsdp` also applies to a single GPU)."""
        return self.process_group


def is_main_process(rank: int | None = None) -> bool:
    """The one main-process test: rank 0 (by default torchrun's RANK) prints and writes the run's files."""
    return (int(os.environ.get("RANK", "0")) if rank is None else rank) == 0


COLLECTIVE_TIMEOUT_ENV = "CODEGEN2_COLLECTIVE_TIMEOUT_S"
DEFAULT_COLLECTIVE_TIMEOUT_S = 1800.0


def collective_timeout_s() -> float:
    """How long a collective waits for the other ranks before failing (CODEGEN2_COLLECTIVE_TIMEOUT_S, default 30
    minutes): a hung or dead rank then ends every rank's run instead of blocking it forever."""
    raw = os.environ.get(COLLECTIVE_TIMEOUT_ENV, "") or str(DEFAULT_COLLECTIVE_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise UserError(f"{COLLECTIVE_TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return seconds


def is_collective_failure(exc: BaseException) -> bool:
    """True for the error a collective raises when a peer hangs (timeout) or dies (connection closed)."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        marker in text for marker in ("Timed out", "timed out", "Connection closed by peer", "Connection reset",
                                      "NCCL communicator was aborted", "ProcessGroupGloo"))


HANG_ENV = "CODEGEN2_HANG_AT"  # test hook: "RANK:STAGE:SECONDS", e.g. "1:at step 6:8" or "1:at start-up:8"


def stall_for_test(rank: int, stage: str) -> None:
    """Test hook: one rank sleeps on entering a stage (see HANG_ENV), so that the others' collective times out."""
    spec = os.environ.get(HANG_ENV, "")
    if spec:
        at_rank, at_stage, seconds = spec.split(":")
        if int(at_rank) == rank and at_stage == stage:
            time.sleep(float(seconds))


def collective_failure_line(env: DistEnv, exc: BaseException) -> str:
    """One line for a collective that failed because another rank hung or died: this rank, the stage, the cause."""
    first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
    first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0]  # drop the C++ source location
    return (f"rank {env.rank} of {env.world_size}: a collective failed {env.stage} (another rank hung or died; "
            f"timeout {collective_timeout_s():g} s, {COLLECTIVE_TIMEOUT_ENV}): {first[:200]}; run again with --resume")


@contextlib.contextmanager
def collectives_guarded(env: DistEnv) -> Iterator[None]:
    """Every collective in the block (start-up agreement, steps, checkpoint saves, the end of the run): one that
    fails because another rank hung or died ends this rank in one line, RetryLater (exit 75), since the run resumes
    from its last checkpoint once every rank is back; any other error passes through."""
    try:
        yield
    except Exception as exc:
        if not (env.distributed and is_collective_failure(exc)):
            raise
        raise RetryLater(collective_failure_line(env, exc)) from None


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_distributed(device_setting: str = "auto") -> DistEnv:
    """Join the torchrun process group when launched by torchrun (NCCL on GPU, gloo on CPU); else one process."""
    device = resolve_device(device_setting, "train.device")
    if not launched_by_torchrun():
        return DistEnv(device=device)
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=collective_timeout_s()),
                                device_id=device if device.type == "cuda" else None)
        owns = True
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device, process_group=True,
                   owns_group=owns)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        if env.device.type == "cuda":
            dist.barrier(device_ids=[env.device.index])
        else:
            dist.barrier()


def all_reduce_sum(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    if not env.distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """`obj` of every rank, in rank order, on every rank."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def apply_fsdp(model: nn.Module, env: DistEnv, bf16: bool) -> nn.Module:
    """FSDP2: shard every block, then the root (embeddings, final norm, head), over all ranks.

    With `bf16`, parameters are all-gathered and computed in bf16 while the sharded master copy, the
    optimizer and the gradient reduce-scatter stay fp32.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # The root returns the logits as a view, which FSDP2 warns could lose its backward hook if modified in
    # place; the callers only read them (the loss, the held-out probe), so the warning is noise.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for block in architecture(model.config).blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def wrap_model(model: nn.Module, parallel: str, env: DistEnv, bf16: bool) -> nn.Module:
    """DDP, or FSDP2 per block plus root (bf16 parameters, fp32 gradient reduction when `bf16`)."""
    if parallel == "none" or not env.distributed:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [env.local_rank] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    return apply_fsdp(model, env, bf16)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


@torch.no_grad()
def copy_full_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into a parameter, keeping only this rank's shard when the parameter is a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor):
        # Every rank holds the same `full`, so each can cut its own shard without communication.
        local = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None).to_local()
        target.to_local().copy_(local)
    else:
        target.copy_(full)


def init_streaming(model: nn.Module, template: nn.Module, init_fn: Callable[[Any, torch.Generator], None],
                   generator: torch.Generator, device: torch.device, renamed: dict[str, str] | None = None) -> None:
    """Initialise a (possibly sharded, already materialised) model one module at a time.

    `template` is an unsharded meta-device copy of the model. Each of its modules that owns parameters is
    materialised alone, initialised by `init_fn(view, generator)` where `view` exposes only that module
    through `named_modules()` and the model's `config`, and copied (sharded) into `model`. Because the
    modules are visited in the same order as a whole-model `init_fn`, the generator yields exactly the
    same numbers: the weights equal an unsharded initialisation bit for bit, while memory never holds
    more than one full module (e.g. the 16B preset's embedding) on top of this rank's shards. `renamed` maps a
    template parameter's name to the model's where they differ (a wrapper that moved it, as `TrainedRows` does).
    """
    params = dict(model.named_parameters())
    renamed = renamed or {}
    for name, module in template.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        module.to_empty(device=device, recurse=False)
        view = SimpleNamespace(config=getattr(template, "config", None),
                               named_modules=lambda n=name, m=module: iter([(n, m)]))
        init_fn(view, generator)
        for pname, full in module.named_parameters(recurse=False):
            key = f"{name}.{pname}" if name else pname
            copy_full_into(params[renamed.get(key, key)], full)
        module.to_empty(device="meta", recurse=False)  # free the full copy


def build_sharded(make_meta_model: Callable[[], nn.Module], env: DistEnv, bf16: bool,
                  init_fn: Callable[[Any, torch.Generator], None], generator: torch.Generator,
                  prepare: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """Build on the meta device, shard with FSDP2, then materialise only this rank's shards and initialise them.

    `prepare(model)` runs on the meta model before sharding (per-block compile, LoRA adapters go there); a
    parameter it moves (into a wrapper module) is followed by identity, so it is initialised all the same.
    """
    model = make_meta_model()
    template = copy.deepcopy(model)
    before = {id(param): name for name, param in model.named_parameters()}
    if prepare is not None:
        prepare(model)
    renamed = {before[id(param)]: name for name, param in model.named_parameters()
               if id(param) in before and before[id(param)] != name}
    apply_fsdp(model, env, bf16)
    model.to_empty(device=env.device)
    init_streaming(model, template, init_fn, generator, env.device, renamed)
    return model


# ------------------------------------------------------------------------------------ state exchange
def full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None,
               frozen: bool = True) -> tuple[dict, dict | None]:
    """Full model and optimizer state dicts on CPU, keyed by parameter name; complete on rank 0 only.

    A collective for FSDP (it all-gathers the shards), so every rank must call it. `frozen=False` leaves out
    the parameters that do not train (a LoRA run's base), which are never copied.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=not frozen)
    if optimizer is None:
        return get_model_state_dict(model, options=options), None
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    return model_state, optim_state


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, model_state: dict,
                    optim_state: dict | None, where: str = "", frozen: bool = True) -> None:
    """Load full state dicts into a (possibly sharded) model and its optimizer on every rank.

    torch's full-state-dict loader reports unexpected tensors but silently keeps the initial values of
    missing ones, so a state that lacks a tensor is refused here (naming `where`) before anything is loaded."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    require_all(get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=not frozen)), model_state,
                where)
    options = StateDictOptions(full_state_dict=True, strict=frozen)
    if optimizer is None or optim_state is None:
        set_model_state_dict(model, model_state, options=options)
    else:
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state, options=options)


def shutdown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()
