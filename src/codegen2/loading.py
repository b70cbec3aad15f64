"""One entry point for every command that takes `--checkpoint`: a codegen2 run directory or a HF directory."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import WEIGHTS, checkpoint_step, latest_checkpoint, list_checkpoints, load_weights
from .config import Config, ModelConfig, load_config
from .errors import UserError
from .models import build_model
from .quantize import check_int8_kernel, compute_dtype, is_int8_format, load_int8, parse_dtype, read_manifest

log = logging.getLogger("codegen2")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object  # CodeGenTokenizer
    config: ModelConfig
    prefix_lm: bool = False  # trained as a prefix-LM: prompts are read bidirectionally
    source: str = ""


@contextmanager
def _no_parameter_init():
    """Make `torch.nn.init` fills no-ops: on the meta device they compute nothing, yet `nn.Embedding`'s
    `normal_` goes through torch._refs, which imports torch._dynamo (about 70 MB resident and a second)."""
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for name in names:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def empty_model(config: ModelConfig) -> torch.nn.Module:
    """The model for `config` on the meta device (shapes only), for a loader to fill tensor by tensor."""
    with _no_parameter_init(), torch.device("meta"):
        return build_model(config)


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
) -> LoadedModel:
    """Load weights + tokenizer from a run directory (latest or given step) or a Hugging Face directory.

    `dtype`: None keeps the stored dtype; "float32", "bfloat16", "int8" (weight-only, quantized while the
    weights stream in: `codegen2.quantize`) or "int8-dynamic" (the same weights, int8 activations too).
    A directory written by `codegen2 quantize` loads as int8 (or int8-dynamic when asked).
    With `inference` (the default: sampling, infilling, evaluation, serving), a model on the CPU gets
    the decode weight layout (the model's `use_decode_layout`): same values and state dict, faster
    one-token matmuls. Callers that go on to train the loaded modules themselves pass `inference=False`;
    copying the state dict into another model (as `train.init_from` does) is unaffected either way.
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
    elif (path / "config.json").is_file():
        from .hf import from_pretrained

        model = from_pretrained(path, mp_num=mp_num, device=device, dtype=dtype)
        prefix_lm = bool((read_manifest(path) or {}).get("prefix_lm", False))  # kept by `codegen2 quantize`
        loaded = LoadedModel(model=model, tokenizer=model.tokenizer, config=model.config, prefix_lm=prefix_lm,
                             source=str(path))
    else:
        raise UserError(f"{path} is neither a codegen2 run directory (config.toml) nor a Hugging Face "
                        f"directory (config.json)")
    if inference and next(loaded.model.parameters()).device.type == "cpu":
        loaded.model.use_decode_layout()
    return loaded


def _load_run(run_dir: Path, device, dtype, step: int | None) -> LoadedModel:
    from .tokenizer import CodeGenTokenizer

    config = load_run_config(run_dir)
    steps = [checkpoint_step(c) for c in list_checkpoints(run_dir)]
    if step is None:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise UserError(f"{run_dir} has no complete checkpoint yet (checkpoints/step_*/{WEIGHTS})")
    else:
        matches = [c for c in list_checkpoints(run_dir) if checkpoint_step(c) == step]
        if not matches:
            raise UserError(f"{run_dir} has no checkpoint for step {step} (it has: {', '.join(map(str, steps))})")
        ckpt = matches[0]
    tokenizer = CodeGenTokenizer.load(run_dir)
    model = empty_model(config.model)
    if is_int8_format(dtype):  # a missing int8 kernel is this machine's problem, not the checkpoint's (no hint below)
        check_int8_kernel(device, dynamic=dtype == "int8-dynamic")
    try:
        if is_int8_format(dtype):
            load_int8(model, ckpt / WEIGHTS, device, config_name="config.toml", fmt=dtype)
        else:
            state = load_weights(ckpt / WEIGHTS, device=device)
            if dtype is not None:
                state = {k: v.to(compute_dtype(dtype)) for k, v in state.items()}
            model.load_state_dict(state, strict=True, assign=True)
    except UserError as exc:
        others = [s for s in steps if s != checkpoint_step(ckpt)]
        hint = f"; load another checkpoint with --step {others[-1]} (this run has: {', '.join(map(str, others))})"
        raise UserError(f"{exc}{hint if others else ''}") from None
    model.eval()
    log.info("loaded %s (%s parameters)", ckpt, f"{model.num_parameters():,}")
    return LoadedModel(model=model, tokenizer=tokenizer, config=config.model,
                       prefix_lm=config.objective.prefix_lm, source=str(ckpt))
