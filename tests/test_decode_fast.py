"""Inference fast paths: decode weight layout in the loaders, fused FastDecoder, the compiled decode step.

References: the model's own forward (full sequence, no cache), a naive greedy loop of full forward passes,
the "model" decoder of `generate_ids`, and transformers' CodeGenForCausalLM on the same weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from codegen2.checkpoint import write_checkpoint
from codegen2.config import Config, ModelConfig, TokenizerConfig, TrainConfig, save_config
from codegen2.generation.decoder import FastDecoder, capacity_bucket, greedy_chunk_size
from codegen2.generation.sampling import SamplingParams, generate_ids
from codegen2.loading import load_checkpoint
from codegen2.models import build_model
from codegen2.models.codegen.model import CodeGenModel
from codegen2.models.common import HUGE_PAGE, KVCache
from conftest import CharTokenizer, naive_greedy

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # (fixture in conftest.py)


SMALL = {
    "codegen": dict(vocab_size=300, n_layer=2, n_embd=64, n_head=4, rotary_dim=8, n_ctx=256, mp_num=2),
    "llama": dict(arch="llama", vocab_size=300, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, rotary_dim=16,
                  n_inner=96, n_ctx=256),
}
ARCHS = pytest.mark.parametrize("arch", list(SMALL))


def small_model(arch: str = "codegen", **shape) -> torch.nn.Module:
    torch.manual_seed(3)
    return build_model(ModelConfig(**{**SMALL[arch], **shape})).eval()




@pytest.mark.parametrize("arch, shape", [("codegen", {}), ("codegen", {"rotary_dim": 16, "mp_num": 4}),
                                         ("llama", {}), ("llama", {"n_kv_head": 1, "tie_word_embeddings": True})])
def test_fast_decoder_logits_equal_a_full_forward_pass(arch, shape):
    model = small_model(arch, **shape)
    ids = torch.randint(0, 300, (3, 30))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, 3, 10)
        model(ids[:, :10], cache=cache)
        decoder = FastDecoder(model, 3, 40)
        decoder.start(cache, torch.full((3,), 10))
        for t in range(10, 30):
            assert (decoder.step(ids[:, t]) - full[:, t]).abs().max() <= 2e-5
        # Fusing re-points the model's weights at the fused buffers: its own forward is unchanged.
        assert torch.equal(model(ids), full)


@ARCHS
def test_fast_decoder_handles_left_padding_and_early_stops(arch):
    model, tok = small_model(arch), CharTokenizer()
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42]]
    out = generate_ids(model, tok, prompts, SamplingParams(max_new_tokens=12), decoder="fast")
    for prompt, completion in zip(prompts, out):
        assert completion.token_ids == naive_greedy(model, prompt, 12)
    # A stop id met by some rows only: the others go on exactly as the reference decoder does.
    stop = out[1].token_ids[4]
    ref = generate_ids(model, tok, prompts, SamplingParams(max_new_tokens=12), stop_ids=[stop])
    fast = generate_ids(model, tok, prompts, SamplingParams(max_new_tokens=12), stop_ids=[stop], decoder="fast")
    assert [c.token_ids for c in fast] == [c.token_ids for c in ref]
    assert [c.finish_reason for c in fast] == [c.finish_reason for c in ref]
    assert "stop" in [c.finish_reason for c in fast]


@ARCHS
def test_seeded_sampling_is_the_same_in_every_decoder(arch):
    model, tok = small_model(arch), CharTokenizer()
    params = SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=11)
    prompts = [[10, 11, 12], [50, 60]]
    ref = [c.token_ids for c in generate_ids(model, tok, prompts, params)]
    assert [c.token_ids for c in generate_ids(model, tok, prompts, params, decoder="fast")] == ref
    with pytest.raises(ValueError, match="decoder must be one of"):
        generate_ids(model, tok, prompts, params, decoder="jit")


def test_greedy_chunk_size_keeps_a_chunk_graph_within_16_layers():
    assert [greedy_chunk_size(n) for n in (1, 2, 4, 5, 8, 12, 16, 32)] == [4, 4, 4, 3, 2, 1, 1, 1]


@ARCHS
def test_greedy_chunk_equals_one_step_and_argmax_at_a_time(arch):
    """`FastDecoder.greedy` (k steps, argmax inside) chooses what k calls of `step` and argmax choose."""
    model = small_model(arch)
    ids = torch.randint(0, 300, (3, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cache = KVCache(model.config, 3, 12)
        model(ids, cache=cache)
        chunked, stepped = FastDecoder(model, 3, 40), FastDecoder(model, 3, 40)
        for decoder in (chunked, stepped):
            decoder.start(cache, torch.full((3,), 12))
        assert chunked.chunk == 4
        feed = ids[:, -1].clone()
        for _ in range(3):
            chosen = chunked.greedy(feed)
            expected = []
            for _ in range(chunked.chunk):
                feed = stepped.step(feed).argmax(dim=-1)
                expected.append(feed)
            assert torch.equal(chosen, torch.stack(expected, dim=1))
            feed = chosen[:, -1].contiguous()
        assert chunked.length == stepped.length == 24
        full = FastDecoder(model, 3, 14)  # 12 filled: no room for a chunk of 4
        full.start(cache, torch.full((3,), 12))
        with pytest.raises(ValueError, match="cache is full"):
            full.greedy(feed)


@pytest.mark.parametrize("arch, decoder", [("codegen", "fast"), ("llama", "fast"),
                                           pytest.param("codegen", "compiled", marks=pytest.mark.slow)])
def test_greedy_chunks_stop_exactly_where_the_one_step_loop_stops(arch, decoder):
    """Stops are checked after each chunk, token by token: stop ids and stop strings met mid-chunk by some
    rows, budgets that are not a multiple of the chunk, left padding, and a generation that ends at the
    context's last position (the chunk's extra steps run past it) give the model decoder's tokens exactly.
    (LLaMA's compiled chunk: tests/test_llama.py, against transformers.)"""
    model, tok = small_model(arch), CharTokenizer()
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42], [200, 13]]
    for new_tokens in (1, 2, 5, 13):
        params = SamplingParams(max_new_tokens=new_tokens)
        ref = generate_ids(model, tok, prompts, params, decoder="model")
        fast = generate_ids(model, tok, prompts, params, decoder=decoder)
        assert [c.token_ids for c in fast] == [c.token_ids for c in ref]
        assert all(len(c.token_ids) == new_tokens for c in fast)
    params = SamplingParams(max_new_tokens=13)
    ref = generate_ids(model, tok, prompts, params, decoder="model")
    stop_id = ref[1].token_ids[5]  # in row 1's second chunk, not at its end
    text = tok.decode(ref[3].token_ids)
    stop_text = text[2:4] if len(text) >= 4 else text[:1]
    for stop_ids, stop in (([stop_id], ()), ((), (stop_text,)), ([stop_id], (stop_text,))):
        params = SamplingParams(max_new_tokens=13, stop=stop)
        ref = generate_ids(model, tok, prompts, params, stop_ids=stop_ids, decoder="model")
        fast = generate_ids(model, tok, prompts, params, stop_ids=stop_ids, decoder=decoder)
        assert [(c.token_ids, c.text, c.finish_reason) for c in fast] == \
            [(c.token_ids, c.text, c.finish_reason) for c in ref]
        assert "stop" in [c.finish_reason for c in fast] and "length" in [c.finish_reason for c in fast]
    # Up to the context's end: the last chunk's extra positions (past n_ctx - 1) must not fail.
    n_ctx = model.config.n_ctx
    long_prompts = [list(range(n_ctx - 6)), [7] * (n_ctx - 9), [3] * 5, [9] * (n_ctx - 7)]  # batch 4: one graph
    params = SamplingParams(max_new_tokens=6)
    ref = generate_ids(model, tok, long_prompts, params, decoder="model")
    assert [c.token_ids for c in generate_ids(model, tok, long_prompts, params, decoder=decoder)] == \
        [c.token_ids for c in ref]


def test_capacity_bucket():
    assert capacity_bucket(100, 2048) == 128
    assert capacity_bucket(128, 2048) == 128
    assert capacity_bucket(200, 256) == 256
    assert capacity_bucket(300, 256) == 300  # past the context: exactly what is needed


def test_compiled_decode_step_gives_transformers_greedy_tokens():
    """One compiled graph for all steps; greedy tokens equal transformers' generate and the eager decoders."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(5)
    cfg = ModelConfig(vocab_size=320, n_layer=2, n_embd=64, n_head=4, rotary_dim=8, n_ctx=128, mp_num=4)
    model = CodeGenModel(cfg).eval()
    hf = transformers.CodeGenForCausalLM(transformers.CodeGenConfig(
        vocab_size=320, n_positions=128, n_ctx=128, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(name.endswith("embed_positions") for name in missing)
    prompts = torch.randint(0, 316, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=20,
                          min_new_tokens=20, pad_token_id=0)[:, 9:].tolist()
    tok, params = CharTokenizer(), SamplingParams(max_new_tokens=20)
    for decoder in ("model", "fast", "compiled"):
        out = generate_ids(model, tok, prompts.tolist(), params, decoder=decoder)
        assert [c.token_ids for c in out] == ref, decoder
    # The same shapes again: no recompilation (the graph is reused), still the same tokens.
    compiled = len(FastDecoder.compile_events)
    again = generate_ids(model, tok, prompts.tolist(), params, decoder="compiled")
    assert [c.token_ids for c in again] == ref
    # Other prompt lengths, generation lengths and cache capacities: the attended length is a dynamic
    # dimension, so the same graph serves them (no compile), and the tokens are still the model decoder's.
    for length, new_tokens in ((3, 40), (30, 70)):
        other = torch.randint(0, 316, (2, length), generator=torch.Generator().manual_seed(length)).tolist()
        params = SamplingParams(max_new_tokens=new_tokens)
        expected = [c.token_ids for c in generate_ids(model, tok, other, params, decoder="model")]
        assert [c.token_ids for c in generate_ids(model, tok, other, params, decoder="compiled")] == expected
    assert len(FastDecoder.compile_events) == compiled


@ARCHS
def test_fast_decoder_skips_columns_before_first_without_changing_logits(arch):
    """`step(tokens, first)` attends from `first` on (the server's rows all start there): same logits as from 0."""
    model = small_model(arch)
    ids = torch.randint(0, 300, (2, 70))
    with torch.no_grad():
        cache = KVCache(model.config, 2, 70)
        cache.valid[:, :37] = False  # columns no row may see (another row's, or padding)
        cache.has_padding = True
        model(ids[:, :40], position_ids=(torch.arange(40) - 37).clamp_min(0).expand(2, 40), cache=cache)
        whole, skipping = FastDecoder(model, 2, 80), FastDecoder(model, 2, 80)
        for decoder in (whole, skipping):
            decoder.start(cache, torch.full((2,), 3))
        for t in range(40, 70):
            assert torch.equal(whole.step(ids[:, t]), skipping.step(ids[:, t], first=37))
        with pytest.raises(ValueError, match="outside the filled cache"):
            skipping.step(ids[:, 0], first=71)


def _run_dir(directory: Path) -> Path:
    from codegen2.tokenizer import train_tokenizer

    tokenizer = train_tokenizer([Path(torch.__file__).read_text(encoding="utf-8")], vocab_size=512, num_masks=4)
    config = Config(model=ModelConfig(vocab_size=512, n_layer=2, n_embd=64, n_head=4, rotary_dim=16, n_ctx=64,
                                      mp_num=2),
                    tokenizer=TokenizerConfig(vocab_size=512, num_masks=4), train=TrainConfig(seq_len=32))
    torch.manual_seed(0)
    directory.mkdir(parents=True)
    save_config(config, directory / "config.toml")
    tokenizer.save(directory)
    write_checkpoint(directory, 0, CodeGenModel(config.model).state_dict(), {"tokens_seen": 0})
    return directory


def test_inference_loading_uses_the_decode_layout_and_keeps_the_state_dict(tmp_path):
    run = _run_dir(tmp_path / "run")
    plain = load_checkpoint(run, inference=False).model
    loaded = load_checkpoint(run).model
    assert plain.lm_head.weight.is_contiguous() and not loaded.lm_head.weight.is_contiguous()
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        assert (loaded(ids) - plain(ids)).abs().max() <= 1e-5
        FastDecoder(loaded, 1, 16)  # fuses the block weights in place
        assert (loaded(ids) - plain(ids)).abs().max() <= 1e-5
    state = loaded.state_dict()
    for name, value in plain.state_dict().items():
        assert torch.equal(state[name], value), name
    # Trained after all that, it follows the plain model step for step (same values, only strides differ).
    for model in (plain, loaded):
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            optimizer.zero_grad()
            model(ids).logsumexp(-1).mean().backward()
            optimizer.step()
    state = loaded.state_dict()
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ["qwen2", "starcoder2"])
def test_family_step_reads_the_models_own_rows_and_a_batch_gives_each_rows_logits(arch):
    """The Qwen2/StarCoder2 step reads [out, in] views of the model's own weights (no second copy, whatever
    layout loading gave them), and a batch (oneDNN's kernel) gives every row its one-row (MKL) logits."""
    extra = {"sliding_window": 6} if arch == "starcoder2" else {}
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, vocab_size=300, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                                    rotary_dim=16, n_inner=96, n_ctx=64, tie_word_embeddings=True, **extra)).eval()
    for module in model.modules():  # an input-major copy, as the CodeGen decode layout makes
        if isinstance(module, torch.nn.Linear):
            module.weight.data = module.weight.data.t().contiguous().t()
    ids = torch.randint(0, 300, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        batched = FastDecoder(model.use_decode_layout(), 3, 24)
        storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        matrices = [w for layer in batched.weights[0] for w in layer if isinstance(w, torch.Tensor) and w.dim() == 2]
        assert all(w.is_contiguous() and w.untyped_storage().data_ptr() in storages
                   for w in matrices + [batched.weights[1][2]])
        cache = KVCache(model.config, 3, 8)
        model(ids[:, :8], cache=cache)
        batched.start(cache, torch.full((3,), 8))
        rows = []
        for row in range(3):
            alone = KVCache(model.config, 1, 8)
            model(ids[row:row + 1, :8], cache=alone)
            rows.append(FastDecoder(model, 1, 24))
            rows[-1].start(alone, torch.full((1,), 8))
        for t in range(8, 20):
            together = batched.step(ids[:, t])
            for row, decoder in enumerate(rows):
                one = decoder.step(ids[row:row + 1, t])[0]
                assert (together[row] - one).abs().max() <= 2e-5 and (one - full[row, t]).abs().max() <= 2e-5


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_one_row_decoder_reads_input_major_views_and_gives_the_plain_decoders_tokens(arch):
    """A batch-1 float32 decoder moves the fused q/k/v and gate/up rows of a LLaMA/Qwen2 model into input-major
    buffers that the model's own weights are views of (no second copy, state dict unchanged, its forward
    unchanged); a batch of several rows moves them back to [out, in]; greedy tokens equal the "model" decoder's
    (the model's forward with a KV cache) in either order."""
    torch.manual_seed(3)
    model = build_model(ModelConfig(**{**SMALL["llama"], "arch": arch, "n_layer": 3,
                                       "tie_word_embeddings": arch == "qwen2"})).eval()
    state = {name: value.clone() for name, value in model.state_dict().items()}
    ids = torch.randint(0, 290, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        forward = model(ids)
    before = sum(p.untyped_storage().nbytes() for p in model.parameters())
    tokenizer = CharTokenizer()
    prompts = [[int(t) for t in torch.randint(0, 290, (n,), generator=torch.Generator().manual_seed(n))]
               for n in (5, 9)]
    params = SamplingParams(max_new_tokens=12)
    plain = [c.token_ids for c in generate_ids(model, tokenizer, prompts, params, decoder="model")]
    plain_one = [c.token_ids for c in generate_ids(model, tokenizer, prompts[1:], params, decoder="model")]
    for batch_first in (False, True):
        if batch_first:
            assert [c.token_ids for c in generate_ids(model, tokenizer, prompts, params, decoder="fast")] == plain
        assert [c.token_ids for c in generate_ids(model, tokenizer, prompts[1:], params, decoder="fast")] == plain_one
    one = FastDecoder(model, 1, 24)
    layers = one.weights[0]
    for layer in layers:
        for fused in (layer[1], layer[5]):  # w_qkv, w_gate_up
            assert not fused.is_contiguous() and fused.t().is_contiguous()
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert {w.untyped_storage().data_ptr() for layer in layers for w in (layer[1], layer[5])} <= storages
    assert sum(p.untyped_storage().nbytes() for p in {p.untyped_storage().data_ptr(): p
                                                      for p in model.parameters()}.values()) <= before
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    with torch.no_grad():
        torch.testing.assert_close(model(ids), forward, rtol=1e-5, atol=1e-5)
    several = FastDecoder(model, 2, 24)
    assert all(layer[1].is_contiguous() and layer[5].is_contiguous() for layer in several.weights[0])


@pytest.mark.skipif(sys.platform != "linux", reason="huge pages are asked for with Linux's madvise")
def test_float32_decode_weights_move_onto_huge_pages_once_and_decode_the_same_tokens():
    """A float32 Qwen2 decoder on the CPU moves each matrix of at least 2 MiB (here the tied 8192 x 64 table)
    to a 2 MiB boundary, once: a second decoder moves nothing; values, state dict and tokens stay the same."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**SMALL["llama"], "arch": "qwen2", "vocab_size": 8192,
                                       "tie_word_embeddings": True})).eval()
    state = {name: value.clone() for name, value in model.state_dict().items()}
    tokenizer = CharTokenizer()
    prompts = [[int(t) for t in torch.randint(0, 290, (7,), generator=torch.Generator().manual_seed(1))]]
    params = SamplingParams(max_new_tokens=10)
    plain = [c.token_ids for c in generate_ids(model, tokenizer, prompts, params, decoder="model")]
    assert [c.token_ids for c in generate_ids(model, tokenizer, prompts, params, decoder="fast")] == plain
    table = model.model.embed_tokens.weight
    assert table.data_ptr() % HUGE_PAGE == 0 and FastDecoder(model, 1, 24).weights[1][2] is table
    assert model.model.embed_tokens.weight.data_ptr() == table.data_ptr()
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
