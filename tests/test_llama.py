"""The LLaMA architecture (CodeGen2.5): logits, decoding, parameter counts and HF interop against transformers.

The reference is transformers' own LlamaForCausalLM with random weights (MHA, GQA, odd head counts, tied
head, a non-default rotary base); the cache and the fused decode step are checked against a full forward.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from arch_checks import check_against_transformers, check_engine_matches_solo_runs, check_low_precision_decoding
from codegen2 import from_pretrained
from codegen2.checkpoint import WEIGHTS, list_checkpoints, write_checkpoint
from codegen2.cli import build_parser
from codegen2.config import Config, ConfigError, ModelConfig, load_config, preset_dict, save_config
from codegen2.errors import UserError
from codegen2.hf import export_hf
from codegen2.models import architecture, build_model
from codegen2.tokenizer import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # (fixture in conftest.py)

VOCAB = 512
# (hidden, heads, kv heads, layers, intermediate, rope_theta, tied)
SHAPES = [
    dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=6, num_hidden_layers=2, intermediate_size=200),
    dict(hidden_size=60, num_attention_heads=5, num_key_value_heads=1, num_hidden_layers=3, intermediate_size=128,
         rope_theta=500000.0),
    dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=160,
         tie_word_embeddings=True),
    dict(hidden_size=84, num_attention_heads=7, num_key_value_heads=7, num_hidden_layers=1, intermediate_size=64),
]
SHAPE_IDS = ["mha-hd16", "gqa5to1-theta5e5", "gqa6to2-tied", "mha7-hd12"]


def hf_llama(shape: dict, seed: int = 0):
    """transformers' LlamaForCausalLM with every parameter random (norm weights too), in eval mode."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, max_position_embeddings=64, rms_norm_eps=1e-5,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=None, **shape)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("layernorm.weight") else 0.0))
    return model


def prompt(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(7))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def tokenizer():
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [(root / name).read_text(encoding="utf-8") for name in ("argparse.py", "textwrap.py")]
    return train_tokenizer(texts, vocab_size=VOCAB, num_masks=16)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_transformers_llama_loads_with_equal_logits_cache_and_fast_decode(shape, tmp_path):
    """Logits, KV cache, fused decode step and greedy tokens against transformers (`transformers_parity`)."""
    check_against_transformers(hf_llama(shape), tmp_path, prompt(3, 40))
    cfg = from_pretrained(tmp_path, load_tokenizer=False).config
    assert cfg.arch == "llama" and cfg.kv_heads == shape["num_key_value_heads"]


def test_codegen25_7b_preset_has_transformers_parameter_count():
    cfg = load_config(preset="codegen25-7b").model
    hf_config = transformers.LlamaConfig(vocab_size=51200, hidden_size=4096, intermediate_size=11008,
                                         num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=2048,
                                         tie_word_embeddings=False)
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hf_config)
        ours = build_model(cfg)
    assert ours.num_parameters() == hf.num_parameters() == architecture(cfg).count_parameters(cfg)
    assert {n: tuple(p.shape) for n, p in ours.named_parameters()} == \
        {n: tuple(p.shape) for n, p in hf.named_parameters()}


def test_llama_tiny_preset_matches_tiny_in_size():
    tiny, llama = load_config(preset="tiny").model, load_config(preset="llama-tiny").model
    assert llama.arch == "llama" and llama.kv_heads < llama.n_head
    a, b = architecture(tiny).count_parameters(tiny), architecture(llama).count_parameters(llama)
    assert abs(a - b) / a < 0.01
    assert preset_dict("llama-tiny")["train"] == preset_dict("tiny")["train"]


def test_llama_config_checks():
    with pytest.raises(ConfigError, match="rotary_dim=32: LLaMA rotates whole heads"):
        architecture(ModelConfig(arch="llama", n_embd=128, n_head=2, rotary_dim=32))
    with pytest.raises(ConfigError, match="must divide model.n_head"):
        ModelConfig(arch="llama", n_embd=120, n_head=6, n_kv_head=4, rotary_dim=20).validate()
    with pytest.raises(ConfigError, match="model.arch='gpt9' must be one of"):
        architecture(ModelConfig(arch="gpt9"))


# ------------------------------------------------------------------------------------ export / import
def make_run(tmp_path: Path, tokenizer, **shape) -> tuple[Path, torch.nn.Module]:
    cfg = ModelConfig(**{**dict(arch="llama", vocab_size=VOCAB, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                                rotary_dim=16, n_inner=96, n_ctx=64, rope_theta=20000.0), **shape})
    torch.manual_seed(3)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    run = tmp_path / "run"
    run.mkdir()
    config = Config(model=cfg)
    config.train.seq_len = 64
    save_config(config, run / "config.toml")
    tokenizer.save(run)
    write_checkpoint(run, 5, model.state_dict(), {"tokens_seen": 123})
    return run, model


def cli(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)  # export-hf lives in codegen2.cli (it merges LoRA runs), import-hf in hf
    return args.func(args)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_export_loads_in_transformers_and_import_round_trips_bitwise(tied, tmp_path, tokenizer):
    run, model = make_run(tmp_path, tokenizer, tie_word_embeddings=tied)
    out = tmp_path / "exported"
    assert cli(["export-hf", str(run), str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert "auto_map" not in config and config["eos_token_id"] == tokenizer.eot_id

    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.num_key_value_heads == 2
    ids = prompt()
    with torch.no_grad():
        assert max_diff(hf(ids).logits, model(ids)) <= 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "def f(x):\n        return x<mask_1>  <sep><eom><|endoftext|>"
    assert hf_tok(text)["input_ids"] == tokenizer.encode(text)

    imported = tmp_path / "imported"
    assert cli(["import-hf", str(out), str(imported)]) == 0
    assert load_config(imported / "config.toml").model == model.config
    exported = load_file(str(out / WEIGHTS))
    reimported = load_file(str(list_checkpoints(imported)[0] / WEIGHTS))
    original = load_file(str(list_checkpoints(run)[0] / WEIGHTS))
    assert exported.keys() == reimported.keys() == original.keys()
    assert ("lm_head.weight" in original) != tied
    for name, tensor in reimported.items():
        assert torch.equal(tensor, exported[name]) and torch.equal(tensor, original[name]), name


@pytest.fixture()
def llama_dir(tmp_path):
    hf_llama(SHAPES[1]).save_pretrained(tmp_path / "good")
    return tmp_path / "good"


def rewrite_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes, message", [
    (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    (dict(attention_bias=True), "attention_bias=True is not supported"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope scaling"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}), "rope scaling"),
    (dict(head_dim=8), "head_dim=8 differs"),
    (dict(intermediate_size=None), "missing or non-integer key.*intermediate_size"),
    (dict(num_key_value_heads=2), "n_kv_head=2 must divide model.n_head=5"),
])
def test_unsupported_llama_configs_are_refused_by_key(llama_dir, changes, message):
    rewrite_config(llama_dir, **changes)
    with pytest.raises(UserError, match=message) as info:
        from_pretrained(llama_dir, load_tokenizer=False)
    assert "config.json" in str(info.value)


def test_mp_num_is_refused_for_llama(llama_dir):
    with pytest.raises(UserError, match="mp_num applies to CodeGen checkpoints only"):
        from_pretrained(llama_dir, mp_num=4, load_tokenizer=False)


@pytest.mark.slow
def test_compiled_decode_step_gives_transformers_greedy_tokens(tmp_path):
    """The fused step under torch.compile (one graph for every step) decodes what transformers' generate does."""
    from codegen2.generation.sampling import SamplingParams, generate_ids
    from conftest import CharTokenizer

    hf = hf_llama(SHAPES[2])
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path, load_tokenizer=False)
    prompts = prompt(2, 9)
    with torch.inference_mode():
        ref = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=16,
                          min_new_tokens=16, pad_token_id=0)[:, 9:].tolist()
    params = SamplingParams(max_new_tokens=16)
    for decoder in ("model", "fast", "compiled"):
        out = generate_ids(ours, CharTokenizer(), prompts.tolist(), params, decoder=decoder)
        assert [c.token_ids for c in out] == ref, decoder


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_int8_and_bf16_weights_decode_as_their_own_forward(tied):
    """`quantize` swaps every Linear / Embedding: llama's forward and fused step both run the swapped weights."""
    cfg = ModelConfig(arch="llama", vocab_size=300, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, rotary_dim=16,
                      n_inner=96, n_ctx=64, tie_word_embeddings=tied)
    check_low_precision_decoding(cfg, torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1)))


LLAMA_TINY_TEST = {"model.arch": "llama", "model.rotary_dim": 16, "model.n_kv_head": 2, "model.n_inner": 96}


def test_every_objective_trains_a_llama_model_and_it_evaluates(tiny_config, tmp_path, capsys):
    """Span corruption, FIM and causal LM in one prefix-LM run with document masks; then eval heldout and
    train.init_from a Hugging Face export of the result."""
    from codegen2.cli import main
    from codegen2.train import train

    config = tiny_config(**LLAMA_TINY_TEST, **{"objective.span_rate": 0.35, "objective.fim_rate": 0.35,
                                               "objective.prefix_lm": True, "train.document_mask": True,
                                               "train.max_steps": 8, "train.checkpoint_every": 8})
    config.data.heldout_fraction = 0.3  # eval heldout scores the held-out documents of the run's prepared data
    result = train(config, tmp_path / "run")
    losses = [r["loss"] for r in result.history]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.3
    seen = {name for r in result.history for name in ("causal", "span", "fim") if f"loss_{name}" in r}
    assert seen == {"causal", "span", "fim"}
    assert main(["eval", "heldout", "--checkpoint", str(tmp_path / "run"), "--max-tokens", "512",
                 "--n-infill", "2"]) == 0
    report = json.loads((tmp_path / "run" / "eval" / "heldout.json").read_text())
    assert report["code"]["tokens"] > 0 and report["code_completion"]["bidirectional"] is True

    export_hf(tmp_path / "run", tmp_path / "hf")
    again = tiny_config(**LLAMA_TINY_TEST, **{"train.max_steps": 1, "train.init_from": str(tmp_path / "hf")})
    first = train(again, tmp_path / "continued").history[0]["loss"]
    fresh = train(tiny_config(**LLAMA_TINY_TEST, **{"train.max_steps": 1}), tmp_path / "fresh").history[0]["loss"]
    assert first < fresh - 0.3  # starts from the trained weights, not from scratch
    untied_from_tied = tiny_config(**LLAMA_TINY_TEST, **{"model.tie_word_embeddings": True, "train.max_steps": 1,
                                                          "train.init_from": str(tmp_path / "hf")})
    with pytest.raises(UserError, match="tie_word_embeddings False vs True"):
        train(untied_from_tied, tmp_path / "tied")


@pytest.mark.parametrize("decoder", ["model", "fast"])
def test_serving_engine_batches_llama_rows_as_their_solo_runs(tokenizer, decoder):
    """The server's continuous-batching engine on a GQA llama: rows join at different steps, each ends as alone."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="llama", vocab_size=VOCAB, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                                    rotary_dim=16, n_inner=96, n_ctx=128)).eval()
    check_engine_matches_solo_runs(model, tokenizer, decoder)
