"""codegen2: train code LLMs the CodeGen2 way and run the published CodeGen2 checkpoints."""

__version__ = "0.1.0"


def from_pretrained(path, mp_num=None, device="cpu", dtype=None):
    """Load a Hugging Face directory (or one written by `codegen2 quantize`); the tokenizer is attached as
    `model.tokenizer` (see codegen2.hf). `dtype`: None (as stored), "float32", "bfloat16" or "int8"
    (weight-only, quantized while the weights stream in; docs/inference.md), or a torch dtype."""
    from .hf import from_pretrained as _from_pretrained

    return _from_pretrained(path, mp_num=mp_num, device=device, dtype=dtype)
