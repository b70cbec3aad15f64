"""Left-to-right sampling and infilling (`generate_ids`, `generate`, `infill`) on the generation core.

Prompts of different lengths are left-padded into one batch; padding keys are masked and positions
count from each prompt's first real token, so a prompt gives the same logits alone or in a batch.
Every row draws from its own seeded generator, so a row's sample does not depend on what else is in
the batch (the server batches unrelated requests and must match `codegen2 sample`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..infill import InfillFormat, Specials, build_infill, infill_stop_ids, resolve_format
from ..models.common import KVCache
from ..options import DECODERS, LIBRARY_DECODER
from .core import first_stop, prefill, step, truncate_at_stop
from .decoder import FastDecoder, capacity_bucket, greedy_chunk_size


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (stop string, eot or eom) or "length"
    prompt_tokens: int


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits outside the top-k and outside the smallest set with probability mass >= top_p."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the mass before it already reaches top_p (the top token always stays).
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def choose_tokens(logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]) -> torch.Tensor:
    if params.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p)
    cdf = logits.softmax(dim=-1).cumsum(dim=-1)
    draws = torch.stack([torch.rand((), generator=g) for g in generators]).to(cdf.device)
    draws = draws * cdf[:, -1]
    return torch.searchsorted(cdf, draws[:, None]).squeeze(1).clamp_max(logits.shape[-1] - 1)


def _check(model: torch.nn.Module, prompts: list[list[int]], params: SamplingParams) -> int:
    """The cache length a generation needs (longest prompt + max_new_tokens), or ValueError naming the problem."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: give at least one token")
    longest = max(len(p) for p in prompts)
    total = longest + params.max_new_tokens
    if total > model.config.n_ctx:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                         f"model context of {model.config.n_ctx} tokens")
    return total


def _generators(params: SamplingParams, seeds: Sequence[int] | None, batch: int) -> list[torch.Generator]:
    """One seeded generator per row: row i uses seeds[i], else params.seed + i (a random base if unset)."""
    base_seed = params.seed if params.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
    seeds = list(seeds) if seeds is not None else [base_seed + i for i in range(batch)]
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


class _Rows:
    """The tokens each row keeps and why it finished: stop ids end a row unkept, stop strings end it kept."""

    def __init__(self, tokenizer, params: SamplingParams, stop_ids: Sequence[int], batch: int):
        self.tokenizer, self.params = tokenizer, params
        self.stop_set = set(stop_ids)
        self.stop_window = max((len(s) for s in params.stop), default=0) + 2
        self.generated: list[list[int]] = [[] for _ in range(batch)]
        self.finish = ["length"] * batch

    def finished(self, row: int, token: int) -> bool:
        """Take `token` as row's next choice; True when it ends the row (not kept if it is a stop id)."""
        if token in self.stop_set:
            self.finish[row] = "stop"
            return True
        self.generated[row].append(token)
        # A new stop string must end in the newest token, so a short tail is enough to find it.
        stops = self.params.stop
        if stops and first_stop(self.tokenizer.decode(self.generated[row][-self.stop_window:]), stops) != -1:
            self.finish[row] = "stop"
            return True
        return False

    def choose(self, logits: torch.Tensor, generators: list[torch.Generator],
               active: list[int]) -> tuple[torch.Tensor, list[int]]:
        """Each active row's next token, and the slots (indexes into `active`) of the rows still going."""
        tokens = choose_tokens(logits.float(), self.params, [generators[r] for r in active])
        keep = [slot for slot, (row, token) in enumerate(zip(active, tokens.tolist()))  # one host transfer
                if not self.finished(row, token)]
        return tokens, keep

    def completions(self, prompts: list[list[int]]) -> list[Completion]:
        return [Completion(text=truncate_at_stop(self.tokenizer.decode(ids), self.params.stop), token_ids=ids,
                           finish_reason=reason, prompt_tokens=len(prompt))
                for ids, reason, prompt in zip(self.generated, self.finish, prompts)]


@torch.inference_mode()
def generate_ids(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[list[int]],
    params: SamplingParams,
    stop_ids: Sequence[int] = (),
    seeds: Sequence[int] | None = None,
    bidirectional_prompt: bool = False,
    decoder: str = LIBRARY_DECODER,
) -> list[Completion]:
    """Sample continuations of token-id prompts; generation stops at any of `stop_ids` or stop strings.

    `decoder` picks how tokens after the prompt are computed: "model" (the model's forward with a KV
    cache; finished rows leave the batch), "fast" (`FastDecoder`: fused projections, fewer ops per
    token) or "compiled" (the same step compiled by torch.compile: tens of seconds once per batch size and
    cache bucket, then the fastest on CPU). All three give the same tokens up to floating-point rounding.
    Greedy decoding of a small model on the fused step takes several tokens per call (`FastDecoder.greedy`)
    and checks stops after each chunk, token by token: the same tokens as one step at a time.
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, not {decoder!r}")
    if not prompts:
        return []
    total = _check(model, prompts, params)
    generators = _generators(params, seeds, len(prompts))
    rows = _Rows(tokenizer, params, stop_ids, len(prompts))
    longest = total - params.max_new_tokens
    fast = None
    if decoder != "model":  # built first: it may lay the weights out for its batch, which the prefill then reads
        # Room for a whole greedy chunk past the last token asked for (its extra tokens are dropped).
        spare = greedy_chunk_size(model.config.n_layer) if params.temperature <= 0 else 0
        fast = FastDecoder(model, len(prompts), capacity_bucket(total + spare, model.config.n_ctx),
                           compile=decoder == "compiled")
    cache, logits, next_pos = prefill(model, prompts, tokenizer.eot_id, longest if fast is not None else total,
                                      bidirectional_prompt)
    if fast is None:
        _decode_model(model, cache, logits, next_pos, generators, rows)
        return rows.completions(prompts)
    fast.start(cache, next_pos)
    feed = torch.full((len(prompts),), tokenizer.eot_id, dtype=torch.long, device=next_pos.device)
    if fast.chunk > 1 and params.temperature <= 0:
        _decode_greedy_chunks(fast, logits, feed, rows)
    else:
        _decode_fast(model, fast, logits, feed, generators, rows)
    return rows.completions(prompts)


def _decode_model(model, cache: KVCache, logits: torch.Tensor, next_pos: torch.Tensor,
                  generators: list[torch.Generator], rows: _Rows) -> None:
    """One token per step through the model's forward; finished rows leave the cache."""
    active = list(range(len(rows.generated)))  # original row of each cache row
    for made in range(1, rows.params.max_new_tokens + 1):
        tokens, keep = rows.choose(logits, generators, active)
        if not keep or made == rows.params.max_new_tokens:  # the last token chosen needs no step after it
            break
        if len(keep) < len(active):
            index = torch.tensor(keep, device=next_pos.device)
            cache.reorder(index)
            tokens, next_pos = tokens[index], next_pos[index]
            active = [active[s] for s in keep]
        logits = step(model, cache, tokens, next_pos)
        next_pos = next_pos + 1


def _decode_fast(model, fast: FastDecoder, logits: torch.Tensor, feed: torch.Tensor,
                 generators: list[torch.Generator], rows: _Rows) -> None:
    """One token per step on the fused step; static shapes: a finished row keeps its slot, decoding padding."""
    batch = fast.batch
    active = list(range(batch))
    for made in range(1, rows.params.max_new_tokens + 1):
        tokens, keep = rows.choose(logits, generators, active)
        if not keep or made == rows.params.max_new_tokens:  # the last token chosen needs no step after it
            break
        if len(active) < batch:
            feed[torch.tensor(active, device=feed.device)] = tokens
        else:
            feed = tokens
        active = [active[s] for s in keep]
        logits = step(model, fast, feed, fast.pos)
        if len(active) < batch:
            logits = logits[torch.tensor(active, device=feed.device)]


def _decode_greedy_chunks(fast: FastDecoder, logits: torch.Tensor, feed: torch.Tensor, rows: _Rows) -> None:
    """Greedy, several tokens per call (`FastDecoder.greedy`): stops are checked after each chunk, token by
    token, so every row keeps exactly the tokens the one-step loop would give it."""
    budget = rows.params.max_new_tokens
    chosen, made, done = logits.argmax(dim=-1)[:, None], 0, [False] * fast.batch
    while True:
        new = chosen[:, : budget - made]
        made += new.shape[1]
        for row, tokens in enumerate(new.tolist()):  # one host transfer per chunk
            for token in tokens if not done[row] else ():
                if rows.finished(row, token):
                    done[row] = True
                    break
        if all(done) or made >= budget:
            return
        feed.copy_(chosen[:, -1])  # the graph wants the same contiguous [B] tensor every call
        chosen = fast.greedy(feed)


def generate(model, tokenizer, prompts: list[str], params: SamplingParams, seeds: Sequence[int] | None = None,
             bidirectional_prompt: bool = False, decoder: str = LIBRARY_DECODER) -> list[str]:
    """Completions (text after the prompt, cut at the first stop string or end of text)."""
    ids = [tokenizer.encode(p) for p in prompts]
    if any(not p for p in ids):
        ids = [p or [tokenizer.eot_id] for p in ids]
    done = generate_ids(model, tokenizer, ids, params, stop_ids=[tokenizer.eot_id], seeds=seeds,
                        bidirectional_prompt=bidirectional_prompt, decoder=decoder)
    return [c.text for c in done]


def infill(model, tokenizer, prefixes: list[str], suffixes: list[str], params: SamplingParams,
           seeds: Sequence[int] | None = None, bidirectional_prompt: bool = False,
           decoder: str = LIBRARY_DECODER, fmt: InfillFormat | str | None = None,
           extra_files: Sequence[tuple[str, str]] = ()) -> list[str]:
    """Middles for (prefix, suffix) pairs in infill format `fmt` (the registry's `codegen2.infill`; None: the
    model's detected format); a middle ends at the format's stop tokens. `extra_files` (path, text) go first where
    the format has a repository layout."""
    if len(prefixes) != len(suffixes):
        raise ValueError("infill needs as many suffixes as prefixes")
    specials = Specials.of(tokenizer)
    fmt = resolve_format(fmt, model.config.arch, specials)
    ids = [build_infill(tokenizer, p, s, fmt, extra_files) for p, s in zip(prefixes, suffixes)]
    stop_ids = infill_stop_ids(specials, fmt)
    done = generate_ids(model, tokenizer, ids, params, stop_ids=stop_ids, seeds=seeds,
                        bidirectional_prompt=bidirectional_prompt, decoder=decoder)
    return [c.text for c in done]
