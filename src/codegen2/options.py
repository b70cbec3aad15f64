"""The choices every command shares (train, sample, infill, eval, serve): device, weight format and decoder.

Kept free of torch at import so that building the command-line parser stays fast; `int8.parse_dtype`
checks a format, `sampling.generate_ids` runs a decoder and `resolve_device` imports torch when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    import torch

# The one list of weight-format names; each command accepts a subset (`int8.parse_dtype(name, where, accepted)`).
DTYPES = ("float32", "bfloat16", "float16", "int8", "int8-dynamic")
INFERENCE_DTYPES = ("float32", "bfloat16", "int8", "int8-dynamic")  # sample, infill, eval, serve, from_pretrained
IMPORT_DTYPES = ("float32", "bfloat16", "float16")  # import-hf: what the stored float weights are converted to
DECODERS = ("model", "fast", "compiled")
DEFAULT_DECODER = "compiled"  # of the commands, serve included: compiled once per process (and batch), printed
LIBRARY_DECODER = "fast"  # of `sampling.generate_ids` and friends: no compile unless the caller asks for it
DEFAULT_DEVICE = "auto"  # of every command and of config.train.device: CUDA where present, else the CPU


def resolve_device(name: str = DEFAULT_DEVICE, where: str = "--device") -> torch.device:
    """The one device choice: `auto` is CUDA where present, else the CPU; a CUDA device asked for on a machine
    without one is refused in one line naming `where` (the flag or config key that asked)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{where}={name} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{where}={name} but no CUDA device is available")
    return device


def add_device_flag(parser, default: str = DEFAULT_DEVICE) -> None:
    """`--device`, resolved by `resolve_device` when the command runs."""
    parser.add_argument("--device", default=default,
                        help=f"auto (CUDA where present, else the CPU), cpu, cuda or cuda:N; default: {default}")


def add_dtype_flag(parser, default: str | None = None, extra: str = "") -> None:
    """`--dtype`, checked when the model loads (a clear error names the allowed formats)."""
    parser.add_argument("--dtype", default=default,
                        help=f"weight format: {', '.join(INFERENCE_DTYPES)} (int8: weight-only, one scale per output "
                             f"channel, activations in floating point; int8-dynamic: the same weights, activations "
                             f"rounded to int8 per row for int8 x int8 matmuls){extra}; "
                             f"default: {default or 'as stored'}")


def add_decoder_flag(parser, default: str = DEFAULT_DECODER) -> None:
    """`--decoder`: how tokens after the prompt are computed (all give the same tokens up to rounding)."""
    parser.add_argument("--decoder", choices=DECODERS, default=default,
                        help="the model's forward with a KV cache (model), the fused one-token step eagerly (fast), "
                             "or that step compiled once per process and batch size (compiled; its compile time is "
                             f"printed); default: {default}")
