"""Run the published CodeGen2 checkpoints and move weights between codegen2 and Hugging Face.

Each architecture's own mapping (`Architecture.hf`, e.g. `models/codegen/hf.py`) says how its config.json
and tensors translate; this package reads, checks and writes the files of a HF directory.

- `read_hf_config` / `load_hf_config`, `load_hf_tokenizer` and `weights.load_into` read a local HF directory
  (`codegen`: CodeGen / CodeGen2; `llama`: CodeGen2.5 and other LLaMA models); `codegen2.loading` puts them
  together (`codegen2.from_pretrained` is its front). A CodeGen model keeps the checkpoint's own qkv grouping
  (`model.config.mp_num`: 8 for CodeGen2-1B/3.7B, 4 otherwise), so nothing is regrouped or copied.
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

from ..checkpoint import WEIGHTS, select_checkpoint, write_checkpoint
from ..config import Config, load_config, save_config
from ..errors import UserError
from ..fsutil import atomic_directory
from ..int8 import compute_dtype, parse_dtype
from ..models import architecture, empty_model
from ..models.codegen.hf import detect_mp_num, regroup_qkv, regroup_state_dict
from ..options import IMPORT_DTYPES
from ..safetensors_io import read_checked, write_file
from .codegen25_tokenizer import is_codegen25_directory, load_codegen25_tokenizer
from .config import CONFIG_FILE, load_hf_config, model_config_from_raw, read_hf_config
from .weights import expected_tensors, read_checked_tensors

__all__ = [
    "is_hf_directory", "load_hf_config", "detect_mp_num", "regroup_qkv", "regroup_state_dict",
    "export_hf", "import_hf", "register",
]

log = logging.getLogger("codegen2")

GENERATION_CONFIG = "generation_config.json"


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


# ------------------------------------------------------------------------------------------ export
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
    ckpt = select_checkpoint(run_dir, step)
    tokenizer = CodeGenTokenizer.load(run_dir)
    _require_empty(out_dir, "output directory")
    state = dict(read_checked(ckpt / WEIGHTS, expected_tensors(empty_model(cfg)), source="config.toml"))
    return write_hf_directory(state, cfg, tokenizer, out_dir, str(ckpt))


def write_hf_directory(state: dict[str, torch.Tensor], cfg, tokenizer, out_dir: str | Path, source: str) -> Path:
    """Write a model state (codegen2's names) as a transformers directory: weights, config, tokenizer."""
    out_dir = Path(out_dir)
    _require_empty(out_dir, "output directory")
    mapping = architecture(cfg).hf
    tensors = {name: tensor.contiguous() for name, tensor in mapping.state_to_hf(state, cfg).items()}
    dtype_name = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    bos = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eot_id
    hf_config = {**mapping.config_to_hf(cfg, tokenizer.eot_id, dtype_name), "bos_token_id": bos}  # the family's
    generation = {"_from_model_config": True, "bos_token_id": bos, "eos_token_id": tokenizer.eot_id}
    with atomic_directory(out_dir) as tmp:
        write_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
        (tmp / GENERATION_CONFIG).write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
        tokenizer.save(tmp)
    log.info("exported %s (%s) to %s", source, mapping.model_type, out_dir)
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
    expected = expected_tensors(empty_model(cfg))
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
    log.info("imported %s into %s (%s, step 0)", hf_dir, run_dir, describe_layout(cfg))
    return run_dir


# --------------------------------------------------------------------------------------------- CLI
def _cmd_import(args: argparse.Namespace) -> int:
    dtype = None if args.dtype == "auto" else compute_dtype(parse_dtype(args.dtype, "--dtype", IMPORT_DTYPES))
    run = import_hf(args.hf_dir, args.run_dir, mp_num=args.mp_num, dtype=dtype)
    print(f"imported into {run}; continue training with: codegen2 train --out {run} --resume")
    return 0


def describe_layout(cfg) -> str:
    """What a log line says about the loaded layout: CodeGen's qkv grouping matters, LLaMA has none."""
    return f"codegen, mp_num={cfg.mp_num}" if cfg.arch == "codegen" else cfg.arch


def register(subparsers) -> None:
    """Add `import-hf HF_DIR RUN_DIR` to the codegen2 CLI (`export-hf` is codegen2.cli's: it merges LoRA runs)."""
    p = subparsers.add_parser("import-hf", help="make a run directory from a Hugging Face CodeGen / LLaMA directory")
    p.add_argument("hf_dir", metavar="HF_DIR", help="directory with config.json, weights and tokenizer files")
    p.add_argument("run_dir", metavar="RUN_DIR", help="new run directory")
    p.add_argument("--mp-num", type=int, default=None, dest="mp_num",
                   help="CodeGen's qkv grouping (default: detect; 8 for CodeGen2-1B/3.7B, else 4)")
    p.add_argument("--dtype", default="auto",
                   help=f"convert the weights to {', '.join(IMPORT_DTYPES)} (default: auto, keep the stored dtype)")
    p.set_defaults(func=_cmd_import)
