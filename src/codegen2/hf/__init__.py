"""Run the published CodeGen2 checkpoints and move weights between codegen2 and Hugging Face.

Each architecture's own mapping (`Architecture.hf`, e.g. `models/codegen/hf.py`) says how its config.json
and tensors translate; this package reads, checks and writes the files.

- `from_pretrained(dir)` loads a local HF directory (`codegen`: CodeGen / CodeGen2; `llama`: CodeGen2.5 and
  other LLaMA models) into a model, with the tokenizer attached as `model.tokenizer`. A CodeGen model keeps
  the checkpoint's own qkv grouping (`model.config.mp_num`: 8 for CodeGen2-1B/3.7B, 4 otherwise), so nothing
  is regrouped or copied.
- `export_hf(run, out)` writes a directory that `transformers` loads with no remote code: weights in
  the 4-group layout transformers hard-codes, config.json recording `mp_num: 4`.
- `import_hf(dir, run)` writes a codegen2 run directory with a step-0 checkpoint to continue training
  from, in the checkpoint's own grouping (so its weights are bitwise those of the HF files).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from ..checkpoint import (
    CHECKPOINTS,
    WEIGHTS,
    atomic_directory,
    list_checkpoints,
    write_checkpoint,
    write_safetensors,
)
from ..config import Config, load_config, save_config
from ..errors import UserError
from ..loading import empty_model
from ..models import architecture, build_model
from ..models.codegen.hf import detect_mp_num, regroup_qkv, regroup_state_dict
from ..quantize import MANIFEST as QUANTIZATION_MANIFEST
from ..quantize import compute_dtype, is_int8_format, load_int8, load_quantized_into, parse_dtype, read_manifest
from .codegen25_tokenizer import is_codegen25_directory, load_codegen25_tokenizer
from .config import CONFIG_FILE, load_hf_config, model_config_from_raw, read_hf_config
from .weights import expected_shapes, load_into, read_checked_tensors

__all__ = [
    "from_pretrained", "is_hf_directory", "load_hf_config", "detect_mp_num", "regroup_qkv", "regroup_state_dict",
    "export_hf", "import_hf", "register",
]

log = logging.getLogger("codegen2")

GENERATION_CONFIG = "generation_config.json"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def is_hf_directory(path: str | Path) -> bool:
    """A directory with a config.json (and no codegen2 config.toml, which makes it a run directory)."""
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and not (path / "config.toml").is_file()


def has_tokenizer_files(path: str | Path) -> bool:
    path = Path(path)
    return (path / "tokenizer.json").is_file() or ((path / "vocab.json").is_file() and (path / "merges.txt").is_file())


def load_hf_tokenizer(path: str | Path, vocab_size: int):
    """The tokenizer of a HF directory (tokenizer.json, or vocab.json + merges.txt + added_tokens.json)."""
    from ..tokenizer import CodeGenTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file() and is_codegen25_directory(path):
        tokenizer = CodeGenTokenizer(load_codegen25_tokenizer(path))
        log.info("%s: CodeGen2.5 tokenizer rebuilt from GPT-2's BPE table (no remote code run)", path)
    elif not has_tokenizer_files(path):
        raise UserError(f"{path}: no tokenizer files (tokenizer.json, or vocab.json + merges.txt + "
                        f"added_tokens.json); copy them from the original model directory")
    else:
        try:
            tokenizer = CodeGenTokenizer.load(path)
        except UserError as exc:
            message = str(exc)
            raise UserError(message if str(path) in message else f"{path}: {message}") from None
    if tokenizer.vocab_size > vocab_size:
        raise UserError(f"{path}: the tokenizer has ids up to {tokenizer.vocab_size - 1} but the model's "
                        f"vocab_size is {vocab_size}")
    return tokenizer


def from_pretrained(
    path: str | Path,
    mp_num: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    load_tokenizer: bool = True,
) -> torch.nn.Module:
    """Load a local Hugging Face directory (CodeGen / CodeGen2) as a codegen2 model in eval mode.

    The tokenizer is attached as `model.tokenizer` (None with load_tokenizer=False); the shapes are
    `model.config` (a ModelConfig whose mp_num is the checkpoint's qkv grouping: explicit `mp_num`,
    else config.json's `mp_num` key, else detected from the published shapes; logged either way).
    `dtype` None keeps the stored dtype; "int8" quantizes the weights as they stream in (codegen2.quantize),
    and a directory written by `codegen2 quantize` always loads as int8. The model is built on the meta
    device and each tensor is memory-mapped or read once, so the weights are never held twice.
    """
    path = Path(path)
    cfg = model_config_from_raw(read_hf_config(path), path, mp_num)
    tokenizer = load_hf_tokenizer(path, cfg.vocab_size) if load_tokenizer else None
    model = empty_model(cfg)
    weight_format = dtype if isinstance(dtype, torch.dtype) else parse_dtype(dtype, "dtype")
    manifest = read_manifest(path)
    if manifest is not None:  # written by `codegen2 quantize`
        if weight_format is not None and not is_int8_format(weight_format):
            raise UserError(f"{path} holds int8 weights ({QUANTIZATION_MANIFEST}); it loads only as int8 or "
                            f"int8-dynamic, not {weight_format}")
        load_quantized_into(model, path, manifest, device, fmt=weight_format)
    elif is_int8_format(weight_format):
        load_int8(model, path, device, fmt=weight_format)
    else:
        load_into(model, path, device=device, dtype=compute_dtype(weight_format))
    model.eval()
    model.tokenizer = tokenizer
    log.info("loaded %s: %s parameters, %s, %s", path, f"{model.num_parameters():,}",
             str(next(model.parameters()).dtype).removeprefix("torch."), _layout(cfg))
    return model


# ------------------------------------------------------------------------------------------ export
def _select_checkpoint(run_dir: Path, step: int | None) -> Path:
    found = list_checkpoints(run_dir)
    if not found:
        raise UserError(f"{run_dir}: no complete checkpoint ({CHECKPOINTS}/step_*/{WEIGHTS})")
    if step is None:
        return found[-1]
    for ckpt in found:
        if int(ckpt.name.split("_")[1]) == step:
            return ckpt
    steps = ", ".join(c.name.split("_")[1].lstrip("0") or "0" for c in found)
    raise UserError(f"{run_dir}: no checkpoint for step {step} (available: {steps})")


def _require_empty(directory: Path, what: str) -> None:
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise UserError(f"{directory} already exists and is not empty; choose a new {what} or remove it")


def export_hf(run_dir: str | Path, out_dir: str | Path, step: int | None = None) -> Path:
    """Write a transformers-loadable CodeGen directory from a run's checkpoint (latest, or `step`)."""
    from ..tokenizer import CodeGenTokenizer

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not (run_dir / "config.toml").is_file():
        raise UserError(f"{run_dir}: not a codegen2 run directory (no config.toml)")
    config = load_config(run_dir / "config.toml")
    cfg = config.model
    ckpt = _select_checkpoint(run_dir, step)
    tokenizer = CodeGenTokenizer.load(run_dir)
    _require_empty(out_dir, "output directory")
    with torch.device("meta"):
        expected = expected_shapes(build_model(cfg))
    mapping = architecture(cfg).hf
    state = dict(read_checked_tensors(ckpt / WEIGHTS, expected, config_name="config.toml"))
    tensors = {name: tensor.contiguous() for name, tensor in mapping.state_to_hf(state, cfg).items()}
    dtype_name = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    hf_config = mapping.config_to_hf(cfg, tokenizer.eot_id, dtype_name)
    generation = {"_from_model_config": True, "bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id}
    with atomic_directory(out_dir) as tmp:
        write_safetensors(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
        (tmp / GENERATION_CONFIG).write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
        tokenizer.save(tmp)
    log.info("exported %s (%s) to %s", ckpt, mapping.model_type, out_dir)
    return out_dir


# ------------------------------------------------------------------------------------------ import
def import_hf(hf_dir: str | Path, run_dir: str | Path, mp_num: int | None = None,
              dtype: torch.dtype | None = None) -> Path:
    """Make a run directory (config.toml, tokenizer, step-0 checkpoint without trainer state) from HF weights.

    The weights keep the checkpoint's qkv grouping (recorded as model.mp_num in config.toml) and, with
    `dtype` None, its dtype, so they are bitwise the HF tensors. Training resumed from this directory
    starts a fresh optimizer at step 0 from these weights.
    """
    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    cfg = model_config_from_raw(read_hf_config(hf_dir), hf_dir, mp_num)
    tokenizer = load_hf_tokenizer(hf_dir, cfg.vocab_size)
    _require_empty(run_dir, "run directory")
    with torch.device("meta"):
        expected = expected_shapes(build_model(cfg))
    state = architecture(cfg).hf.state_from_hf(dict(read_checked_tensors(hf_dir, expected, dtype=dtype)), cfg)
    config = Config(model=cfg)
    config.tokenizer.vocab_size = cfg.vocab_size
    config.tokenizer.num_masks = tokenizer.num_masks
    config.train.seq_len = min(config.train.seq_len, cfg.n_ctx)
    config.validate()
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(run_dir)
    meta = {"tokens_seen": 0, "imported_from": str(hf_dir.resolve()), "mp_num": cfg.mp_num}
    write_checkpoint(run_dir, 0, state, meta)
    # config.toml last: its presence is what marks the directory as a complete run directory.
    save_config(config, run_dir / "config.toml")
    log.info("imported %s into %s (%s, step 0)", hf_dir, run_dir, _layout(cfg))
    return run_dir


# --------------------------------------------------------------------------------------------- CLI
def _cmd_export(args: argparse.Namespace) -> int:
    out = export_hf(args.run_dir, args.out_dir, step=args.step)
    print(f"exported to {out} (load with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    dtype = None if args.dtype == "auto" else DTYPES[args.dtype]
    run = import_hf(args.hf_dir, args.run_dir, mp_num=args.mp_num, dtype=dtype)
    print(f"imported into {run}; continue training with: codegen2 train --out {run} --resume")
    return 0


def _layout(cfg) -> str:
    """What a log line says about the loaded layout: CodeGen's qkv grouping matters, LLaMA has none."""
    return f"codegen, mp_num={cfg.mp_num}" if cfg.arch == "codegen" else cfg.arch


def register(subparsers) -> None:
    """Add `export-hf RUN_DIR OUT_DIR` and `import-hf HF_DIR RUN_DIR` to the codegen2 CLI."""
    p = subparsers.add_parser("export-hf", help="write a run's weights as a transformers CodeGen / LLaMA directory")
    p.add_argument("run_dir", metavar="RUN_DIR", help="codegen2 run directory")
    p.add_argument("out_dir", metavar="OUT_DIR", help="new directory for config.json, model.safetensors, tokenizer")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.set_defaults(func=_cmd_export)

    p = subparsers.add_parser("import-hf", help="make a run directory from a Hugging Face CodeGen / LLaMA directory")
    p.add_argument("hf_dir", metavar="HF_DIR", help="directory with config.json, weights and tokenizer files")
    p.add_argument("run_dir", metavar="RUN_DIR", help="new run directory")
    p.add_argument("--mp-num", type=int, default=None, dest="mp_num",
                   help="CodeGen's qkv grouping (default: detect; 8 for CodeGen2-1B/3.7B, else 4)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="convert the weights (default: keep the stored dtype)")
    p.set_defaults(func=_cmd_import)
