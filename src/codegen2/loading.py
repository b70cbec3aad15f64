"""The one public loader: `load_checkpoint` reads a codegen2 run directory, a Hugging Face directory or an
int8 directory written by `codegen2 quantize`, in any weight format (`codegen2.from_pretrained` is its front).
`quantize_checkpoint` (`codegen2 quantize`) loads a checkpoint as int8 and writes the int8 directory.

LoRA: a LoRA run's checkpoints hold only adapters, and its meta.json (`lora`) names the base and its
fingerprint; `--adapter DIR` (a LoRA run or a PEFT adapter directory) puts adapters over any base. Either
way the base is loaded, the adapters are merged into its weights, and only then is the model cast or
quantized to int8, so inference has one code path.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .adapters import adapter_token_rows, load_adapter, read_adapter_config, write_adapter
from .checkpoint import WEIGHTS, checkpoint_step, list_checkpoints, read_meta, select_checkpoint
from .config import Config, ModelConfig, load_config
from .errors import UserError
from .hf import describe_layout, export_hf, load_hf_tokenizer, write_hf_directory
from .hf.config import CONFIG_FILE, model_config_from_raw, read_hf_config
from .hf.weights import expected_tensors, load_into, read_checked_tensors
from .int8 import check_int8_kernel, compute_dtype, is_int8_format, parse_dtype, quantize_streamed
from .lora import LoraSettings, adapter_parameters, attach_lora, merge_lora, train_rows, trained_rows
from .models import architecture, empty_model
from .models.vocab import grow_model
from .quantize import MANIFEST, load_quantized_into, read_manifest, write_int8_directory
from .safetensors_io import read_checked, read_file
from .tokenizer import CodeGenTokenizer

log = logging.getLogger("codegen2")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object  # CodeGenTokenizer (None when loaded with load_tokenizer=False)
    config: ModelConfig
    prefix_lm: bool = False  # trained as a prefix-LM: prompts are read bidirectionally
    source: str = ""


def is_run_directory(path: Path) -> bool:
    return (path / "config.toml").is_file()


def load_run_config(run_dir: str | Path) -> Config:
    return load_config(Path(run_dir) / "config.toml")


def model_config_of(path: str | Path) -> ModelConfig:
    """The model shapes of a run directory or a Hugging Face directory, without loading its weights."""
    path = Path(path)
    if is_run_directory(path):
        checkpoint = select_checkpoint(path)
        lora = read_meta(checkpoint).get("lora")
        if not lora:
            return load_run_config(path).model
        base = model_config_of(lora["base"]["path"])  # a grown vocabulary (added sentinels) is the run's
        return replace(base, vocab_size=load_run_config(path).model.vocab_size) if lora.get("rows") else base
    if (path / CONFIG_FILE).is_file():
        return model_config_from_raw(read_hf_config(path), path, None)
    raise UserError(f"{path}: no config.toml (a codegen2 run directory) and no {CONFIG_FILE} (a Hugging Face "
                    f"directory); --init-from needs one")


def load_checkpoint(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    mp_num: int | None = None,
    step: int | None = None,
    inference: bool = True,
    load_tokenizer: bool = True,
    decode_layout: bool = True,
    adapter: str | Path | None = None,
) -> LoadedModel:
    """Load weights + tokenizer from a run directory (latest or given step), a Hugging Face directory or an
    int8 directory.

    `dtype`: None keeps the stored dtype; "float32", "bfloat16", "int8" (weight-only, quantized while the
    weights stream in: `codegen2.int8`) or "int8-dynamic" (the same weights, int8 activations too), or a
    torch dtype. A directory written by `codegen2 quantize` loads as int8 (or int8-dynamic when asked).
    `mp_num` overrides a HF CodeGen directory's qkv grouping; `load_tokenizer=False` skips a HF directory's
    tokenizer.
    With `inference` (the default: sampling, infilling, evaluation, serving) and `decode_layout`, a model on
    the CPU gets the decode weight layout (the model's `use_decode_layout`): same values and state dict,
    faster one-token matmuls. Callers that go on to train the loaded modules themselves pass
    `inference=False`; copying the state dict into another model (as `train.init_from` does) is unaffected.
    `adapter`: a LoRA run or PEFT adapter directory merged into these weights before any cast or int8.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    if not inference and (is_int8_format(dtype) or read_manifest(path) is not None):
        raise UserError(f"{path}: int8 weights are for inference only and cannot be trained; start from the "
                        f"float32 or bfloat16 checkpoint they were quantized from")
    if adapter is not None:
        loaded = _load_with_adapter(path, Path(adapter), device, dtype, mp_num, step, load_tokenizer)
    elif is_run_directory(path):
        loaded = _load_run(path, device, dtype, step)
    elif (path / CONFIG_FILE).is_file():
        loaded = _load_hf(path, device, dtype, mp_num, load_tokenizer)
    else:
        raise UserError(f"{path}: no config.toml (a codegen2 run directory) and no {CONFIG_FILE} (a Hugging Face "
                        f"directory); point at the directory that holds one")
    if inference and decode_layout and next(loaded.model.parameters()).device.type == "cpu":
        loaded.model.use_decode_layout()
    return loaded


def _load_run(run_dir: Path, device, dtype, step: int | None) -> LoadedModel:
    """A run directory's checkpoint; a damaged weights file names the other steps to load instead."""
    config = load_run_config(run_dir)
    ckpt = select_checkpoint(run_dir, step)
    if "lora" in read_meta(ckpt):
        loaded = load_lora_run(run_dir, ckpt, device)
        merge_lora(loaded.model)
        return _cast_or_quantize(loaded, device, dtype)
    tokenizer = CodeGenTokenizer.load(run_dir)
    model = empty_model(config.model)
    if is_int8_format(dtype):  # a missing int8 kernel is this machine's problem, not the checkpoint's (no hint below)
        check_int8_kernel(device, dynamic=dtype == "int8-dynamic")
    expected = expected_tensors(model)
    try:
        if is_int8_format(dtype):
            quantize_streamed(model, read_checked(ckpt / WEIGHTS, expected, device, source="config.toml"), device,
                              fmt=dtype)
        else:
            tensors = read_checked(ckpt / WEIGHTS, expected, device, dtype=compute_dtype(dtype), source="config.toml")
            model.load_state_dict(dict(tensors), strict=True, assign=True)
    except UserError as exc:
        others = [checkpoint_step(c) for c in list_checkpoints(run_dir) if c != ckpt]
        if not others:
            raise
        raise UserError(f"{exc}; load another checkpoint with --step {others[-1]} (this run has: "
                        f"{', '.join(map(str, others))})") from None
    model.eval()
    log.info("loaded %s (%s parameters)", ckpt, f"{model.num_parameters():,}")
    return LoadedModel(model=model, tokenizer=tokenizer, config=config.model,
                       prefix_lm=config.objective.prefix_lm, source=str(ckpt))


def _load_hf(path: Path, device, dtype, mp_num: int | None, load_tokenizer: bool) -> LoadedModel:
    """A HF directory (config.json; CodeGen keeps the checkpoint's qkv grouping) or an int8 directory.

    The model is built on the meta device and each tensor is memory-mapped or read once, so the weights
    are never held twice."""
    cfg = model_config_from_raw(read_hf_config(path), path, mp_num)
    tokenizer = load_hf_tokenizer(path, cfg.vocab_size) if load_tokenizer else None
    model = empty_model(cfg)
    manifest = read_manifest(path)
    if manifest is not None:  # written by `codegen2 quantize`
        if dtype is not None and not is_int8_format(dtype):
            raise UserError(f"{path} holds int8 weights ({MANIFEST}); it loads only as int8 or int8-dynamic, "
                            f"not {dtype}")
        load_quantized_into(model, path, manifest, device, fmt=dtype)
    elif is_int8_format(dtype):
        quantize_streamed(model, read_checked_tensors(path, expected_tensors(model), device), device, fmt=dtype)
    else:
        load_into(model, path, device=device, dtype=compute_dtype(dtype))
    model.eval()
    log.info("loaded %s: %s parameters, %s, %s", path, f"{model.num_parameters():,}",
             str(next(model.parameters()).dtype).removeprefix("torch."), describe_layout(cfg))
    prefix_lm = bool((manifest or {}).get("prefix_lm", False))  # kept by `codegen2 quantize`
    return LoadedModel(model=model, tokenizer=tokenizer, config=cfg, prefix_lm=prefix_lm, source=str(path))


def write_quantized_checkpoint(source: str | Path, out_dir: str | Path, mp_num: int | None = None,
                        fmt: str = "int8") -> Path:
    """`codegen2 quantize`: load a float checkpoint as int8 (streamed) and write a directory that loads as int8.

    The directory (`quantize.write_int8_directory`) holds config.json and the tokenizer plus the int8 weights
    and their manifest; `load_checkpoint` / `codegen2.from_pretrained` load it without ever holding the float
    weights.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} already exists and is not empty; choose a new output directory")
    loaded = load_checkpoint(source, dtype=fmt, mp_num=mp_num)
    cfg = loaded.config
    hf = architecture(cfg).hf
    hf_config = hf.config_to_hf(cfg, loaded.tokenizer.eot_id, "float32")
    for field in hf.layout_fields:  # the tensors keep the source's layout (CodeGen: qkv groups)
        if field in hf_config:
            hf_config[field] = getattr(cfg, field)
    extra = {"source": str(Path(source).resolve()), "prefix_lm": bool(loaded.prefix_lm)}
    return write_int8_directory(loaded.model, out_dir, hf_config, loaded.tokenizer, extra=extra)


# ------------------------------------------------------------------------------------------ LoRA
FINGERPRINT_SPAN = 1 << 20  # bytes hashed at each end of a file
BASE_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt", ".toml")  # what a base directory loads from


def _file_digest(path: Path) -> str:
    """sha256 of a file's size, first and last MiB: changes when the file does, and costs 2 MiB for any size."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(FINGERPRINT_SPAN))
        if size > FINGERPRINT_SPAN:
            handle.seek(max(FINGERPRINT_SPAN, size - FINGERPRINT_SPAN))
            digest.update(handle.read())
    return digest.hexdigest()


def base_fingerprint(path: str | Path, step: int | None = None) -> dict:
    """What identifies a LoRA run's base: its resolved path, the run step it was taken at (run directories), and
    the name, size and cheap digest of each file its weights, config and tokenizer are read from."""
    path = Path(path).resolve()
    if is_run_directory(path):
        checkpoint = select_checkpoint(path, step)
        step = checkpoint_step(checkpoint)
        files = [path / "config.toml", path / "tokenizer.json", checkpoint / WEIGHTS]
    else:
        files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix in BASE_SUFFIXES
                       and not f.name.startswith("adapter_"))
    return {"path": str(path), "step": step,
            "files": {str(f.relative_to(path)): [f.stat().st_size, _file_digest(f)] for f in files if f.is_file()}}


def check_base(saved: dict, what: str, path: str | Path | None = None) -> None:
    """Refuse, in one line, a base (`path`, default the saved one) whose files differ from the fingerprint."""
    where = Path(path if path is not None else saved["path"])
    if not where.exists():
        raise UserError(f"{what}: its base {where} no longer exists; put it back or train the adapters again")
    try:
        current = base_fingerprint(where, saved.get("step"))["files"]
    except UserError as exc:
        raise UserError(f"{what}: its base {where} does not match ({exc})") from None
    changed = sorted(set(current) ^ set(saved["files"]) | {n for n in current if current[n] != saved["files"].get(n)})
    if changed:
        raise UserError(f"{what}: the base {where} is not the one its adapters were trained on ({', '.join(changed)} "
                        f"changed); use that base, or train the adapters again on this one")


def lora_settings_of(lora: dict) -> LoraSettings:
    """The LoraSettings a LoRA checkpoint's meta records."""
    targets = lora["targets"]
    return LoraSettings(rank=int(lora["rank"]), alpha=float(lora["alpha"]), dropout=float(lora["dropout"]),
                        targets=targets if isinstance(targets, str) else tuple(targets))


def attach_run_adapters(model: torch.nn.Module, checkpoint: Path, lora: dict) -> None:
    """Attach the adapters of a LoRA run's checkpoint to `model` (its base, vocabulary already grown when the run
    added tokens: `grow_for_run`), and the added tokens' trained rows, checked tensor by tensor."""
    attach_lora(model, lora_settings_of(lora))
    train_rows(model, range(*lora.get("rows", (0, 0))))
    params = adapter_parameters(model)
    tensors = read_file(checkpoint / WEIGHTS)
    if set(tensors) != set(params):
        odd = sorted(set(tensors) ^ set(params))[:3]
        raise UserError(f"{checkpoint / WEIGHTS}: its adapters do not fit the base ({', '.join(odd)})")
    with torch.no_grad():
        for name, param in params.items():
            if tuple(tensors[name].shape) != tuple(param.shape):
                raise UserError(f"{checkpoint / WEIGHTS}: {name} has shape {list(tensors[name].shape)}, the base "
                                f"needs {list(param.shape)}")
            param.copy_(tensors[name])


def grow_for_run(loaded: LoadedModel, run_dir: Path, lora: dict) -> None:
    """A LoRA run that added tokens to its base's tokenizer (`lora.rows`): the base grown to the run's vocabulary,
    with the run's tokenizer, in place; other runs leave the base as it is."""
    if not lora.get("rows"):
        return
    vocab = load_run_config(run_dir).model.vocab_size
    loaded.model = grow_model(loaded.model, vocab, range(*lora["rows"]))
    loaded.config = loaded.model.config
    loaded.tokenizer = CodeGenTokenizer.load(run_dir)


def load_lora_run(run_dir: Path, checkpoint: Path, device) -> LoadedModel:
    """A LoRA run's checkpoint over its base, unmerged (the adapters in float32, the base as stored)."""
    lora = read_meta(checkpoint)["lora"]
    check_base(lora["base"], f"LoRA run {run_dir}")
    base = load_checkpoint(lora["base"]["path"], device=device, step=lora["base"].get("step"), inference=False)
    grow_for_run(base, run_dir, lora)
    attach_run_adapters(base.model, checkpoint, lora)
    base.model.eval()
    base.prefix_lm = load_run_config(run_dir).objective.prefix_lm
    base.source = str(checkpoint)
    return base


def _load_with_adapter(path: Path, adapter: Path, device, dtype, mp_num, step, load_tokenizer) -> LoadedModel:
    """`--adapter DIR` over the base `path`: a LoRA run (whose base fingerprint must match) or PEFT's layout."""
    loaded = load_checkpoint(path, device=device, mp_num=mp_num, step=step, inference=False,
                             load_tokenizer=load_tokenizer)
    if not adapter.exists():
        raise UserError(f"--adapter {adapter}: not found")
    if is_run_directory(adapter):
        checkpoint = select_checkpoint(adapter)
        lora = read_meta(checkpoint).get("lora")
        if lora is None:
            raise UserError(f"--adapter {adapter}: a run without LoRA adapters; load it with --checkpoint instead")
        check_base(lora["base"], f"--adapter {adapter}", path)
        grow_for_run(loaded, adapter, lora)
        attach_run_adapters(loaded.model, checkpoint, lora)
    else:
        grow_for_adapter(loaded, adapter)
        load_adapter(loaded.model, adapter)
    merge_lora(loaded.model)
    loaded.source = f"{loaded.source} + {adapter}"
    return _cast_or_quantize(loaded, device, dtype)


def grow_for_adapter(loaded: LoadedModel, adapter: Path) -> None:
    """A PEFT adapter directory that trains tokens (`trainable_token_indices`): its tokenizer (saved beside it)
    becomes the model's, and a base too small for it grows to it; in place."""
    rows = adapter_token_rows(read_adapter_config(adapter))
    if not rows:
        return
    vocab = loaded.config.vocab_size
    if not (adapter / "tokenizer.json").is_file():
        if rows.stop > vocab:
            raise UserError(f"--adapter {adapter}: it trains tokens up to id {rows.stop - 1}, beyond the base's "
                            f"{vocab}, but holds no tokenizer.json with them")
        return
    tokenizer = CodeGenTokenizer.load(adapter)
    if max(rows.stop, tokenizer.vocab_size) > vocab:
        loaded.model = grow_model(loaded.model, max(rows.stop, tokenizer.vocab_size), rows)
        loaded.config = loaded.model.config
    loaded.tokenizer = tokenizer


def _cast_or_quantize(loaded: LoadedModel, device, dtype) -> LoadedModel:
    """The merged model in the dtype asked for: cast, or quantized to int8 from its merged weights."""
    model = loaded.model.eval()
    if is_int8_format(dtype):
        target = empty_model(loaded.config)
        expected = expected_tensors(target)
        state = model.state_dict()
        loaded.model = quantize_streamed(target, ((name, state[name]) for name in expected), device, fmt=dtype)
    elif dtype is not None:
        model.to(compute_dtype(dtype))
    return loaded


def export_run(run_dir: str | Path, out_dir: str | Path, step: int | None = None, adapter_only: bool = False) -> Path:
    """`codegen2 export-hf`: a run as a transformers directory; a LoRA run merged into its base, or with
    `adapter_only` its adapters alone in PEFT's layout (for PeftModel.from_pretrained over the base)."""
    run_dir = Path(run_dir)
    if not is_run_directory(run_dir):
        raise UserError(f"{run_dir}: not a codegen2 run directory (no config.toml)")
    checkpoint = select_checkpoint(run_dir, step)
    if "lora" not in read_meta(checkpoint):
        if adapter_only:
            raise UserError(f"--adapter-only: {checkpoint} holds full weights, not LoRA adapters; drop --adapter-only")
        return export_hf(run_dir, out_dir, step)
    loaded = load_lora_run(run_dir, checkpoint, "cpu")
    if adapter_only:
        return write_adapter(loaded.model, out_dir, base_model=read_meta(checkpoint)["lora"]["base"]["path"],
                             tokenizer=loaded.tokenizer if trained_rows(loaded.model) else None)
    merge_lora(loaded.model)
    state = loaded.model.state_dict()
    state = {name: state[name] for name in expected_tensors(empty_model(loaded.config))}
    return write_hf_directory(state, loaded.config, loaded.tokenizer, out_dir, f"{checkpoint} merged into its base")
