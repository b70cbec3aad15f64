"""Left-to-right sampling and CodeGen2 infilling with a static KV cache.

Prompts of different lengths are left-padded into one batch; padding keys are masked and positions
count from each prompt's first real token, so a prompt gives the same logits alone or in a batch.
Every row draws from its own seeded generator, so a row's sample does not depend on what else is in
the batch (the server batches unrelated requests and must match `codegen2 sample`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .inference_options import DECODERS, LIBRARY_DECODER
from .models.common import KVCache


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


def infill_prompt_ids(tokenizer, prefix: str, suffix: str) -> list[int]:
    """CodeGen2 infill prompt (docs/design.md §2): prefix <mask_1> suffix <|endoftext|> <sep> <mask_1>."""
    mask = tokenizer.mask_id(1)
    return (tokenizer.encode(prefix) + [mask] + tokenizer.encode(suffix)
            + [tokenizer.eot_id, tokenizer.sep_id, mask])


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


def _first_stop(text: str, stops: Sequence[str]) -> int:
    cut = -1
    for stop in stops:
        at = text.find(stop)
        if at != -1 and (cut == -1 or at < cut):
            cut = at
    return cut


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
    cache; finished rows leave the batch), "fast" (`decode.FastDecoder`: fused projections, fewer ops per
    token) or "compiled" (the same step compiled by torch.compile: tens of seconds once per batch size and
    cache bucket, then the fastest on CPU). All three give the same tokens up to floating-point rounding.
    Greedy decoding of a small model on the fused step takes several tokens per call (`FastDecoder.greedy`)
    and checks stops after each chunk, token by token: the same tokens as one step at a time.
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, not {decoder!r}")
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: give at least one token")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    batch = len(prompts)
    longest = max(len(p) for p in prompts)
    total = longest + params.max_new_tokens
    if total > model.config.n_ctx:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                         f"model context of {model.config.n_ctx} tokens")
    base_seed = params.seed if params.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
    seeds = list(seeds) if seeds is not None else [base_seed + i for i in range(batch)]
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    pad_id = tokenizer.eot_id
    input_ids = torch.full((batch, longest), pad_id, dtype=torch.long)
    valid = torch.zeros(batch, longest, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        valid[row, longest - len(prompt):] = True
    input_ids, valid = input_ids.to(device), valid.to(device)
    positions = (valid.long().cumsum(dim=1) - 1).clamp_min(0)

    fast = None
    cache = KVCache(model.config, batch, longest if decoder != "model" else total, device=device, dtype=dtype)
    cache.valid[:, :longest] = valid
    cache.has_padding = bool((~valid).any())
    prefix_len = torch.full((batch,), longest, device=device) if bidirectional_prompt else None
    logits = model(input_ids, position_ids=positions, prefix_len=prefix_len, cache=cache, last_only=True)[:, -1]
    next_pos = positions[:, -1] + 1
    if decoder != "model":
        from .decode import FastDecoder, capacity_bucket, greedy_chunk_size

        # Room for a whole greedy chunk past the last token asked for (its extra tokens are dropped).
        spare = greedy_chunk_size(model.config.n_layer) if params.temperature <= 0 else 0
        fast = FastDecoder(model, batch, capacity_bucket(total + spare, model.config.n_ctx),
                           compile=decoder == "compiled")
        fast.start(cache, next_pos)
        feed = torch.full((batch,), pad_id, dtype=torch.long, device=device)

    stop_window = max((len(s) for s in params.stop), default=0) + 2
    stop_set = set(stop_ids)
    generated: list[list[int]] = [[] for _ in range(batch)]
    finish = ["length"] * batch

    def finished(row: int, token: int) -> bool:
        """Take `token` as row's next choice; True when it ends the row (not kept if it is a stop id)."""
        if token in stop_set:
            finish[row] = "stop"
            return True
        generated[row].append(token)
        # A new stop string must end in the newest token, so a short tail is enough to find it.
        if params.stop and _first_stop(tokenizer.decode(generated[row][-stop_window:]), params.stop) != -1:
            finish[row] = "stop"
            return True
        return False

    if fast is not None and fast.chunk > 1 and params.temperature <= 0:
        # Greedy, several tokens per call (`FastDecoder.greedy`): stops are checked after each chunk, token
        # by token, so every row keeps exactly the tokens the one-step loop below would give it.
        chosen, made, done = logits.argmax(dim=-1)[:, None], 0, [False] * batch
        while True:
            new = chosen[:, : params.max_new_tokens - made]
            made += new.shape[1]
            for row, tokens in enumerate(new.tolist()):  # one host transfer per chunk
                for token in tokens if not done[row] else ():
                    if finished(row, token):
                        done[row] = True
                        break
            if all(done) or made >= params.max_new_tokens:
                break
            feed.copy_(chosen[:, -1])  # the graph wants the same contiguous [B] tensor every call
            chosen = fast.greedy(feed)
        active = []
    else:
        active = list(range(batch))  # original row of each cache row
    for _ in range(params.max_new_tokens if active else 0):
        tokens = choose_tokens(logits.float(), params, [generators[r] for r in active])
        keep = [slot for slot, (row, token) in enumerate(zip(active, tokens.tolist()))  # one host transfer
                if not finished(row, token)]
        if not keep:
            break
        if fast is not None:
            # Static shapes: every row keeps its batch slot; a finished row decodes padding, unread.
            if len(active) < batch:
                feed[torch.tensor(active, device=device)] = tokens
            else:
                feed = tokens
            active = [active[s] for s in keep]
            logits = fast.step(feed)
            if len(active) < batch:
                logits = logits[torch.tensor(active, device=device)]
            continue
        if len(keep) < len(active):
            index = torch.tensor(keep, device=device)
            cache.reorder(index)
            tokens, next_pos = tokens[index], next_pos[index]
            active = [active[s] for s in keep]
        logits = model(tokens[:, None], position_ids=next_pos[:, None], cache=cache)[:, -1]
        next_pos = next_pos + 1

    out = []
    for row in range(batch):
        text = tokenizer.decode(generated[row])
        if params.stop:
            cut = _first_stop(text, params.stop)
            if cut != -1:
                text = text[:cut]
        out.append(Completion(text=text, token_ids=generated[row], finish_reason=finish[row],
                              prompt_tokens=len(prompts[row])))
    return out


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
           decoder: str = LIBRARY_DECODER) -> list[str]:
    """Middles for (prefix, suffix) pairs in CodeGen2's format; the middle ends at <eom>."""
    if len(prefixes) != len(suffixes):
        raise ValueError("infill needs as many suffixes as prefixes")
    ids = [infill_prompt_ids(tokenizer, p, s) for p, s in zip(prefixes, suffixes)]
    done = generate_ids(model, tokenizer, ids, params, stop_ids=[tokenizer.eom_id, tokenizer.eot_id], seeds=seeds,
                        bidirectional_prompt=bidirectional_prompt, decoder=decoder)
    return [c.text for c in done]
