"""codegen2: train code LLMs the CodeGen2 way and run the published CodeGen2 checkpoints."""

__version__ = "0.1.0"


def from_pretrained(path, mp_num=None, device="cpu", dtype=None, load_tokenizer=True, adapter=None):
    """Load a Hugging Face directory, one written by `codegen2 quantize`, or a codegen2 run directory (its
    newest checkpoint); the tokenizer is attached as `model.tokenizer`. `dtype`: None (as stored), "float32",
    "bfloat16" or "int8" (weight-only, quantized while the weights stream in; docs/inference.md), or a torch
    dtype. `adapter`: LoRA adapters (a codegen2 LoRA run or a PEFT adapter directory) merged into the weights
    before any cast or int8, as `--adapter DIR` does on the command line. A thin front over
    `codegen2.loading.load_checkpoint`, which also says the step, format and prefix-LM flag."""
    from .int8 import parse_dtype
    from .loading import load_checkpoint

    if isinstance(dtype, str):
        dtype = parse_dtype(dtype, "dtype")
    loaded = load_checkpoint(path, device=device, dtype=dtype, mp_num=mp_num, load_tokenizer=load_tokenizer,
                             decode_layout=False, adapter=adapter)
    loaded.model.tokenizer = loaded.tokenizer
    return loaded.model
