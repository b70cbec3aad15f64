"""Today's code-model families (DESIGN §7): Qwen2, LLaMA with linear rope scaling, StarCoder2 and its sliding window.

The references are transformers' own Qwen2ForCausalLM, LlamaForCausalLM and Starcoder2ForCausalLM with random
weights, loaded from a directory transformers writes; the sliding-window mask rule is checked against a naive
double loop; presets against transformers' parameter counts on the meta device.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

from arch_checks import (
    check_against_transformers,
    check_engine_matches_solo_runs,
    check_low_precision_decoding,
    max_diff,
    randomize,
)
from codegen2 import from_pretrained
from codegen2.config import ConfigError, ModelConfig, dump_toml, load_config
from codegen2.errors import UserError
from codegen2.generation.decoder import FastDecoder
from codegen2.masks import build_attention_mask, decode_step_bias, forward_attention_mask
from codegen2.models import architecture, build_model
from codegen2.models.common import KVCache
from test_masks import _Cache, naive_mask, random_doc_ids

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # (fixture in conftest.py)

VOCAB = 512


# ----------------------------------------------------------------------------------------- the window rule
def naive_windowed(doc_ids, prefix_len, batch, T, window, past_len=0, key_valid=None) -> np.ndarray:
    """masks.py's rule by loops, then the band |i - j| < window over absolute positions."""
    mask = naive_mask(doc_ids, prefix_len, batch, T, past_len=past_len, key_valid=key_valid)
    queries = np.arange(past_len, past_len + T)[:, None]
    keys = np.arange(past_len + T)[None, :]
    return mask & (np.abs(queries - keys) < window)[None, None]


def test_window_mask_matches_naive_rule_with_documents_prefix_cache_and_padding():
    rng = np.random.default_rng(5)
    for trial in range(80):
        batch, T, past = int(rng.integers(1, 4)), int(rng.integers(1, 14)), int(rng.integers(0, 6)) * (trial % 2)
        window = int(rng.integers(1, past + T + 2))
        docs = random_doc_ids(rng, batch, past + T) if trial % 3 else None
        prefix = rng.integers(0, past + T + 1, size=batch) if trial % 4 else None
        valid = rng.random((batch, past + T)) < 0.8 if past else None
        got = build_attention_mask(
            None if docs is None else torch.tensor(docs[:, past:]),
            None if prefix is None else torch.tensor(prefix), T, past_len=past,
            key_valid=None if valid is None else torch.tensor(valid),
            past_doc_ids=None if docs is None else torch.tensor(docs[:, :past]), window=window)
        want = naive_windowed(docs, prefix, batch, T, window, past_len=past, key_valid=valid)
        np.testing.assert_array_equal(got.expand(batch, 1, T, past + T).numpy(), want, err_msg=f"trial {trial}")


def test_a_bidirectional_prefix_longer_than_the_window_is_windowed_both_ways():
    mask = build_attention_mask(None, torch.tensor([6]), 8, window=3)[0, 0]
    assert mask[0].tolist() == [True, True, True, False, False, False, False, False]  # forward, within the prefix
    assert mask[5].tolist() == [False, False, False, True, True, True, False, False]
    assert mask[7].tolist() == [False, False, False, False, False, True, True, True]  # causal after it


def test_window_decode_step_bias_and_forward_mask_match_naive_rule():
    rng = np.random.default_rng(9)
    batch, capacity = 3, 12
    for col in range(capacity):
        for window in (1, 3, 5, 20):
            valid = torch.from_numpy(rng.random((batch, capacity)) < 0.7)
            valid[:, col] = True
            bias = decode_step_bias(valid, torch.tensor(col), torch.float32, window)
            want = naive_windowed(None, None, batch, 1, window, past_len=col, key_valid=valid[:, : col + 1].numpy())
            assert torch.equal(torch.isfinite(bias[..., : col + 1]), torch.from_numpy(want))
            assert torch.isinf(bias[..., col + 1:]).all()
    for past, T, window in [(0, 9, 4), (6, 1, 4), (6, 3, 4), (2, 1, 8), (0, 5, 8)]:
        valid = torch.ones(2, past + T, dtype=torch.bool)
        cache = _Cache(valid, past) if past else None
        mask = forward_attention_mask(None, None, T, torch.device("cpu"), cache, window=window)
        want = naive_windowed(None, None, 2, T, window, past_len=past)
        if mask is None:  # the window does not bite: SDPA's causal (or all-keys) rule is the answer
            assert past + T <= window
            mask = torch.from_numpy(naive_mask(None, None, 2, T, past_len=past))
        assert torch.equal(mask.expand(2, 1, T, past + T), torch.from_numpy(want))


# ------------------------------------------------------------------------------ logits against transformers
def _llama(**shape):
    return transformers.LlamaConfig(**shape)


def _qwen2(**shape):
    return transformers.Qwen2Config(**shape)


def _starcoder2(**shape):
    return transformers.Starcoder2Config(**shape)


def linear_rope(factor: float, theta: float) -> dict:
    return {"rope_parameters": {"rope_type": "linear", "factor": factor, "rope_theta": theta}}


# (id, config maker, expected arch, shape): GQA and MHA, tied and untied, windows shorter than the sequence.
FAMILIES = [
    ("llama-linear4-gqa", _llama, "llama", dict(hidden_size=60, num_attention_heads=5, num_key_value_heads=1,
                                                num_hidden_layers=2, intermediate_size=128, **linear_rope(4.0, 1e5))),
    ("llama-linear2.5-mha-tied", _llama, "llama", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                                                       num_hidden_layers=2, intermediate_size=96,
                                                       tie_word_embeddings=True, **linear_rope(2.5, 1e4))),
    ("qwen2-gqa-tied", _qwen2, "qwen2", dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
                                             num_hidden_layers=2, intermediate_size=160, tie_word_embeddings=True,
                                             rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    ("qwen2-mha-untied", _qwen2, "qwen2", dict(hidden_size=84, num_attention_heads=7, num_key_value_heads=7,
                                               num_hidden_layers=1, intermediate_size=64, tie_word_embeddings=False)),
    ("starcoder2-gqa-tied-window7", _starcoder2, "starcoder2",
     dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=160,
          sliding_window=7, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    ("starcoder2-mha-untied-window16", _starcoder2, "starcoder2",
     dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2, intermediate_size=96,
          sliding_window=16, tie_word_embeddings=False)),
    ("starcoder2-gqa-nowindow", _starcoder2, "starcoder2",
     dict(hidden_size=60, num_attention_heads=5, num_key_value_heads=1, num_hidden_layers=3, intermediate_size=128,
          sliding_window=None)),
]


def hf_model(make, shape: dict, seed: int = 0) -> torch.nn.Module:
    config = make(vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=None, eos_token_id=None,
                  pad_token_id=None, **shape)
    return randomize(transformers.AutoModelForCausalLM.from_config(config), seed)


def prompt(batch: int = 3, length: int = 40) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("make, arch, shape", [f[1:] for f in FAMILIES], ids=[f[0] for f in FAMILIES])
def test_transformers_families_load_with_equal_logits_cache_fast_decode_and_greedy(make, arch, shape, tmp_path):
    diffs = check_against_transformers(hf_model(make, shape), tmp_path, prompt())
    cfg = from_pretrained(tmp_path, load_tokenizer=False).config
    assert cfg.arch == arch and cfg.sliding_window == shape.get("sliding_window")
    assert cfg.kv_heads == shape["num_key_value_heads"]
    print(f"{arch} {shape.get('sliding_window')}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))


@pytest.mark.parametrize("make, arch, shape", [f[1:] for f in FAMILIES], ids=[f[0] for f in FAMILIES])
def test_export_mapping_loads_in_transformers_with_equal_logits(make, arch, shape, tmp_path):
    """config_to_hf + state_to_hf (what export-hf writes) load in transformers with no remote code."""
    source = hf_model(make, shape)
    source.save_pretrained(tmp_path / "source")
    ours = from_pretrained(tmp_path / "source", load_tokenizer=False)
    mapping = architecture(ours.config).hf
    out = tmp_path / "export"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(mapping.config_to_hf(ours.config, 0, "float32")))
    state = {k: v.contiguous() for k, v in mapping.state_to_hf(ours.state_dict(), ours.config).items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(exported) is type(source)
    ids = prompt()
    with torch.no_grad():
        assert max_diff(exported(ids).logits, ours(ids)) <= 1e-4
    assert from_pretrained(out, load_tokenizer=False).config == ours.config


@pytest.mark.parametrize("index", [0, 2, 5], ids=[FAMILIES[i][0] for i in (0, 2, 5)])
def test_import_hf_load_and_export_hf_round_trip_each_family(index, tmp_path):
    """import-hf -> run directory -> `loading.load_checkpoint` (also int8) -> export-hf -> transformers, same logits.

    The directory carries a CodeGen2-style tokenizer: the families' own tokenizers are the next step."""
    from codegen2.hf import export_hf, import_hf
    from codegen2.loading import load_checkpoint
    from codegen2.tokenizer import train_tokenizer

    source = hf_model(FAMILIES[index][1], FAMILIES[index][3])
    source.save_pretrained(tmp_path / "source")
    train_tokenizer(["def f(x):\n    return x + 1\n" * 50], vocab_size=VOCAB, num_masks=4).save(tmp_path / "source")
    run = import_hf(tmp_path / "source", tmp_path / "run")
    loaded = load_checkpoint(run)
    assert loaded.config.arch == FAMILIES[index][2] and type(loaded.model) is type(from_pretrained(
        tmp_path / "source", load_tokenizer=False))
    ids = prompt()
    with torch.no_grad():
        reference = source(ids).logits
        assert max_diff(loaded.model(ids), reference) <= 1e-4
        int8 = load_checkpoint(run, dtype="int8").model(ids)
        assert (int8 - reference).norm() < 0.1 * reference.norm()  # int8 rounding of large random weights
    export_hf(run, tmp_path / "exported")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    assert type(exported) is type(source)
    with torch.no_grad():
        assert max_diff(exported(ids).logits, reference) <= 1e-4


@pytest.mark.parametrize("index, legacy", [
    (0, {"rope_theta": 100000, "rope_scaling": {"factor": 4.0, "type": "linear"}}),  # as DeepSeek-Coder 1.3B's
    (3, {"rope_theta": 1000000.0, "rope_scaling": None, "use_sliding_window": False, "sliding_window": 32768,
         "max_window_layers": 21}),  # as Qwen2.5-Coder's
    (4, {"rope_theta": 999999.4420358813, "norm_type": "layer_norm", "mlp_type": "default"}),  # as StarCoder2-3B's
], ids=["deepseek-coder", "qwen25-coder", "starcoder2"])
def test_published_transformers_4_config_keys_load_with_equal_logits(index, legacy, tmp_path):
    """The rotary keys as the published config.json files spell them (`rope_theta`, `rope_scaling` with `type`)."""
    hf_model(FAMILIES[index][1], FAMILIES[index][3]).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("rope_parameters", "layer_types")}
    (tmp_path / "config.json").write_text(json.dumps({**config, **legacy}))
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ours = from_pretrained(tmp_path, load_tokenizer=False)
    assert ours.config.rope_theta == legacy["rope_theta"]
    assert ours.config.rope_scaling_factor == (4.0 if index == 0 else 1.0)
    ids = prompt()
    with torch.no_grad():
        assert max_diff(ours(ids), reference(ids).logits) <= 1e-4


@pytest.mark.parametrize("arch, extra", [("qwen2", {}), ("starcoder2", {"sliding_window": 6}),
                                         ("llama", {"rope_scaling_factor": 4.0})])
def test_int8_and_bf16_weights_decode_as_their_own_forward(arch, extra):
    cfg = ModelConfig(arch=arch, vocab_size=300, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, rotary_dim=16,
                      n_inner=96, n_ctx=64, tie_word_embeddings=True, **extra)
    check_low_precision_decoding(cfg, torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1)))


def test_windowed_training_forward_keeps_packed_documents_apart_and_trains():
    """With document masks and positions restarting per document, a packed row equals each document alone."""
    cfg = ModelConfig(arch="starcoder2", vocab_size=VOCAB, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                      rotary_dim=16, n_inner=96, n_ctx=64, sliding_window=5)
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = prompt(2, 30)
    doc_ids = torch.tensor([[0] * 12 + [1] * 18, [0] * 30])
    positions = torch.cat([torch.arange(12), torch.arange(18)])[None].expand(2, 30).clone()
    positions[1] = torch.arange(30)
    packed = model(ids, doc_ids=doc_ids, position_ids=positions)
    with torch.no_grad():
        alone = torch.cat([model(ids[:1, :12]), model(ids[:1, 12:])], dim=1)
        assert max_diff(packed[:1], alone) <= 1e-5
        assert max_diff(packed[1:], model(ids[1:])) <= 1e-5
    loss = torch.nn.functional.cross_entropy(packed[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("arch, extra", [("starcoder2", {"model.sliding_window": 24, "model.embedding_dropout": 0.1,
                                                         "model.residual_dropout": 0.1,
                                                         "model.attention_dropout": 0.1}), ("qwen2", {})])
def test_families_train_every_objective_and_recomputing_activations_changes_nothing(tiny_config, tmp_path, arch,
                                                                                      extra):
    """Span corruption, FIM and causal LM, prefix-LM, document masks, and a window shorter than train.seq_len;
    StarCoder2's dropouts draw the same masks when the blocks are recomputed."""
    from codegen2.train import train

    shape = {"model.arch": arch, "model.rotary_dim": 16, "model.n_kv_head": 2, "model.n_inner": 96,
             "objective.span_rate": 0.4, "objective.fim_rate": 0.3, "objective.prefix_lm": True,
             "train.document_mask": True, "train.max_steps": 2, **extra}
    plain = train(tiny_config(**shape), tmp_path / "plain")
    recomputed = train(tiny_config(**shape, **{"train.activation_checkpointing": True}), tmp_path / "ac")
    losses = [r["loss"] for r in plain.history]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert load_config(plain.run_dir / "config.toml").model == tiny_config(**shape).model
    assert losses == [r["loss"] for r in recomputed.history]
    assert [r["grad_norm"] for r in plain.history] == [r["grad_norm"] for r in recomputed.history]


@pytest.fixture(scope="module")
def tokenizer():
    import sysconfig

    from codegen2.tokenizer import train_tokenizer

    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [(root / name).read_text(encoding="utf-8") for name in ("argparse.py", "textwrap.py")]
    return train_tokenizer(texts, vocab_size=VOCAB, num_masks=16)


@pytest.mark.parametrize("decoder", ["model", "fast", pytest.param("compiled", marks=pytest.mark.slow)])
def test_left_padded_batch_decodes_transformers_greedy_tokens_past_the_window(decoder, tmp_path):
    """generate_ids over prompts of several lengths (left padding) against transformers' generate of each alone."""
    from codegen2.generation.sampling import SamplingParams, generate_ids
    from conftest import CharTokenizer

    hf = hf_model(_starcoder2, FAMILIES[4][3])  # window 7
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path, load_tokenizer=False)
    prompts = [prompt(1, n)[0].tolist() for n in (3, 9, 14)]
    with torch.inference_mode():
        reference = [hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 do_sample=False, max_new_tokens=12, min_new_tokens=12,
                                 pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    out = generate_ids(ours, CharTokenizer(), prompts, SamplingParams(max_new_tokens=12), decoder=decoder)
    assert [c.token_ids for c in out] == reference


@pytest.mark.parametrize("decoder", ["model", "fast"])
def test_serving_engine_batches_windowed_rows_as_their_solo_runs(tokenizer, decoder):
    """The continuous-batching engine on StarCoder2 with a window shorter than the prompts: each row as alone."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="starcoder2", vocab_size=VOCAB, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                                    rotary_dim=16, n_inner=96, n_ctx=128, sliding_window=6)).eval()
    check_engine_matches_solo_runs(model, tokenizer, decoder)


@pytest.mark.slow
def test_compiled_decode_step_keeps_the_window(tmp_path):
    """The fused step under torch.compile gives the full forward's logits past the window."""
    hf = hf_model(_starcoder2, FAMILIES[4][3])
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path, load_tokenizer=False)
    ids = prompt(2, 30)
    with torch.no_grad():
        full = ours(ids)
        cache = KVCache(ours.config, 2, 40)
        ours(ids[:, :4], cache=cache)
        decoder = FastDecoder(ours, 2, 40, compile=True)
        decoder.start(cache, torch.full((2,), 4))
        assert max(max_diff(decoder.step(ids[:, t]), full[:, t]) for t in range(4, 30)) <= 1e-5


# -------------------------------------------------------------------------------------------------- presets
FAMILY_PRESETS = {
    "qwen25-coder-0.5b": (_qwen2, dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                       num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen25-coder-1.5b": (_qwen2, dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                       num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                       tie_word_embeddings=True)),
    "qwen25-coder-7b": (_qwen2, dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                     num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)),
    "starcoder2-3b": (_starcoder2, dict(vocab_size=49152, hidden_size=3072, intermediate_size=12288,
                                        num_hidden_layers=30, num_attention_heads=24, num_key_value_heads=2)),
    "starcoder2-7b": (_starcoder2, dict(vocab_size=49152, hidden_size=4608, intermediate_size=18432,
                                        num_hidden_layers=32, num_attention_heads=36, num_key_value_heads=4)),
    "deepseek-coder-1.3b": (_llama, dict(vocab_size=32256, hidden_size=2048, intermediate_size=5504,
                                         num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16)),
    "codellama-7b": (_llama, dict(vocab_size=32016, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                  num_attention_heads=32, num_key_value_heads=32)),
}
# Published sizes (model cards): Qwen2.5-Coder 0.49B / 1.54B / 7.61B, StarCoder2 3.03B / 7.17B, DeepSeek-Coder 1.35B
# (its card says 1.3B), CodeLlama 6.74B.
PUBLISHED_MILLIONS = {"qwen25-coder-0.5b": 494, "qwen25-coder-1.5b": 1544, "qwen25-coder-7b": 7616,
                      "starcoder2-3b": 3030, "starcoder2-7b": 7174, "deepseek-coder-1.3b": 1346, "codellama-7b": 6739}


@pytest.mark.parametrize("name", list(FAMILY_PRESETS))
def test_family_presets_have_transformers_parameter_counts(name):
    cfg = load_config(preset=name).model
    make, shape = FAMILY_PRESETS[name]
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(make(**shape))
        ours = build_model(cfg)
    assert ours.num_parameters() == hf.num_parameters() == architecture(cfg).count_parameters(cfg)
    assert round(ours.num_parameters() / 1e6) == PUBLISHED_MILLIONS[name]
    assert {n: tuple(p.shape) for n, p in ours.named_parameters()} == \
        {n: tuple(p.shape) for n, p in hf.named_parameters()}


def test_new_model_fields_round_trip_through_toml(tmp_path):
    for name in ("starcoder2-3b", "deepseek-coder-1.3b", "qwen25-coder-0.5b"):
        config = load_config(preset=name)
        (tmp_path / "config.toml").write_text(dump_toml(config))
        assert load_config(tmp_path / "config.toml").model == config.model
    assert config.model.sliding_window is None and "sliding_window" not in dump_toml(config)


# ---------------------------------------------------------------------------------------- refused configs
@pytest.fixture()
def family_dirs(tmp_path) -> dict[str, Path]:
    dirs = {}
    for key, index in (("qwen2", 3), ("starcoder2", 6), ("llama", 0)):
        dirs[key] = tmp_path / key
        hf_model(FAMILIES[index][1], FAMILIES[index][3]).save_pretrained(dirs[key])
    return dirs


def rewrite_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("family, changes, message", [
    ("qwen2", dict(use_sliding_window=True), "use_sliding_window=True is not supported"),
    ("qwen2", dict(layer_types=["sliding_attention"]), "layer_types=.*only full_attention"),
    ("qwen2", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}),
     "rope_parameters=.*type 'yarn' is not supported"),
    ("llama", dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_scaling=.*type 'dynamic' is not supported"),
    ("llama", dict(rope_parameters={"rope_type": "linear", "factor": -1}), "rope_parameters.factor=-1"),
    ("starcoder2", dict(use_bias=False), "use_bias=False is not supported"),
    ("starcoder2", dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    ("starcoder2", dict(norm_type="rms_norm"), "norm_type='rms_norm' is not supported"),
    ("starcoder2", dict(sliding_window="4096"), "sliding_window='4096' must be an integer"),
    ("starcoder2", dict(sliding_window=0), "sliding_window=0 must be >= 1"),
    ("qwen2", dict(model_type="mistral"), "model_type is 'mistral', but only 'codegen', 'llama', 'qwen2', "
                                          "'starcoder2' are supported"),
])
def test_unsupported_family_configs_are_refused_in_one_line_naming_the_key(family_dirs, family, changes, message):
    rewrite_config(family_dirs[family], **changes)
    with pytest.raises(UserError, match=message) as info:
        from_pretrained(family_dirs[family], load_tokenizer=False)
    assert "config.json" in str(info.value) and "\n" not in str(info.value)


def test_window_and_rope_scaling_are_refused_where_the_architecture_lacks_them():
    with pytest.raises(ConfigError, match="model.sliding_window=8: the qwen2 architecture"):
        architecture(ModelConfig(arch="qwen2", n_embd=64, n_head=4, rotary_dim=16, sliding_window=8))
    with pytest.raises(ConfigError, match="CodeGen has neither"):
        architecture(ModelConfig(rope_scaling_factor=4.0))
    with pytest.raises(ConfigError, match="rope_scaling_factor=0.0 must be positive"):
        ModelConfig(arch="starcoder2", n_embd=64, n_head=4, rotary_dim=16, rope_scaling_factor=0.0).validate()


# ------------------------------------------------------------------------------------------- tied embeddings
def test_a_tied_model_loads_with_or_without_a_stored_lm_head_and_never_writes_one(tmp_path):
    """transformers writes a tied Qwen2 (Qwen2.5-Coder 0.5B/1.5B) without lm_head.weight; some exports store the
    shared table twice. Both load with equal logits; a head that differs from the table is refused in one line;
    import-hf and export-hf write what transformers writes."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from codegen2.hf import export_hf, import_hf
    from codegen2.tokenizer import train_tokenizer

    source = hf_model(*[FAMILIES[2][i] for i in (1, 3)])  # qwen2-gqa-tied
    source.save_pretrained(tmp_path / "tied")
    stored = load_file(str(tmp_path / "tied" / "model.safetensors"))
    assert "lm_head.weight" not in stored
    ids = prompt()
    with torch.no_grad():
        reference = source(ids).logits
    (tmp_path / "twice").mkdir()
    (tmp_path / "twice" / "config.json").write_text((tmp_path / "tied" / "config.json").read_text())
    save_file({**stored, "lm_head.weight": stored["model.embed_tokens.weight"].clone()},
              str(tmp_path / "twice" / "model.safetensors"), metadata={"format": "pt"})
    with torch.no_grad():
        assert max_diff(from_pretrained(tmp_path / "twice", load_tokenizer=False)(ids), reference) <= 1e-4
    train_tokenizer(["def f(x):\n    return x + 1\n" * 50], vocab_size=VOCAB, num_masks=4).save(tmp_path / "twice")
    run = import_hf(tmp_path / "twice", tmp_path / "run")
    export_hf(run, tmp_path / "exported")
    for weights in [*(run / "checkpoints").glob("*/model.safetensors"), tmp_path / "exported" / "model.safetensors"]:
        assert set(safe_open(str(weights), "pt").keys()) == set(stored), weights
    save_file({**stored, "lm_head.weight": stored["model.embed_tokens.weight"] + 1},
              str(tmp_path / "twice" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="lm_head.weight differs from model.embed_tokens.weight") as info:
        from_pretrained(tmp_path / "twice", load_tokenizer=False)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------- StarCoder2's dropouts
def test_starcoder2_dropouts_match_transformers_in_training_and_are_off_in_eval(tmp_path):
    """config.json's three dropout rates: in train mode with one seed the logits equal transformers' (same masks,
    drawn in the same order), in eval mode none apply; export-hf writes them back; LLaMA refuses them."""
    from codegen2.models.starcoder2.hf import config_to_hf

    rates = {"embedding_dropout": 0.1, "residual_dropout": 0.2, "attention_dropout": 0.3}
    source = hf_model(_starcoder2, {**FAMILIES[4][3], **rates})
    source.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path, load_tokenizer=False)
    assert {k: getattr(ours.config, k) for k in rates} == rates
    ids = prompt(2, 20)
    source.train(), ours.train()
    torch.manual_seed(5)
    reference = source(ids).logits
    torch.manual_seed(5)
    trained = ours(ids)
    assert max_diff(trained, reference) <= 1e-5
    source.eval(), ours.eval()
    with torch.no_grad():
        plain = source(ids).logits
        assert max_diff(ours(ids), plain) <= 1e-4
        assert max_diff(trained, plain) > 1e-2  # the masks did apply in training
    assert {k: config_to_hf(ours.config, 0, "float32")[k] for k in rates} == rates
    with pytest.raises(ConfigError, match="model.residual_dropout=0.1: the qwen2 architecture applies no dropout"):
        architecture(ModelConfig(arch="qwen2", n_embd=64, n_head=4, rotary_dim=16, residual_dropout=0.1))
