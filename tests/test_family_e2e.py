"""Each family end to end through the CLI, from a local Hugging Face directory of random weights that transformers
writes here, with a tokenizer trained by `tokenizers` carrying the family's special tokens and a
tokenizer_config.json shaped like the published one (bos/eos, add_bos_token, the FIM token names):

load -> sample -> infill (format detected) -> eval heldout (its infill metric) and infill-single -> serve
(llama.vscode's /infill and Tabby's /v1/completions with suffix + stream) -> train --init-from -> export-hf,
which keeps the family's tokenizer files and special tokens and loads in transformers (no remote code) with
equal logits.

The references: transformers' own model for the logits; `codegen2.infill.build_infill` (checked id for id against
the model cards in test_infill_formats.py) and `generate_ids` for what the server and the infill command return.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from codegen2 import cli
from codegen2.generation.sampling import SamplingParams, generate_ids
from codegen2.infill import Specials, build_infill, infill_stop_ids, resolve_format
from codegen2.loading import load_checkpoint
from test_infill_formats import CORPUS
from test_infill_formats import FAMILIES as SPECIAL_TOKENS

transformers = pytest.importorskip("transformers")
pytest.importorskip("uvicorn")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 400
N_CTX = 256

# tokenizer_config.json as the published models write it (the keys that decide the tokens; chat templates and
# the added_tokens_decoder tables left out).
TOKENIZER_CONFIGS = {
    "qwen": {  # Qwen/Qwen2.5-Coder-0.5B
        "add_prefix_space": False, "bos_token": None, "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>", "errors": "replace", "model_max_length": 32768, "pad_token": "<|endoftext|>",
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None},
    "starcoder2": {  # bigcode/starcoder2-3b
        "add_prefix_space": False, "bos_token": "<|endoftext|>", "clean_up_tokenization_spaces": True,
        "eos_token": "<|endoftext|>", "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "GPT2Tokenizer", "unk_token": "<|endoftext|>", "vocab_size": 49152},
    "deepseek": {  # deepseek-ai/deepseek-coder-1.3b-base
        "add_bos_token": True, "add_eos_token": False,
        "bos_token": {"__type": "AddedToken", "content": "<｜begin▁of▁sentence｜>", "lstrip": False,
                      "normalized": True, "rstrip": False, "single_word": False},
        "clean_up_tokenization_spaces": False,
        "eos_token": {"__type": "AddedToken", "content": "<｜end▁of▁sentence｜>", "lstrip": False,
                      "normalized": True, "rstrip": False, "single_word": False},
        "legacy": True, "model_max_length": 16384, "pad_token": {
            "__type": "AddedToken", "content": "<｜end▁of▁sentence｜>", "lstrip": False, "normalized": True,
            "rstrip": False, "single_word": False},
        "sp_model_kwargs": {}, "unk_token": None, "tokenizer_class": "LlamaTokenizerFast"},
    "codellama": {  # codellama/CodeLlama-7b-hf
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "clean_up_tokenization_spaces": False,
        "eos_token": "</s>", "eot_token": "▁<EOT>", "fill_token": "<FILL_ME>", "legacy": None,
        "middle_token": "▁<MID>", "model_max_length": 1000000000000000019884624838656, "pad_token": None,
        "prefix_token": "▁<PRE>", "sp_model_kwargs": {}, "suffix_token": "▁<SUF>",
        "tokenizer_class": "CodeLlamaTokenizer", "unk_token": "<unk>", "use_default_system_prompt": False},
}

# (transformers config class, shape, the infill format it detects, config.json's bos/eos token names)
SHAPES = {
    "qwen": ("Qwen2Config", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                                 rope_theta=1e6, tie_word_embeddings=True), "qwen",
             ("<|endoftext|>", "<|endoftext|>")),
    "starcoder2": ("Starcoder2Config", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                            intermediate_size=128, sliding_window=24, rope_theta=999999.4,
                                            tie_word_embeddings=True), "starcoder2",
                   ("<|endoftext|>", "<|endoftext|>")),
    "deepseek": ("LlamaConfig", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                                     intermediate_size=96, rope_theta=1e5,
                                     rope_scaling={"type": "linear", "factor": 4.0}, tie_word_embeddings=False),
                 "deepseek", ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>")),
    "codellama": ("LlamaConfig", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                                      intermediate_size=96, rope_theta=1e6, tie_word_embeddings=False),
                  "codellama", ("<s>", "</s>")),
}


def train_family_tokenizer(directory: Path, family: str):
    """A small BPE with the family's special tokens (see test_infill_formats) and the published config's shape."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = SPECIAL_TOKENS[family][0]
    if family == "codellama":  # SentencePiece-style: Metaspace, no byte-level alphabet
        backend = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = []
    else:
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, show_progress=False, initial_alphabet=alphabet,
                                  special_tokens=[AddedToken(t, special=True, normalized=False) for t in specials])
    backend.train_from_iterator(CORPUS, trainer)
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIGS[family]), encoding="utf-8")
    return backend


def make_family_dir(directory: Path, family: str) -> Path:
    """A transformers model of the family's shape with random weights, its tokenizer beside it."""
    directory.mkdir(parents=True)
    backend = train_family_tokenizer(directory, family)
    config_class, shape, _, (bos, eos) = SHAPES[family]
    config = getattr(transformers, config_class)(
        vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=N_CTX, bos_token_id=backend.token_to_id(bos),
        eos_token_id=backend.token_to_id(eos), **shape)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # large enough weights that greedy text is not one repeated token
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    model.save_pretrained(directory)
    return directory


FAMILY_NAMES = list(SHAPES)


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family(request, tmp_path_factory):
    name = request.param
    root = tmp_path_factory.mktemp(f"family_{name}")
    hf_dir = make_family_dir(root / "hf", name)
    return type("Family", (), {"name": name, "root": root, "hf_dir": hf_dir, "fmt": SHAPES[name][2],
                               "loaded": load_checkpoint(hf_dir)})


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


PREFIX, SUFFIX = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"


def test_loads_with_the_familys_tokens_and_transformers_logits(family):
    loaded, hf_dir = family.loaded, family.hf_dir
    tok = loaded.tokenizer
    eos = SHAPES[family.name][3][1]
    assert tok.eot_id == tok.token_ids[eos]
    assert tok.add_bos == (family.name in ("deepseek", "codellama"))
    assert loaded.config.rope_scaling_factor == (4.0 if family.name == "deepseek" else 1.0)  # linear, as 1.3B's
    reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = torch.tensor([tok.encode_document("def add(a, b):\n    return a + b\n")])
    with torch.no_grad():
        assert (loaded.model(ids) - reference(ids).logits).abs().max() <= 1e-4


def test_sample_and_infill_commands(family, capsys):
    loaded, tok = family.loaded, family.loaded.tokenizer
    code, out, err = run_cli(["sample", "--checkpoint", str(family.hf_dir), "--prompt", "def add(",
                              "--max-new-tokens", "6", "--device", "cpu", "--decoder", "fast"], capsys)
    assert code == 0, err
    ref = generate_ids(loaded.model, tok, [tok.encode("def add(")], SamplingParams(max_new_tokens=6))[0]
    assert out == "def add(" + ref.text + "\n"

    code, out, err = run_cli(["infill", "--checkpoint", str(family.hf_dir), "--prefix", PREFIX, "--suffix", SUFFIX,
                              "--max-new-tokens", "8", "--device", "cpu", "--decoder", "fast"], capsys)
    assert code == 0, err
    fmt = resolve_format(None, loaded.config.arch, Specials.of(tok))
    assert fmt.name == family.fmt
    ids = build_infill(tok, PREFIX, SUFFIX, fmt)
    if tok.add_bos:
        assert ids[0] == tok.bos_id
    ref = generate_ids(loaded.model, tok, [ids], SamplingParams(max_new_tokens=8),
                       stop_ids=list(infill_stop_ids(Specials.of(tok), fmt)))[0]
    assert out == ref.text + "\n"


def test_eval_heldout_scores_infill_in_the_familys_format(family, capsys):
    code, out, err = run_cli(["eval", "heldout", "--checkpoint", str(family.hf_dir), "--max-tokens", "600",
                              "--n-infill", "3", "--batch-size", "3", "--device", "cpu", "--json",
                              "--out", str(family.root / "heldout.json")], capsys)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["infill"]["format"] == family.fmt and result["infill"]["tasks"] == 3
    assert f"{family.fmt} infill format" in err
    losses = [v["loss"] for k, v in result.items() if k in ("code", "nl") and "loss" in v]
    assert losses and all(0 < x < 20 for x in losses)


def test_eval_infill_single_samples_in_the_familys_format(family, capsys):
    out_dir = family.root / "infill-single"
    code, out, err = run_cli(["eval", "infill-single", "--checkpoint", str(family.hf_dir), "--out", str(out_dir),
                              "--n", "1", "--limit", "2", "--max-new-tokens", "8", "--workers", "1", "--k", "1",
                              "--device", "cpu", "--decoder", "fast", "--no-progress"], capsys)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == {"pass@1": 0.0}  # random weights
    samples = [json.loads(line) for line in (out_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and all(isinstance(s["completion"], str) for s in samples)


# ------------------------------------------------------------------------------------------------- serving
def llama_vscode_body(prefix: str, suffix: str, prompt: str, chunks: list[dict]) -> dict:
    """llama.vscode's `createRequestPayload` with its defaults (see test_editors.py for the source it cites);
    greedy and short here so that the reference is exact and quick."""
    return {"id_slot": 0, "input_prefix": prefix, "input_suffix": suffix, "input_extra": chunks, "prompt": prompt,
            "n_predict": 12, "n_cmpl": 3, "top_k": 40, "top_p": 0.99, "stream": False, "temperature": 0.0,
            "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True, "n_indent": 4,
            "t_max_prompt_ms": 500, "t_max_predict_ms": 1000}


CHUNKS = [{"text": "def helper(x):\n    return x * 2\n", "time": 1733580000000, "filename": "/src/util.py"}]


@pytest.fixture(scope="module")
def served(family):
    """`codegen2 serve` on the family's HF directory, in a child process as users run it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "codegen2.cli", "serve", "--checkpoint", str(family.hf_dir),
                             "--port", str(port), "--model-name", "m", "--threads", "1", "--decoder", "fast",
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                httpx.get(url + "/health", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def reference_text(loaded, ids: list[int], fmt: str, max_tokens: int) -> str:
    specials = Specials.of(loaded.tokenizer)
    return generate_ids(loaded.model, loaded.tokenizer, [ids], SamplingParams(max_new_tokens=max_tokens),
                        stop_ids=list(infill_stop_ids(specials, fmt)))[0].text


def test_serve_infill_as_llama_vscode_sends_it(family, served):
    from codegen2.infill import infill_prompt, repo_context

    prefix, suffix, prompt = "def area(r):\n", "\n    return result\n", "    result = "
    r = httpx.post(served + "/infill", json=llama_vscode_body(prefix, suffix, prompt, CHUNKS), timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    tok = family.loaded.tokenizer
    specials, fmt = Specials.of(tok), resolve_format(None, family.loaded.config.arch, Specials.of(tok))
    files = [(c["filename"], c["text"]) for c in CHUNKS]
    context = repo_context(specials, fmt, tok.encode, files)  # Qwen's and StarCoder2's repository layouts
    assert bool(context) == (family.name in ("qwen", "starcoder2"))
    assert out["input_extra_dropped"] == (0 if context else 1)
    suffix_ids = tok.encode(suffix) if fmt.suffix_space else tok.encode_suffix(suffix)
    ids = infill_prompt(specials, tok.encode(prefix) + tok.encode(prompt), suffix_ids, fmt, context)
    assert out["tokens_evaluated"] == len(ids) and out["tokens_predicted"] > 0
    assert out["content"] == reference_text(family.loaded, ids, fmt, 12)


def test_serve_tabby_completion_with_suffix_streams_the_infill(family, served):
    # Tabby's openai/completion backend (TabbyML/tabby crates/http-api-bindings/src/completion/openai.rs).
    prefix, suffix = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"
    body = {"model": "m", "prompt": prefix, "suffix": suffix, "max_tokens": 12, "temperature": 0.0,
            "stream": True, "presence_penalty": 0.0}
    text = ""
    with httpx.stream("POST", served + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text += json.loads(line[6:])["choices"][0]["text"]
    tok = family.loaded.tokenizer
    ids = build_infill(tok, prefix, suffix, family.fmt)
    assert text == reference_text(family.loaded, ids, family.fmt, 12)


# ------------------------------------------------------------------------------ continued training and export
@pytest.fixture(scope="module")
def trained(family, small_corpus, tmp_path_factory):
    """`codegen2 train --init-from HF_DIR` for two steps (the fine-tuning recipe, shrunk to tiny batches)."""
    import contextlib
    import io

    run = family.root / "run"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["train", "--init-from", str(family.hf_dir), "--data", str(small_corpus), "--out", str(run),
                         "--max-steps", "2", "--set", "train.num_threads=1", "--set", "train.seq_len=64",
                         "--set", "train.micro_batch_size=2", "--set", "train.grad_accum=1",
                         "--set", "train.lr=1e-3", "--set", "train.warmup_steps=0"])
    assert code == 0, err.getvalue()
    return run, out.getvalue() + err.getvalue()


def test_train_init_from_continues_with_fim_in_the_familys_format(family, trained):
    from codegen2.checkpoint import list_checkpoints

    run, log = trained
    assert f"FIM in the model's {family.fmt} format" in log and "done: 2 steps" in log
    assert list_checkpoints(run)[-1].name.endswith("2")
    tok = load_checkpoint(run).tokenizer
    assert tok.token_ids == family.loaded.tokenizer.token_ids and tok.eot_id == family.loaded.tokenizer.eot_id
    assert (tok.bos_id, tok.add_bos) == (family.loaded.tokenizer.bos_id, family.loaded.tokenizer.add_bos)


def test_export_hf_keeps_the_familys_tokenizer_and_loads_in_transformers(family, trained, capsys):
    from safetensors import safe_open

    from codegen2.checkpoint import list_checkpoints

    run, _ = trained
    out = family.root / "exported"
    code, _, err = run_cli(["export-hf", str(run), str(out)], capsys)
    assert code == 0, err
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert json.loads((out / name).read_text()) == json.loads((family.hf_dir / name).read_text()), name
    source = json.loads((family.hf_dir / "config.json").read_text())
    exported = json.loads((out / "config.json").read_text())
    for key in ("model_type", "architectures", "bos_token_id", "eos_token_id", "rope_theta", "rope_scaling",
                "sliding_window", "tie_word_embeddings", "max_position_embeddings"):
        if key in source:
            assert exported.get(key) == source[key], key
    # The tensors transformers itself wrote (a tied model: no separate lm_head.weight), in the run too.
    names = {f: set(safe_open(str(f), "pt").keys()) for f in (family.hf_dir / "model.safetensors",
                                                               out / "model.safetensors",
                                                               list_checkpoints(run)[-1] / "model.safetensors")}
    assert len(set(map(frozenset, names.values()))) == 1, names
    assert ("lm_head.weight" in names[out / "model.safetensors"]) == (not source.get("tie_word_embeddings", True))
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    want_bos, want_eos = SHAPES[family.name][3]
    assert hf_tok.eos_token == want_eos and hf_tok.bos_token == (None if family.name == "qwen" else want_bos)
    source_rope, exported_rope = (transformers.AutoConfig.from_pretrained(d).rope_parameters
                                  for d in (family.hf_dir, out))
    assert {k: source_rope[k] for k in ("rope_type", "rope_theta", "factor") if k in source_rope} == \
        {k: exported_rope[k] for k in ("rope_type", "rope_theta", "factor") if k in source_rope}
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ours = load_checkpoint(run)
    ids = torch.tensor([ours.tokenizer.encode_document("def add(a, b):\n    return a + b\n")])
    with torch.no_grad():
        assert (model(ids).logits - ours.model(ids)).abs().max() <= 1e-4
        assert (model(ids).logits - family.loaded.model(ids)).abs().max() > 1e-3  # the trained weights, not the source
