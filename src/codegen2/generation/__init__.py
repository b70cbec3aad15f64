"""Generation: one core shared by `codegen2 sample` / `infill`, evaluation and the server's continuous batching.

- `core`: the left-padded prefill, the one-token step, the stop-string search and the row copies that
  compact a cache: each written once.
- `decoder`: `FastDecoder`, the fused (optionally compiled) one-token step over a static cache.
- `sampling`: `SamplingParams`, token choice (`choose_tokens`), and `generate_ids` / `generate` / `infill`,
  the batch generation the commands and evaluation call.

The server (`serve.engine`) drives the same core row by row; infill prompts come from `codegen2.infill`.
"""
