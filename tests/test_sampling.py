"""Sampling: greedy decoding with the cache equals a naive loop of full forward passes; filters; stops."""

import torch

import codegen2.generation.sampling as sampling
from codegen2.config import ModelConfig
from codegen2.generation.sampling import SamplingParams, filter_logits, generate_ids
from codegen2.infill import Specials, infill_prompt
from codegen2.models.codegen.model import CodeGenModel
from conftest import CharTokenizer, naive_greedy


def model() -> CodeGenModel:
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=300, n_layer=2, n_embd=64, n_head=4, rotary_dim=16, n_ctx=128, mp_num=2)
    return CodeGenModel(cfg).eval()




def test_greedy_with_cache_equals_naive_loop_in_a_padded_batch():
    m, tok = model(), CharTokenizer()
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42]]
    out = generate_ids(m, tok, prompts, SamplingParams(max_new_tokens=12))
    for prompt, completion in zip(prompts, out):
        assert completion.token_ids == naive_greedy(m, prompt, 12)
        assert completion.finish_reason == "length"


def test_the_last_token_chosen_runs_no_step_after_it(monkeypatch):
    """N new tokens need the prompt's logits and N - 1 steps: a step after the last choice is wasted work
    (a whole pass over the weights; 1/64 of a 64-token generation)."""
    m, tok = model(), CharTokenizer()
    calls = []
    real_step = sampling.step
    monkeypatch.setattr(sampling, "step", lambda *a, **k: calls.append(1) or real_step(*a, **k))
    for decoder in ("model", "fast"):
        calls.clear()
        out = generate_ids(m, tok, [[5, 6, 7], [1, 2]], SamplingParams(max_new_tokens=6, temperature=1.0, seed=0),
                           decoder=decoder)  # sampled: the fast decoder steps one token at a time
        assert [len(c.token_ids) for c in out] == [6, 6]
        assert len(calls) == 5, decoder


def test_seeded_sampling_is_reproducible_and_independent_of_batch_mates():
    m, tok = model(), CharTokenizer()
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    alone = generate_ids(m, tok, [[10, 11, 12]], params)[0].token_ids
    batched = generate_ids(m, tok, [[10, 11, 12], [50, 60]], params, seeds=[7, 99])[0].token_ids
    again = generate_ids(m, tok, [[10, 11, 12]], params)[0].token_ids
    assert alone == batched == again


def test_top_p_and_top_k_keep_the_expected_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, top_k=0, top_p=0.8))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits, top_k=0, top_p=0.81))
    assert kept.tolist() == [[True, True, True, False]]
    kept = torch.isfinite(filter_logits(logits[:, [3, 2, 1, 0]], top_k=2, top_p=1.0))
    assert kept.tolist() == [[False, False, True, True]]


def test_stop_ids_and_infill_prompt_layout():
    m, tok = model(), CharTokenizer()
    first = naive_greedy(m, [1, 2, 3], 1)[0]
    out = generate_ids(m, tok, [[1, 2, 3]], SamplingParams(max_new_tokens=5), stop_ids=[first])[0]
    assert out.token_ids == [] and out.finish_reason == "stop"
    assert infill_prompt(Specials.of(tok), tok.encode("ab"), tok.encode("c")) == [97, 98, 260, 99, 256, 257, 260]


def test_prompt_longer_than_context_is_refused():
    m, tok = model(), CharTokenizer()
    try:
        generate_ids(m, tok, [[1] * 120], SamplingParams(max_new_tokens=20))
    except ValueError as exc:
        assert "exceeds the model context" in str(exc)
    else:
        raise AssertionError("expected a ValueError")
