"""The one public loader: `load_checkpoint` reads a codegen2 run directory, a Hugging Face directory or an
int8 directory written by `codegen2 quantize`, in any weight format (`codegen2.from_pretrained` is its front).
`quantize_checkpoint` (`codegen2 quantize`) loads a checkpoint as int8 and writes the int8 directory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import WEIGHTS, checkpoint_step, list_checkpoints, select_checkpoint
from .config import Config, ModelConfig, load_config
from .errors import UserError
from .hf import describe_layout, load_hf_tokenizer
from .hf.config import CONFIG_FILE, model_config_from_raw, read_hf_config
from .hf.weights import expected_tensors, load_into, read_checked_tensors
from .int8 import check_int8_kernel, compute_dtype, is_int8_format, parse_dtype, quantize_streamed
from .models import architecture, empty_model
from .quantize import MANIFEST, load_quantized_into, read_manifest, write_int8_directory
from .safetensors_io import read_checked
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


def load_checkpoint(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    mp_num: int | None = None,
    step: int | None = None,
    inference: bool = True,
    load_tokenizer: bool = True,
    decode_layout: bool = True,
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
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    if not inference and (is_int8_format(dtype) or read_manifest(path) is not None):
        raise UserError(f"{path}: int8 weights are for inference only and cannot be trained; start from the "
                        f"float32 or bfloat16 checkpoint they were quantized from")
    if is_run_directory(path):
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
