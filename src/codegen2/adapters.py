"""The LoRA adapter directory in Hugging Face PEFT's layout: one reader and one writer.

A directory holds `adapter_config.json` (`peft_type` LORA, `r`, `lora_alpha`, `lora_dropout`,
`target_modules`, `base_model_name_or_path`, ...) and `adapter_model.safetensors` with, per adapted layer,
`base_model.model.<module path>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r] in float32. Module paths
are transformers' names for the architecture, found through its HF mapping (`Architecture.hf.state_to_hf`,
asked about one weight at a time), so `peft.PeftModel.from_pretrained(transformers_model, directory)` loads
what `write_adapter` writes, and `load_adapter` reads what PEFT's `save_pretrained` writes.

Added tokens: a LoRA run whose span corruption added CodeGen2's sentinels to the base's tokenizer trained their
embedding (and untied head) rows. PEFT's route for that is `trainable_token_indices` ({module name: token ids}):
the rows' values, not differences, as `base_model.model.<module path>.token_adapter.trainable_tokens_delta`
[tokens, width], over a base whose embedding was resized to the tokenizer saved beside the adapter
(`resize_token_embeddings(len(tokenizer))`); a tied head follows its embedding. `write_adapter` writes them and
the tokenizer files; `load_adapter` reads them into a base already grown to hold them (`loading`).

Rows: an adapter's B rows follow its layer's weight rows. For CodeGen's fused qkv that is the grouping
(`mp_num`): transformers computes with 4 groups, so an adapter-only export of a model with another grouping
would land on the wrong rows in PEFT; it is refused, and the merged export (which regroups the whole
weight) is the way out. Reading keeps the rows as they are, as importing HF weights does.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ModelConfig
from .errors import UserError
from .fsutil import atomic_directory
from .lora import LoraLinear, LoraSettings, attach_lora, linear_layers, lora_modules, train_rows, trained_rows
from .models import architecture
from .models.vocab import vocabulary_modules
from .safetensors_io import read_file, write_file

log = logging.getLogger("codegen2")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
FACTORS = ("lora_A", "lora_B")
TOKEN_KEY = "token_adapter.trainable_tokens_delta"  # PEFT's name for trained token rows under a module path
# adapter_config.json settings that change what an adapter computes and that codegen2 does not implement:
# each must be absent or false / empty / null.
UNSUPPORTED = ("use_dora", "lora_bias", "fan_in_fan_out", "rank_pattern", "alpha_pattern",
               "modules_to_save", "layer_replication", "target_parameters",
               "alora_invocation_tokens", "use_qalora")


def hf_module_names(model: nn.Module) -> dict[str, str]:
    """transformers' module path of each linear layer of `model` (wrapped or not), by codegen2 module path."""
    cfg = model.config
    mapping = architecture(cfg).hf
    names = {}
    for path, module in linear_layers(model).items():
        probe = {f"{path}.weight": torch.empty(module.weight.shape, device="meta")}
        mapped = list(mapping.state_to_hf(probe, cfg))
        if len(mapped) != 1 or not mapped[0].endswith(".weight"):
            raise UserError(f"layer {path} of this {cfg.arch} model is not one tensor in the Hugging Face layout; "
                            f"its adapter cannot be written in PEFT's layout: export the merged model instead")
        names[path] = mapped[0].removesuffix(".weight")
    return names


def check_export_layout(cfg: ModelConfig) -> None:
    """Refuse an adapter-only export when transformers lays this model's weights out differently (mp_num)."""
    mapping = architecture(cfg).hf
    hf_config = mapping.config_to_hf(cfg, 0, "float32")
    for field in mapping.layout_fields:
        ours, theirs = getattr(cfg, field), hf_config.get(field, getattr(cfg, field))
        if ours != theirs:
            raise UserError(f"adapter-only export refused: this {cfg.arch} model has {field}={ours}, but "
                            f"transformers computes with {field}={theirs}, so PEFT would apply the adapter to the "
                            f"wrong rows; export the merged model instead (codegen2 export-hf RUN OUT, without "
                            f"--adapter-only)")


def _hf_table_name(model: nn.Module, path: str, shape: torch.Size) -> str:
    """transformers' module path of the table (embedding or head) at `path`."""
    probe = {f"{path}.weight": torch.empty(shape, device="meta")}
    return next(iter(architecture(model.config).hf.state_to_hf(probe, model.config))).removesuffix(".weight")


def vocabulary_hf_names(model: nn.Module) -> dict[str, str]:
    """transformers' module path of the input embedding and the untied head of `model`, by codegen2 module path."""
    return {path: _hf_table_name(model, path, module.weight.shape)
            for path, module in vocabulary_modules(model).items()}


def _token_rows_of(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """The trained rows of `model` as PEFT's tensors and its `trainable_token_indices` ({} when it has none)."""
    rows = trained_rows(model)
    if not rows:
        return {}, {}
    hf_names = {path: _hf_table_name(model, path, module.table.shape) for path, module in rows.items()}
    tensors = {f"{KEY_PREFIX}{hf_names[path]}.{TOKEN_KEY}": module.rows.detach().to("cpu", torch.float32).contiguous()
               for path, module in rows.items()}
    indices = {hf_names[path].rsplit(".", 1)[-1]: list(range(m.start, m.stop)) for path, m in rows.items()}
    return tensors, indices


def adapter_token_rows(config: dict[str, Any]) -> range:
    """The token ids an adapter_config.json's `trainable_token_indices` trains, as one range (empty: none)."""
    indices = config.get("trainable_token_indices") or []
    lists = list(indices.values()) if isinstance(indices, dict) else [indices]
    ids = sorted({int(i) for found in lists for i in found})
    if ids and (ids != list(range(ids[0], ids[-1] + 1)) or any(sorted(map(int, x)) != ids for x in lists)):
        raise UserError("adapter_config.json: trainable_token_indices must be one run of consecutive ids, the same "
                        "for every module (codegen2 trains the added tokens' rows together)")
    return range(ids[0], ids[-1] + 1) if ids else range(0)


def _settings_of(modules: dict[str, LoraLinear]) -> LoraSettings:
    """The one rank / alpha / dropout / scaling shared by every wrapped layer (PEFT's config has one of each)."""
    found = {replace(m.settings, targets=()) for m in modules.values()}
    if len(found) != 1:
        raise UserError("the adapters of this model differ in rank, alpha, dropout or scaling; PEFT's layout holds "
                        "one of each")
    return replace(found.pop(), targets=tuple(modules))


def adapter_config(settings: LoraSettings, target_modules: list[str], base_model: str | None) -> dict[str, Any]:
    """adapter_config.json for PEFT's LoraConfig (the keys it reads; the rest keep PEFT's defaults)."""
    alpha = int(settings.alpha) if float(settings.alpha).is_integer() else settings.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": None,
        "r": settings.rank,
        "lora_alpha": alpha,
        "lora_dropout": settings.dropout,
        "target_modules": target_modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": settings.rslora,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def write_adapter(model: nn.Module, out_dir: str | Path, base_model: str | None = None, tokenizer=None) -> Path:
    """Write `model`'s adapters (not its base) as a PEFT adapter directory; `base_model` goes into the config. The
    added tokens' trained rows go with them (`trainable_token_indices`), with `tokenizer`'s files."""
    out_dir = Path(out_dir)
    modules = lora_modules(model)
    if not modules:
        raise UserError("this model has no LoRA adapters to write")
    settings = _settings_of(modules)
    check_export_layout(model.config)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} already exists and is not empty; choose a new adapter directory or remove it")
    hf_names = hf_module_names(model)
    tensors = {f"{KEY_PREFIX}{hf_names[path]}.{factor}.weight":
               getattr(module, factor).weight.detach().to("cpu", torch.float32).contiguous()
               for path, module in modules.items() for factor in FACTORS}
    config = adapter_config(settings, sorted(hf_names[path] for path in modules), base_model)
    token_tensors, token_indices = _token_rows_of(model)
    if token_indices:
        if tokenizer is None:
            raise UserError("this model trained added tokens' rows: write their tokenizer beside the adapter")
        tensors.update(token_tensors)
        config["trainable_token_indices"] = token_indices
    with atomic_directory(out_dir) as tmp:
        write_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if token_indices:
            tokenizer.save(tmp)
    log.info("wrote %d LoRA adapters (rank %d) in PEFT's layout to %s", len(modules), settings.rank, out_dir)
    return out_dir


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """adapter_config.json of a LoRA adapter directory, checked for what codegen2 computes."""
    directory = Path(directory)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (directory / name).is_file():
            raise UserError(f"{directory}: not a LoRA adapter directory (missing {name})")
    file = directory / ADAPTER_CONFIG
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{file}: cannot be read as JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise UserError(f"{file}: peft_type is {config.get('peft_type') if isinstance(config, dict) else None!r}; "
                        f"only LORA adapters are supported")
    for key in ("r", "lora_alpha"):
        if isinstance(config.get(key), bool) or not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise UserError(f"{file}: {key} must be a positive number, got {config.get(key)!r}")
    if config.get("bias", "none") != "none":
        raise UserError(f"{file}: bias={config['bias']!r} is not supported (only 'none')")
    used = [key for key in UNSUPPORTED if config.get(key)]
    if used:
        raise UserError(f"{file}: {', '.join(f'{k}={config[k]!r}' for k in used)} is not supported by codegen2's LoRA")
    return config


def read_adapter_tensors(directory: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """{transformers module path: {"lora_A": A, "lora_B": B}} from adapter_model.safetensors, and trained token
    rows as {module path: {"rows": values}}."""
    file = Path(directory) / ADAPTER_WEIGHTS
    tensors = read_file(file)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key.startswith(KEY_PREFIX) and key.endswith("." + TOKEN_KEY):
            pairs[key.removeprefix(KEY_PREFIX).removesuffix("." + TOKEN_KEY)] = {"rows": tensor}
            continue
        module, _, factor = key.removeprefix(KEY_PREFIX).removesuffix(".weight").rpartition(".")
        if not key.startswith(KEY_PREFIX) or not key.endswith(".weight") or factor not in FACTORS:
            raise UserError(f"{file}: tensor {key!r} is not a LoRA weight (base_model.model.<module>.lora_A.weight "
                            f"or .lora_B.weight)")
        pairs.setdefault(module, {})[factor] = tensor
    for module, pair in pairs.items():
        if len(pair) != 2 and "rows" not in pair:
            raise UserError(f"{file}: {module} has {next(iter(pair))} but not its other factor")
    if not pairs:
        raise UserError(f"{file}: holds no LoRA weights")
    return pairs


def _check_against_base(model: nn.Module, pairs: dict[str, dict[str, torch.Tensor]], rank: int,
                        directory: Path) -> dict[str, str]:
    """codegen2 module path of each adapted transformers module, with every shape checked against `model`."""
    ours = {hf: path for path, hf in hf_module_names(model).items()}
    paths = {}
    for hf_name, pair in pairs.items():
        if "rows" in pair:
            continue  # trained token rows: `_load_token_rows`
        if hf_name not in ours:
            raise UserError(f"adapter {directory} does not match the base: it adapts {hf_name}, which this "
                            f"{model.config.arch} model does not have")
        layer = model.get_submodule(ours[hf_name])
        expected = {"lora_A": (rank, layer.in_features), "lora_B": (layer.out_features, rank)}
        for factor, shape in expected.items():
            if tuple(pair[factor].shape) != shape:
                raise UserError(f"adapter {directory} does not match the base: {hf_name}.{factor} has shape "
                                f"{list(pair[factor].shape)}, this model needs {list(shape)} (rank {rank})")
        paths[hf_name] = ours[hf_name]
    return paths


@torch.no_grad()
def _load_token_rows(model: nn.Module, tensors: dict[str, torch.Tensor], ids: range, directory: Path) -> None:
    """Put an adapter's trained token rows (PEFT's trainable tokens) into `model`'s embedding and untied head."""
    if not tensors and not ids:
        return
    if ids.stop > model.config.vocab_size:
        raise UserError(f"adapter {directory} trains token ids up to {ids.stop - 1}, beyond this base's vocabulary "
                        f"of {model.config.vocab_size}")
    ours = {hf: path for path, hf in vocabulary_hf_names(model).items()}
    unknown = sorted(set(tensors) - set(ours))
    if unknown or not tensors:
        raise UserError(f"adapter {directory} does not match the base: trained tokens on {unknown or 'no module'} "
                        f"(this model's vocabulary modules: {', '.join(ours)})")
    if not model.config.tie_word_embeddings and set(tensors) != set(ours):
        missing = sorted(set(ours) - set(tensors))
        log.info("adapter %s trains the added tokens' rows of %s only; %s keeps the base's", directory,
                 ", ".join(tensors), ", ".join(missing))
    train_rows(model, ids)
    for hf_name, values in tensors.items():
        module = model.get_submodule(ours[hf_name])
        if tuple(values.shape) != tuple(module.rows.shape):
            raise UserError(f"adapter {directory}: {hf_name}'s trained tokens have shape {list(values.shape)}, this "
                            f"model needs {list(module.rows.shape)}")
        module.rows.copy_(values)


@torch.no_grad()
def load_adapter(model: nn.Module, directory: str | Path) -> LoraSettings:
    """Attach the adapters of a PEFT-layout directory (codegen2's or PEFT's) to `model`, in place.

    The base is frozen as `attach_lora` leaves it; `lora.merge_lora(model)` then folds the adapters in.
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    pairs = read_adapter_tensors(directory)
    rank = int(config["r"])
    paths = _check_against_base(model, pairs, rank, directory)
    rows = {name: pair["rows"] for name, pair in pairs.items() if "rows" in pair}
    settings = LoraSettings(rank=rank, alpha=float(config["lora_alpha"]),
                            dropout=float(config.get("lora_dropout") or 0.0), targets=tuple(paths.values()),
                            rslora=bool(config.get("use_rslora")))
    attach_lora(model, settings)
    for hf_name, path in paths.items():
        module = model.get_submodule(path)
        for factor in FACTORS:
            getattr(module, factor).weight.copy_(pairs[hf_name][factor])
    _load_token_rows(model, rows, adapter_token_rows(config), directory)
    log.info("loaded %d LoRA adapters (rank %d, alpha %g) from %s", len(paths), rank, settings.alpha, directory)
    return settings
