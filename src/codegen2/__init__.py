"""codegen2: train code LLMs the CodeGen2 way and run the published CodeGen2 checkpoints."""

__version__ = "0.1.0"
