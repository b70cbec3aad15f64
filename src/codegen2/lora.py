"""LoRA adapters (Hu et al. 2021): small trained matrices beside the frozen projections of a model.

A wrapped projection computes `W x + b + (alpha / r) B A dropout(x)`. W and b are the base's own
parameters, frozen (requires_grad False, so they get neither gradients nor optimizer state) and held in the
training precision; A [r, in] and B [out, r] are float32 and are the only parameters that train. A starts
random (Kaiming uniform, as PEFT does) and B at zero, so a fresh adapter leaves the model's function as it
was. `merge_lora` folds `(alpha / r) B A` into W and puts a plain `nn.Linear` back: that is how adapters
reach inference, the Hugging Face export and int8 quantization, which then see an ordinary model.

Defaults (`LoraSettings()`): rank 16, alpha 32 (scale 2), dropout 0.05, targets `all-linear`. PEFT's
defaults (r 8, alpha 8, q/v only) are the smallest; torchtune and litgpt use alpha = 2 r over attention
and MLP, and adapting every linear layer of the blocks is what brings LoRA close to full fine-tuning
(QLoRA, Dettmers et al. 2023); rank 16 adds under 1% to a 1B or 7B model's parameters.

Targets:
- `all-linear`: every `nn.Linear` inside the decoder blocks (`Architecture.blocks`): not the output head,
  not the embedding (PEFT's `all-linear` excludes the head too).
- `attention`: the linear layers of the blocks whose path has a component naming attention (`attn`,
  `self_attn`, `attention`): CodeGen's `qkv_proj` and `out_proj`, LLaMA's `q/k/v/o_proj`.
- module names: each name selects the linear layers whose path is that name or ends with `.name` (PEFT's
  rule), anywhere in the model; a name that selects nothing is refused.

Added tokens: when span corruption added CodeGen2's sentinels to the tokenizer (`models.vocab`), `train_rows`
wraps the input embedding and the untied output head in `TrainedRows`: the base table stays frozen, and the
added tokens' rows are a float32 parameter `<path>.rows` that trains with the adapters (a tied head reads the
same rows). They are adapter parameters (`adapter_parameters`): checkpointed with their optimizer state, and
folded back into a plain table by `merge_lora`.

Names: a wrapped module keeps `weight` and `bias` where they were and adds `lora_A.weight` and
`lora_B.weight` beside them, so the base's state-dict keys do not change and the adapter's keys are
PEFT's, without PEFT's `base_model.model.` prefix (see `codegen2.adapters`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .models import architecture
from .models.vocab import vocabulary_modules

DEFAULT_RANK = 16
DEFAULT_ALPHA = 32.0
DEFAULT_DROPOUT = 0.05
DEFAULT_TARGETS = "all-linear"
TARGET_GROUPS = ("all-linear", "attention")
ATTENTION_NAMES = ("attn", "self_attn", "attention")
ADAPTER_DTYPE = torch.float32


@dataclass(frozen=True)
class LoraSettings:
    """Rank, alpha, dropout and targets (a group name from TARGET_GROUPS, or module names).

    `rslora` scales by alpha / sqrt(r) instead of alpha / r (rank-stabilised LoRA, PEFT's `use_rslora`).
    """

    rank: int = DEFAULT_RANK
    alpha: float = DEFAULT_ALPHA
    dropout: float = DEFAULT_DROPOUT
    targets: str | tuple[str, ...] = DEFAULT_TARGETS
    rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def check(self) -> LoraSettings:
        """Refuse values that cannot make an adapter, in one line each."""
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise UserError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise UserError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.targets, str) and self.targets not in TARGET_GROUPS:
            raise UserError(f"LoRA targets {self.targets!r}: use {' or '.join(TARGET_GROUPS)}, or a list of module "
                            f"names")
        if not isinstance(self.targets, str) and (not self.targets or not all(
                isinstance(name, str) and name for name in self.targets)):
            raise UserError(f"LoRA targets must be {' or '.join(TARGET_GROUPS)} or a non-empty list of module names, "
                            f"got {self.targets!r}")
        return self


@torch.no_grad()
def init_factors(a: torch.Tensor, b: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """The one adapter initialisation (A Kaiming uniform with a = sqrt(5), as PEFT; B zero), in place."""
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    b.zero_()


class LoraLinear(nn.Module):
    """A linear layer with a LoRA adapter: the base's `weight` / `bias` (frozen) plus float32 `lora_A`, `lora_B`."""

    def __init__(self, base: nn.Linear, settings: LoraSettings, generator: torch.Generator | None = None):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        device = base.weight.device
        rank = settings.rank
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=ADAPTER_DTYPE)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=ADAPTER_DTYPE)
        self.dropout = nn.Dropout(settings.dropout) if settings.dropout > 0 else nn.Identity()
        self.settings, self.scale = settings, settings.scale
        self.train(base.training)  # a model in eval mode gets adapters without dropout
        if device.type != "meta":
            self.reset_adapter(generator)

    @torch.no_grad()
    def reset_adapter(self, generator: torch.Generator | None = None) -> None:
        """A as PEFT initialises it (Kaiming uniform, a = sqrt(5)), B zero: the adapter starts as a no-op."""
        init_factors(self.lora_A.weight, self.lora_B.weight, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        update = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))
        return out + (update * self.scale).to(out.dtype)

    @torch.no_grad()
    def delta(self) -> torch.Tensor:
        """The adapter's weight update `scale B A` [out, in], in float32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing what this layer computes (in eval mode), on the base's parameters."""
        weight = self.weight
        weight.copy_((weight.float() + self.delta()).to(weight.dtype))
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = weight, self.bias
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.settings.rank}, "
                f"scale={self.scale:g}")


class TrainedRows(nn.Module):
    """An embedding table or output head whose rows `start:stop` train (float32 `rows`) while the rest stay frozen.

    `weight` is the table the model computes with: the frozen `table` with those rows replaced, so a tied head
    that reads `embedding.weight` gets the trained rows too."""

    def __init__(self, base: nn.Embedding | nn.Linear, rows: range):
        super().__init__()
        self.kind = "embedding" if isinstance(base, nn.Embedding) else "linear"
        self.table = base.weight
        self.bias = getattr(base, "bias", None)
        self.start, self.stop = rows.start, rows.stop
        self.rows = nn.Parameter(base.weight.detach()[rows.start:rows.stop].to(ADAPTER_DTYPE).clone())

    @property
    def weight(self) -> torch.Tensor:
        table = self.table
        return torch.cat([table[:self.start], self.rows.to(table.dtype), table[self.stop:]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "embedding":
            return F.embedding(x, self.weight)
        return F.linear(x, self.weight, self.bias)

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The plain nn.Embedding / nn.Linear with the trained rows written into the base table."""
        table = self.table
        table[self.start:self.stop] = self.rows.to(table.dtype)
        rows, width = table.shape
        plain = nn.Embedding(rows, width, device="meta") if self.kind == "embedding" else \
            nn.Linear(width, rows, bias=self.bias is not None, device="meta")
        plain.weight = table
        if self.kind == "linear":
            plain.bias = self.bias
        return plain

    def extra_repr(self) -> str:
        return f"{self.kind}, table={tuple(self.table.shape)}, trained rows {self.start}..{self.stop - 1}"


def train_rows(model: nn.Module, rows: range) -> list[str]:
    """Wrap the vocabulary modules (input embedding, untied head) so that only `rows` of them train; in place.

    Call after `attach_lora` (which freezes the base). Returns the wrapped module paths."""
    if not rows:
        return []
    modules = vocabulary_modules(model)
    for name, module in modules.items():
        _replace(model, name, TrainedRows(module, rows))
    return list(modules)


def initial_rows_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (the base's tensors by name) for a model whose vocabulary modules `train_rows` wrapped before any
    value was loaded (FSDP wraps on the meta device): each table under its `table` name, and the trained rows'
    first values as `train_rows` takes them from a loaded table (in the table's dtype, then float32)."""
    out = dict(state)
    for path, module in trained_rows(model).items():
        table = out.pop(f"{path}.weight")
        out[f"{path}.table"] = table
        out[f"{path}.rows"] = table[module.start:module.stop].to(module.table.dtype).to(ADAPTER_DTYPE).clone()
    return out


def trained_rows(model: nn.Module) -> dict[str, TrainedRows]:
    """The TrainedRows modules of `model` by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, TrainedRows)}


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The linear layers of `model` (nn.Linear or LoraLinear, not an adapter's own factors) by path, in order."""
    factors = {id(m) for m in lora_modules(model).values() for m in (m.lora_A, m.lora_B)}
    return {name: module for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, LoraLinear)) and id(module) not in factors}


def _linear_names(model: nn.Module, within: Sequence[nn.Module] | None = None) -> list[str]:
    """Paths of the linear layers of `model` (those inside `within` only, when given), in module order."""
    inside = None if within is None else {id(m) for block in within for m in block.modules()}
    return [name for name, module in linear_layers(model).items() if inside is None or id(module) in inside]


def select_targets(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Module paths of the linear layers `targets` selects (see the module docstring); never empty."""
    if isinstance(targets, str) and targets in TARGET_GROUPS:
        names = _linear_names(model, architecture(model.config).blocks(model))
        if targets == "attention":
            names = [n for n in names if any(part in ATTENTION_NAMES for part in n.split(".")[:-1])]
        if not names:
            raise UserError(f"LoRA targets {targets!r} match no linear layer of this "
                            f"{model.config.arch} model")
        return names
    wanted = [targets] if isinstance(targets, str) else list(targets)
    linears = _linear_names(model)
    chosen: set[str] = set()
    for target in wanted:
        hits = [n for n in linears if n == target or n.endswith("." + target)]
        if not hits:
            raise UserError(f"LoRA target {target!r} matches no linear layer of this {model.config.arch} model "
                            f"(its linear layers end in: {', '.join(sorted({n.rsplit('.', 1)[-1] for n in linears}))})")
        chosen.update(hits)
    return [n for n in linears if n in chosen]


def _check_rank(model: nn.Module, names: Sequence[str], rank: int) -> None:
    """A rank above a target layer's smaller side is no longer low-rank: refuse it, naming the layer."""
    for name in names:
        module = model.get_submodule(name)
        limit = min(module.in_features, module.out_features)
        if rank > limit:
            raise UserError(f"LoRA rank {rank} is larger than layer {name} allows "
                            f"({module.out_features}x{module.in_features}: at most {limit})")


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def attach_lora(model: nn.Module, settings: LoraSettings, *, base_dtype: torch.dtype | None = None,
                generator: torch.Generator | None = None) -> list[str]:
    """Freeze `model` (cast to `base_dtype` when given) and wrap the target layers in LoraLinear; in place.

    Returns the wrapped module paths. Afterwards only the adapters' parameters require gradients.
    """
    settings.check()
    if lora_modules(model):
        raise UserError("this model already has LoRA adapters; merge them first (merge_lora)")
    names = select_targets(model, settings.targets)
    _check_rank(model, names, settings.rank)
    if base_dtype is not None:
        model.to(base_dtype)
    model.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        _replace(model, name, LoraLinear(base, settings, generator))
    return names


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    """The LoRA-wrapped layers of `model` by module path, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapters' parameters by state-dict name (`<path>.lora_A.weight`, `<path>.lora_B.weight`, and the added
    tokens' `<path>.rows`)."""
    params = {f"{path}.{factor}.weight": getattr(module, factor).weight
              for path, module in lora_modules(model).items() for factor in ("lora_A", "lora_B")}
    params.update({f"{path}.rows": module.rows for path, module in trained_rows(model).items()})
    return params


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain nn.Linear layers back (and the trained rows into plain
    tables), in place; returns `model`.

    The merged weights keep the base's dtype and requires_grad (False after `attach_lora`).
    """
    for name, module in {**lora_modules(model), **trained_rows(model)}.items():
        _replace(model, name, module.merged())
    return model


def initial_adapter_state(model: nn.Module, generator: torch.Generator | None = None,
                          device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Fresh adapters of `model` as full tensors by state-dict name, drawn from `generator` in the order
    `attach_lora` draws them: a sharded (FSDP) model attaches its adapters on the meta device and loads these,
    so that it starts from the same adapters as one process does."""
    state = {}
    for path, module in lora_modules(model).items():
        a = torch.empty(module.lora_A.weight.shape, dtype=ADAPTER_DTYPE, device=device)
        b = torch.empty(module.lora_B.weight.shape, dtype=ADAPTER_DTYPE, device=device)
        init_factors(a, b, generator)
        state[f"{path}.lora_A.weight"], state[f"{path}.lora_B.weight"] = a, b
    return state
