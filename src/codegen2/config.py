"""Typed configuration: model shapes, objective, data, tokenizer and training settings.

Everything a run needs lives in one `Config`, which round-trips through TOML so that a run
directory fully describes how it was made. Unknown keys are errors (naming the key and the
valid ones) because a silently ignored typo in a training config wastes a whole run.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fsutil import atomic_write_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line."""


@dataclass
class ModelConfig:
    """Shapes of a decoder (docs/design.md §3); `arch` picks the architecture (`codegen2.models.ARCHITECTURES`)."""

    arch: str = "codegen"
    vocab_size: int = 51200
    n_layer: int = 16
    n_embd: int = 2048
    n_head: int = 16
    rotary_dim: int = 64
    n_ctx: int = 2048
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    mp_num: int = 4  # CodeGen: number of [Q|V|K] groups in the fused qkv projection
    layer_norm_eps: float = 1e-5  # epsilon of every norm (LayerNorm or RMSNorm)
    init_std: float = 0.02
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); None means n_head
    rope_theta: float = 10000.0  # rotary base
    rope_scaling_factor: float = 1.0  # linear rope scaling: positions turn as if divided by this (DeepSeek-Coder: 4)
    tie_word_embeddings: bool = False  # output head shares the token embedding
    sliding_window: int | None = None  # attend to at most this many positions back, own included (StarCoder2)
    # Dropout in training only (StarCoder2's config.json keys; its published configs set 0.1): on the embeddings,
    # on each block's attention and MLP outputs before the residual add, and on the attention probabilities.
    embedding_dropout: float = 0.0
    residual_dropout: float = 0.0
    attention_dropout: float = 0.0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head if self.n_kv_head is not None else self.n_head

    def validate(self) -> None:
        """Checks that hold for every architecture; `codegen2.models.architecture` checks `arch` itself and
        what its family can build (config sits below the models, so it does not know them)."""
        for name in ("vocab_size", "n_layer", "n_embd", "n_head", "n_ctx", "mp_num"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be >= 1")
        if self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}")
        if self.kv_heads < 1 or self.n_head % self.kv_heads:
            raise ConfigError(f"model.n_kv_head={self.n_kv_head} must divide model.n_head={self.n_head}")
        if self.rotary_dim > self.head_dim or self.rotary_dim % 2:
            raise ConfigError(
                f"model.rotary_dim={self.rotary_dim} must be even and at most head_dim={self.head_dim}"
            )
        if not self.rope_theta > 0 or not self.rope_scaling_factor > 0:
            raise ConfigError(f"model.rope_theta={self.rope_theta} and model.rope_scaling_factor="
                              f"{self.rope_scaling_factor} must be positive")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"model.sliding_window={self.sliding_window} must be >= 1 (or unset: no window)")
        for name in ("embedding_dropout", "residual_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be in [0, 1)")


@dataclass
class ObjectiveConfig:
    """The per-sequence objective mixture (docs/design.md §1).

    Rates are probabilities per training sequence; whatever is left after span and FIM is causal LM.
    Span-sampling bounds are not published by the paper: these defaults are ours.
    """

    span_rate: float = 0.5  # CodeGen2 final recipe: 50% span corruption, 50% causal LM
    fim_rate: float = 0.0  # FIM (Bavarian et al.) as an alternative infill objective
    fim_spm_rate: float = 0.5  # of FIM sequences, the fraction in SPM (suffix-prefix-middle) form
    prefix_lm: bool = False  # bidirectional attention over the prefix, no loss on it
    corruption_ratio_min: float = 0.05  # fraction of a document's tokens masked, drawn uniformly
    corruption_ratio_max: float = 0.25
    span_len_min: int = 1  # span lengths drawn uniformly in [min, max] tokens
    span_len_max: int = 64
    max_spans: int = 16  # per document piece; also bounded by the tokenizer's mask sentinels
    min_doc_tokens: int = 8  # shorter document pieces are left uncorrupted
    # A tokenizer without CodeGen2's sentinels (--init-from a Qwen2.5-Coder, StarCoder2, ... directory) trains its
    # span share as FIM in the model's own format; true adds <sep>, <eom> and tokenizer.num_masks <mask_k> to it and
    # grows the embedding (and untied head) instead, so that span_rate trains span corruption.
    add_sentinels: bool = False

    def validate(self) -> None:
        for name in ("span_rate", "fim_rate", "fim_spm_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"objective.{name}={value} must lie in [0, 1]")
        if self.span_rate + self.fim_rate > 1.0 + 1e-9:
            raise ConfigError(
                f"objective.span_rate + objective.fim_rate = {self.span_rate + self.fim_rate} exceeds 1"
            )
        if not 0.0 < self.corruption_ratio_min <= self.corruption_ratio_max < 1.0:
            raise ConfigError("objective.corruption_ratio_min/max must satisfy 0 < min <= max < 1")
        if not 1 <= self.span_len_min <= self.span_len_max:
            raise ConfigError("objective.span_len_min/max must satisfy 1 <= min <= max")
        if self.max_spans < 1:
            raise ConfigError("objective.max_spans must be at least 1")


SOURCE_KINDS = ("code", "nl")  # code, or natural language (prose)
SOURCE_FORMATS = ("dir", "jsonl", "parquet", "hf")  # readers: codegen2.data.formats.READERS


@dataclass
class SourceConfig:
    """One data source of the mixture."""

    path: str = ""
    kind: str = "code"  # "code" or "nl" (natural language)
    weight: float = 1.0
    format: str = "auto"  # auto | dir | jsonl | parquet | hf
    field: str = "text"  # text field for jsonl / parquet / hf datasets
    include: list[str] = dataclasses.field(default_factory=lambda: ["**/*"])  # globs for directories
    exclude: list[str] = dataclasses.field(default_factory=list)
    skip_bad_lines: bool = False  # malformed JSONL lines: error (default) or skip and count
    name: str = ""
    git: bool = True  # a directory in a git work tree: read only the files git tracks (false: every file)
    secrets: bool = True  # prepare's secrets stage on this source (data.secrets = false turns it off everywhere)

    def validate(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ConfigError(f"data source {self.path!r}: kind={self.kind!r} must be one of {', '.join(SOURCE_KINDS)}")
        if self.format not in ("auto", *SOURCE_FORMATS):
            raise ConfigError(
                f"data source {self.path!r}: format={self.format!r} must be auto, {', '.join(SOURCE_FORMATS)}"
            )
        if not self.weight > 0:
            raise ConfigError(f"data source {self.path!r}: weight={self.weight} must be positive")


@dataclass
class DataConfig:
    """Where training text comes from. With no sources, the embedded default corpus is used."""

    sources: list[SourceConfig] = field(default_factory=list)
    embedded_code_weight: float = 0.8  # default corpus: Python standard library
    embedded_nl_weight: float = 0.2  # default corpus: prose shipped with Python
    embedded_max_files: int = 0  # 0 = all standard-library files
    heldout_fraction: float = 0.02  # files held out by a hash of their path, never trained on
    max_doc_chars: int = 1_000_000  # longer documents are truncated (and counted) where raw files are read
    prepared: str = ""  # a directory written by `codegen2 data prepare`: train on its token shards (else the run
    #                     prepares its sources into RUN/prepared)
    secrets: bool = True  # prepare's secrets stage (keys, passwords, e-mail and IP addresses), for every source

    def validate(self) -> None:
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ConfigError(f"data.heldout_fraction={self.heldout_fraction} must lie in [0, 1)")
        if self.embedded_code_weight < 0 or self.embedded_nl_weight < 0 or \
                self.embedded_code_weight + self.embedded_nl_weight <= 0:
            raise ConfigError("data.embedded_code_weight and data.embedded_nl_weight must be >= 0 with a positive sum")
        for source in self.sources:
            source.validate()


@dataclass
class PrepareConfig:
    """`codegen2 data prepare`: filters, deduplication and decontamination (sources: docs/data.md)."""

    max_file_bytes: int = 1_000_000  # The Stack, Codex: files over 1 MB dropped (0 = no limit)
    max_line_length: int = 1000  # Codex, StarCoder: longest line over 1,000 characters dropped
    max_mean_line_length: float = 100.0  # Codex, StarCoder: mean line length over 100 dropped
    min_alphanum_fraction: float = 0.25  # Codex, StarCoder: under 25% alphanumeric characters dropped
    drop_autogenerated: bool = True  # StarCoder: "auto-generated", "do not edit", ... in the first 5 lines
    exact_dedup: bool = True  # content hash (CodeGen: SHA-256 exact dedup)
    near_dedup: bool = True  # MinHash LSH, BigCode's settings below
    minhash_ngram: int = 5
    minhash_perms: int = 256
    minhash_bands: int = 25
    minhash_rows: int = 10
    minhash_threshold: float = 0.7
    minhash_min_tokens: int = 10  # documents with fewer code tokens are left out of near dedup
    decontaminate: list[str] = field(default_factory=lambda: ["humaneval", "humaneval-infilling"])
    decontaminate_min_chars: int = 40  # shorter benchmark texts are not searched on their own
    shard_tokens: int = 1 << 26  # tokens per shard file (128 MiB of uint16)

    def validate(self) -> None:
        if self.minhash_bands * self.minhash_rows > self.minhash_perms:
            product = self.minhash_bands * self.minhash_rows
            raise ConfigError(f"prepare.minhash_bands x prepare.minhash_rows = {product} "
                              f"exceeds prepare.minhash_perms={self.minhash_perms}")
        if not 0.0 < self.minhash_threshold <= 1.0:
            raise ConfigError(f"prepare.minhash_threshold={self.minhash_threshold} must lie in (0, 1]")
        if self.minhash_ngram < 1 or self.shard_tokens < 1:
            raise ConfigError("prepare.minhash_ngram and prepare.shard_tokens must be positive")


@dataclass
class TokenizerConfig:
    vocab_size: int = 51200
    num_masks: int = 64  # <mask_1> .. <mask_N> sentinels
    path: str = ""  # reuse an existing tokenizer.json instead of training one
    train_chars: int = 20_000_000  # text used to train the BPE


@dataclass
class LoraTrainConfig:
    """`[train.lora]`: LoRA adapters instead of full fine-tuning when `rank` > 0 (`codegen2 train --lora RANK`).

    The TOML side only; train turns it into `lora.LoraSettings`, which checks it against the model. The
    defaults are LoraSettings' (alpha = 2 * rank as torchtune and litgpt, every linear layer of the blocks).
    """

    rank: int = 0  # 0 = full fine-tuning
    alpha: float = 32.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["all-linear"])  # all-linear, attention, or module names

    def validate(self) -> None:
        if self.rank < 0:
            raise ConfigError(f"train.lora.rank={self.rank} must be >= 0 (0 = no LoRA)")
        if self.rank and (not self.alpha > 0 or not 0.0 <= self.dropout < 1.0 or not self.targets):
            raise ConfigError(f"train.lora: alpha must be positive ({self.alpha}), dropout in [0, 1) "
                              f"({self.dropout}) and targets not empty ({self.targets})")


@dataclass
class TrainConfig:
    seq_len: int = 2048
    micro_batch_size: int = 8
    grad_accum: int = 1
    global_batch_tokens: int = 0  # if set, micro-batches and accumulation are derived from it
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    max_steps: int = 1000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 1234
    precision: str = "auto"  # auto | fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda
    parallel: str = "none"  # none | ddp | fsdp
    checkpoint_every: int = 200
    keep_last: int = 3
    log_every: int = 10
    eval_every: int = 0  # held-out code and prose loss every N steps (0 = never); logged as eval_*_loss
    eval_tokens: int = 16384  # held-out tokens of each kind scored per evaluation
    document_mask: bool = False  # forbid attention across documents of a packed sequence
    activation_checkpointing: bool = False
    compile: bool = False
    num_threads: int = 0  # 0 = torch default
    init_from: str = ""  # start from these weights (run dir or HF directory)
    lora: LoraTrainConfig = field(default_factory=LoraTrainConfig)

    def validate(self) -> None:
        self.lora.validate()
        at_least = {"seq_len": 1, "micro_batch_size": 1, "grad_accum": 1, "global_batch_tokens": 0,
                    "warmup_steps": 0, "max_steps": 0, "checkpoint_every": 1, "keep_last": 0, "log_every": 1,
                    "eval_every": 0, "eval_tokens": 1, "num_threads": 0}
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= {low}")
        if not self.lr > 0:
            raise ConfigError(f"train.lr={self.lr} must be positive")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"train.{name}={getattr(self, name)} must lie in [0, 1)")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.eps <= 0:
            raise ConfigError("train.weight_decay and train.grad_clip must be >= 0 and train.eps > 0")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"train.precision={self.precision!r} must be auto, fp32 or bf16")
        if self.parallel not in ("none", "ddp", "fsdp"):
            raise ConfigError(f"train.parallel={self.parallel!r} must be none, ddp or fsdp")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    preset: str = ""

    def validate(self) -> Config:
        self.model.validate()
        self.objective.validate()
        self.data.validate()
        self.train.validate()
        self.prepare.validate()
        if self.train.seq_len > self.model.n_ctx:
            raise ConfigError(f"train.seq_len={self.train.seq_len} exceeds model.n_ctx={self.model.n_ctx}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Presets. The large ones are the published CodeGen2 shapes (docs/design.md §3); `tiny` trains on a laptop.

# The tiny recipe (codegen and llama): 500 steps of 2,048 tokens, about 4.5 minutes at the 3,800 tokens/s of 2 idle
# CPU cores, so that `make run` stays within 10 minutes; its held-out code loss went from 4.86 (150 steps) to the
# figure in the README.
_TINY_TRAIN = dict(seq_len=256, micro_batch_size=8, lr=2e-3, warmup_steps=30, max_steps=500, weight_decay=0.1,
                   checkpoint_every=125, log_every=50)

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "model": dict(vocab_size=4096, n_layer=4, n_embd=256, n_head=4, rotary_dim=32, n_ctx=512, mp_num=4),
        "tokenizer": dict(vocab_size=4096, num_masks=32, train_chars=4_000_000),
        "objective": dict(max_spans=8, span_len_max=32),
        "train": _TINY_TRAIN,
        "data": dict(embedded_max_files=0),
    },
    # LLaMA-style (RMSNorm, SwiGLU, half-split rotary, grouped-query attention) at tiny's size and recipe.
    "llama-tiny": {
        "model": dict(arch="llama", vocab_size=4096, n_layer=4, n_embd=256, n_head=4, n_kv_head=2, n_inner=768,
                      rotary_dim=64, n_ctx=512, layer_norm_eps=1e-6),
        "tokenizer": dict(vocab_size=4096, num_masks=32, train_chars=4_000_000),
        "objective": dict(max_spans=8, span_len_max=32),
        "train": _TINY_TRAIN,
        "data": dict(embedded_max_files=0),
    },
    "1b": {"model": dict(n_layer=16, n_embd=2048, n_head=16, rotary_dim=64, mp_num=8)},
    "3_7b": {"model": dict(n_layer=16, n_embd=4096, n_head=16, rotary_dim=64, mp_num=8)},
    "7b": {"model": dict(n_layer=32, n_embd=4096, n_head=16, rotary_dim=64, mp_num=4)},
    "16b": {"model": dict(n_layer=34, n_embd=6144, n_head=24, rotary_dim=64, mp_num=4)},
    # CodeGen2.5-7B (Salesforce's LlamaForCausalLM, DESIGN §6): MHA, untied head, 2048 positions.
    "codegen25-7b": {"model": dict(arch="llama", vocab_size=51200, n_layer=32, n_embd=4096, n_head=32,
                                   n_inner=11008, rotary_dim=128, n_ctx=2048, layer_norm_eps=1e-6)},
    # Today's open code models (DESIGN §7), for `--init-from` their weights or a fresh run of their shape; the
    # parameter counts equal transformers' (tests/test_families.py).
    "qwen25-coder-0.5b": {"model": dict(arch="qwen2", vocab_size=151936, n_layer=24, n_embd=896, n_head=14,
                                        n_kv_head=2, n_inner=4864, rotary_dim=64, n_ctx=32768, layer_norm_eps=1e-6,
                                        rope_theta=1e6, tie_word_embeddings=True)},
    "qwen25-coder-1.5b": {"model": dict(arch="qwen2", vocab_size=151936, n_layer=28, n_embd=1536, n_head=12,
                                        n_kv_head=2, n_inner=8960, rotary_dim=128, n_ctx=32768, layer_norm_eps=1e-6,
                                        rope_theta=1e6, tie_word_embeddings=True)},
    "qwen25-coder-7b": {"model": dict(arch="qwen2", vocab_size=152064, n_layer=28, n_embd=3584, n_head=28,
                                      n_kv_head=4, n_inner=18944, rotary_dim=128, n_ctx=32768, layer_norm_eps=1e-6,
                                      rope_theta=1e6)},
    "starcoder2-3b": {"model": dict(arch="starcoder2", vocab_size=49152, n_layer=30, n_embd=3072, n_head=24,
                                    n_kv_head=2, n_inner=12288, rotary_dim=128, n_ctx=16384, layer_norm_eps=1e-5,
                                    rope_theta=999999.4420358813, init_std=0.018042, tie_word_embeddings=True,
                                    sliding_window=4096)},
    "starcoder2-7b": {"model": dict(arch="starcoder2", vocab_size=49152, n_layer=32, n_embd=4608, n_head=36,
                                    n_kv_head=4, n_inner=18432, rotary_dim=128, n_ctx=16384, layer_norm_eps=1e-5,
                                    rope_theta=1e6, tie_word_embeddings=True, sliding_window=4096)},
    "deepseek-coder-1.3b": {"model": dict(arch="llama", vocab_size=32256, n_layer=24, n_embd=2048, n_head=16,
                                          n_inner=5504, rotary_dim=128, n_ctx=16384, layer_norm_eps=1e-6,
                                          rope_theta=1e5, rope_scaling_factor=4.0)},
    "codellama-7b": {"model": dict(arch="llama", vocab_size=32016, n_layer=32, n_embd=4096, n_head=32,
                                   n_inner=11008, rotary_dim=128, n_ctx=16384, layer_norm_eps=1e-5, rope_theta=1e6)},
}


# The fine-tuning recipe of `codegen2 train --init-from DIR` without --preset or --config (the shapes come from
# DIR): 200 steps of 8 x 512 tokens. LoRA's learning rate is the usual 2e-4 (QLoRA, PEFT's examples); full
# fine-tuning takes a tenth of it. No weight decay: the steps are few and start from trained weights. A tenth of
# the files is held out: a repository has tens of files, not thousands, and its held-out loss is the measure.
FINETUNE_TRAIN = dict(seq_len=512, micro_batch_size=4, grad_accum=2, lr=2e-4, warmup_steps=20, max_steps=200,
                      weight_decay=0.0, checkpoint_every=50, log_every=10, keep_last=2)
FINETUNE_FULL_LR = 2e-5


def finetune_values(model: ModelConfig, lora: bool) -> dict[str, Any]:
    """Config values for fine-tuning `model` (shapes of an --init-from directory) with the recipe above."""
    train = dict(FINETUNE_TRAIN, seq_len=min(FINETUNE_TRAIN["seq_len"], model.n_ctx))
    if not lora:
        train["lr"] = FINETUNE_FULL_LR
    return {"model": dataclasses.asdict(model), "train": train,
            "tokenizer": {"vocab_size": model.vocab_size}, "data": {"heldout_fraction": 0.1}}


_SECTION_CLASSES: dict[str, type] = {"model": ModelConfig, "objective": ObjectiveConfig, "data": DataConfig,
                                     "tokenizer": TokenizerConfig, "train": TrainConfig, "prepare": PrepareConfig}
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    return {int: "an integer", float: "a number", bool: "a boolean (true/false)", str: "a string",
            type(None): "unset"}.get(hint, getattr(hint, "__name__", str(hint)))


def _field_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_value(value: Any, hint: Any, key: str, origin: str = "") -> Any:
    """`value` as the type `hint` of the field `key`, or a ConfigError naming origin, key, value and type.

    The one type rule for every config value (preset, TOML file, `--set`, a run's config.toml): a TOML
    value must already have the field's type (ints widen to floats), so `max_steps = "10"` is an error
    rather than a string that fails deep inside training.
    """
    def bad() -> ConfigError:
        prefix = f"{origin}: " if origin else ""
        return ConfigError(f"{prefix}{key} = {value!r} is not {_type_name(hint)}")

    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return check_value(value, inner, key, origin)
    if typing.get_origin(hint) is list:
        if not isinstance(value, list):
            raise bad()
        (inner,) = typing.get_args(hint)
        return [check_value(v, inner, f"{key}[{i}]", origin) for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad()
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad()
        return value
    raise TypeError(f"config field {key} has an unsupported type {hint!r}")  # a bug in this module, not input


def parse_text(text: str, hint: Any, key: str, origin: str = "--set") -> Any:
    """Parse command-line text as the type of field `key`: `--set` values arrive as text, so the field
    decides how to read them (booleans: true/false/1/0/yes/no in any case; ints: digits only)."""
    stripped = text.strip()
    try:
        toml_value = tomllib.loads(f"v = {stripped}")["v"]
    except tomllib.TOMLDecodeError:
        toml_value = None
    bad = ConfigError(f"{origin} {key}={text!r}: not {_type_name(hint)}")
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        if stripped.lower() in ("none", ""):
            return None
        return parse_text(text, inner, key, origin)
    if hint is bool:
        if stripped.lower() in _TRUE:
            return True
        if stripped.lower() in _FALSE:
            return False
        raise bad
    if hint is str:
        return toml_value if isinstance(toml_value, str) else stripped
    if hint in (int, float) or typing.get_origin(hint) is list:
        if toml_value is None:
            raise bad
        try:
            return check_value(toml_value, hint, key)
        except ConfigError:
            raise bad from None
    return check_value(toml_value, hint, key, origin)


# Keys that existed once: (section, key) -> why they are gone and what to use. A config.toml written by an older
# version holds them with their default value, which is accepted (and dropped) so that old runs still load.
REMOVED_KEYS: dict[tuple[str, str], tuple[Any, str]] = {
    ("data", "cache_dir"): ("", "data.cache_dir was removed: a run prepares its sources into RUN/prepared; to share "
                                "prepared data between runs, run `codegen2 data prepare --out DIR` once and set "
                                "data.prepared = DIR"),
}


def _removed_key(section: str, key: str, value: Any, prefix: str = "") -> bool:
    """True for a removed key holding its old default (to drop); a ConfigError for one set to anything else."""
    if (section, key) not in REMOVED_KEYS:
        return False
    default, message = REMOVED_KEYS[(section, key)]
    if value != default:
        raise ConfigError(f"{prefix}{message}")
    return True


def _build_dataclass(cls: type, values: dict[str, Any], where: str, origin: str = "") -> Any:
    """Build `cls` from a dict, rejecting unknown keys (with the list of valid ones) and values of the wrong type."""
    hints = _field_hints(cls)
    section = where.rstrip(".")
    values = {k: v for k, v in values.items()
              if not _removed_key(section, k, v, f"{origin}: " if origin else "")}
    for key in values:
        if key not in hints:
            prefix = f"{origin}: " if origin else ""
            raise ConfigError(f"{prefix}unknown config key '{where}{key}'; valid keys: {', '.join(sorted(hints))}")
    kwargs = {}
    for key, value in values.items():
        if cls is DataConfig and key == "sources":
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise ConfigError(f"'{where}sources' must be a list of tables ([[data.sources]])")
            value = [_build_dataclass(SourceConfig, dict(v), f"{where}sources[{i}].", origin)
                     for i, v in enumerate(value)]
        elif cls is TrainConfig and key == "lora":
            if not isinstance(value, dict):
                raise ConfigError(f"'{where}lora' must be a table ([train.lora])")
            value = _build_dataclass(LoraTrainConfig, dict(value), f"{where}lora.", origin)
        else:
            value = check_value(value, hints[key], f"{where}{key}", origin)
        kwargs[key] = value
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`update` over `base` as a new nested dict: neither input is changed, and no table of the result is
    shared with them (otherwise a later `--set` would write into PRESETS for the rest of the process)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def config_from_dict(values: dict[str, Any], origin: str = "") -> Config:
    """A Config from nested dicts; every key and value is checked (`origin` names the file in errors)."""
    prefix = f"{origin}: " if origin else ""
    for key in values:
        if key != "preset" and key not in _SECTION_CLASSES:
            raise ConfigError(f"{prefix}unknown config section '{key}'; valid sections: "
                              f"{', '.join(sorted([*_SECTION_CLASSES, 'preset']))}")
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        if name in _SECTION_CLASSES:
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}config section '{name}' must be a table")
            kwargs[name] = _build_dataclass(_SECTION_CLASSES[name], value, f"{name}.", origin)
        else:
            kwargs[name] = check_value(value, str, name, origin)
    return Config(**kwargs)


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`--set section.key=value` items over `values`; each value is parsed as its field's type here."""
    out = _merge({}, values)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if parts[:2] == ["train", "lora"] and len(parts) == 3:
            out = _merge(out, {"train": {"lora": {parts[2]: _lora_text(parts[2], raw)}}})
            continue
        if len(parts) != 2:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        section, key = parts
        if section not in _SECTION_CLASSES:
            raise ConfigError(f"--set {dotted}: unknown config section '{section}'; valid sections: "
                              f"{', '.join(sorted(_SECTION_CLASSES))}")
        hints = _field_hints(_SECTION_CLASSES[section])
        if (section, key) in REMOVED_KEYS:
            raise ConfigError(f"--set {dotted}: {REMOVED_KEYS[(section, key)][1]}")
        if key not in hints:
            raise ConfigError(f"unknown config key '{section}.{key}'; valid keys: {', '.join(sorted(hints))}")
        if section == "data" and key == "sources":
            raise ConfigError("--set data.sources is not supported; use --data PATH or [[data.sources]] in a file")
        out.setdefault(section, {})
        out[section][key] = parse_text(raw, hints[key], dotted.strip())
    return out


def _lora_text(key: str, raw: str) -> Any:
    """A `--set train.lora.KEY=VALUE` value as its field's type (targets: a list, or one name)."""
    hints = _field_hints(LoraTrainConfig)
    if key not in hints:
        raise ConfigError(f"unknown config key 'train.lora.{key}'; valid keys: {', '.join(sorted(hints))}")
    if key == "targets" and not raw.strip().startswith("["):
        return [name.strip() for name in raw.split(",") if name.strip()]
    return parse_text(raw, hints[key], f"train.lora.{key}")


def preset_dict(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return _merge({"preset": name}, PRESETS[name])


def load_config(
    path: str | Path | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
    defaults: dict[str, Any] | None = None,
) -> Config:
    """Preset (or `defaults`), then TOML file, then `--set` overrides, each layer over the previous one."""
    values: dict[str, Any] = {}
    file_values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            file_values = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
        config_from_dict(file_values, origin=str(path))  # types and keys checked here, naming the file
    preset = preset or file_values.get("preset") or ""
    if preset:
        values = preset_dict(preset)
    elif defaults:
        values = _merge({}, defaults)
    values = _merge(values, file_values)
    values = apply_overrides(values, overrides or [])
    return config_from_dict(values).validate()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dump_toml(config: Config) -> str:
    """Write a Config as TOML (enough of TOML for our flat sections and source tables)."""
    data = config.to_dict()
    lines = []
    if data.get("preset"):
        lines.append(f"preset = {_toml_value(data['preset'])}\n")
    for section in ("model", "objective", "tokenizer", "train", "prepare", "data"):
        table = data[section]
        lines.append(f"[{section}]")
        sources = table.pop("sources", None) if section == "data" else None
        subtables = {"lora": table.pop("lora")} if section == "train" else {}
        for key, value in table.items():
            if value is None:
                continue
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
        for name, sub in subtables.items():
            lines.append(f"[{section}.{name}]")
            lines.extend(f"{key} = {_toml_value(value)}" for key, value in sub.items())
            lines.append("")
        for source in sources or []:
            lines.append("[[data.sources]]")
            for key, value in source.items():
                lines.append(f"{key} = {_toml_value(value)}")
            lines.append("")
    return "\n".join(lines)


def save_config(config: Config, path: str | Path) -> None:
    """Write atomically (temporary file, fsync, rename): a kill mid-write never leaves half a config."""
    atomic_write_text(Path(path), dump_toml(config))
