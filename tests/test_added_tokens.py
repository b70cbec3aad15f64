"""Span corruption on a model whose tokenizer lacks CodeGen2's sentinels (`objective.add_sentinels`): the tokenizer
gains `<sep>`, `<eom>` and `<mask_k>`, the embedding (and untied head) grow, and every command that takes the run
(resume, load, export-hf, --adapter-only for PEFT, --adapter) sees the extended tokenizer and the grown model.
References: transformers (export, resize_token_embeddings), PEFT (trainable_token_indices) and naive layouts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from codegen2 import cli
from codegen2.adapters import adapter_token_rows
from codegen2.checkpoint import WEIGHTS, latest_checkpoint, read_meta
from codegen2.config import ModelConfig, ObjectiveConfig
from codegen2.errors import UserError
from codegen2.loading import load_checkpoint, load_lora_run
from codegen2.models import build_model
from codegen2.models.vocab import grow_model
from codegen2.objectives import decode_span_corruption, objective_rng, span_corrupt_pieces
from codegen2.safetensors_io import read_file
from codegen2.tokenizer import CodeGenTokenizer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TEXT = ["def add(a, b):\n    return a + b\n", "class Stack:\n    def push(self, x):\n        self.items.append(x)\n",
        "for i in range(10):\n    print(i * i)\n", "import os\nprint(os.path.join('a', 'b'))\n"] * 20
QWEN = (["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>"],
        {"eos_token": "<|endoftext|>", "bos_token": None, "added_tokens_decoder": {}})
LLAMA = (["<s>", "</s>"], {"eos_token": "</s>", "bos_token": "<s>", "add_bos_token": True})


def family_directory(directory: Path, family: str) -> Path:
    """A random transformers model of `family` (qwen2: tied head, llama: untied) with a byte-level BPE carrying
    the family's special tokens but none of CodeGen2's; its vocabulary is exactly the tokenizer's."""
    specials, tok_config = QWEN if family == "qwen2" else LLAMA
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(TEXT, trainers.BpeTrainer(
        vocab_size=320, special_tokens=[AddedToken(t, special=True, normalized=False) for t in specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    vocab = backend.get_vocab_size(with_added_tokens=True)
    shapes = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    if family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shapes, tie_word_embeddings=True))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shapes, tie_word_embeddings=False))
    model.save_pretrained(directory)
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_config), encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: family_directory(root / family, family) for family in ("qwen2", "llama")}


def ids_of(tokenizer: CodeGenTokenizer) -> torch.Tensor:
    """Ordinary tokens and the added sentinels in one sequence."""
    text = tokenizer.encode("def add(a, b):\n    return a + b\n")[:6]
    return torch.tensor([text + [tokenizer.mask_id(1), tokenizer.sep_id, tokenizer.eom_id, tokenizer.mask_id(2)]])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# ------------------------------------------------------------------------------------------------- tokenizer
def test_sentinels_go_after_the_last_id_and_transformers_reads_them(hf_dirs, tmp_path):
    base = CodeGenTokenizer.load(hf_dirs["qwen2"])
    extended = base.with_sentinels(4)
    names = ["<sep>", "<eom>", "<mask_1>", "<mask_2>", "<mask_3>", "<mask_4>"]
    assert [extended.token_ids[n] for n in names] == list(range(base.vocab_size, base.vocab_size + 6))
    assert extended.sentinel_rows == range(base.vocab_size, base.vocab_size + 6)
    assert extended.has_sentinels and extended.eot_id == base.eot_id and extended.with_sentinels(4) is extended
    assert base.with_sentinels(4).fingerprint() == extended.fingerprint()  # the same ids on every start
    code = "x = '<sep>'  # <mask_1>\n" + TEXT[1]
    assert extended.encode(code, literal_specials=True) == base.encode(code, literal_specials=True)
    extended.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert len(hf) == extended.vocab_size
    assert hf.convert_tokens_to_ids(names) == [extended.token_ids[n] for n in names]
    assert hf("a<mask_1>b", add_special_tokens=False)["input_ids"] == extended.encode("a<mask_1>b")


def test_span_corruption_on_the_extended_tokenizer_is_the_naive_layout(hf_dirs):
    """The objective's output, rendered as text, is `pre <mask_1> mid ... </s> <sep> <mask_1> span <eom>`
    built by hand from the spans it chose, and that text encodes back to the same ids."""
    tok = CodeGenTokenizer.load(hf_dirs["llama"]).with_sentinels(4)
    cfg = ObjectiveConfig(span_rate=1.0, max_spans=4, span_len_min=1, span_len_max=4, min_doc_tokens=4)
    doc = np.array(tok.encode(TEXT[0] + TEXT[1]) + [tok.eot_id])
    chunk = np.concatenate([doc, tok.encode(TEXT[2] * 3)])  # room for the first piece's sentinels
    special = tok.special_ids()
    for index in range(20):
        piece = span_corrupt_pieces(chunk, objective_rng(0, index), cfg, special)[0]
        assert np.array_equal(decode_span_corruption(piece, special), doc)
        split = int(np.flatnonzero(piece == tok.sep_id)[0])
        body, tail = piece[:split - 1].tolist(), piece[split + 1:].tolist()
        masks = [i for i in body if i in special.masks]
        assert masks == [tok.mask_id(k) for k in range(1, len(masks) + 1)]
        text, spans, eot = "", [], tok.decode([tok.eot_id])
        for run in np.split(np.array(tail), np.flatnonzero(np.array(tail) == tok.eom_id) + 1)[:-1]:
            spans.append(tok.decode(run[1:-1]))
        for token in body:
            text += f"<mask_{masks.index(token) + 1}>" if token in masks else tok.decode([token])
        naive = text + eot + "<sep>" + "".join(f"<mask_{k + 1}>{s}<eom>" for k, s in enumerate(spans))
        assert tok.decode(piece) == naive
        assert tok.encode(naive) == piece.tolist()


def test_grown_vocabulary_keeps_old_rows_and_the_new_rows_are_their_mean():
    for tied in (True, False):
        cfg = ModelConfig(arch="qwen2", vocab_size=50, n_layer=1, n_embd=16, n_head=2, n_kv_head=1, rotary_dim=8,
                          n_inner=32, n_ctx=32, tie_word_embeddings=tied)
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        grown = grow_model(model, 58, range(48, 56))  # the last two rows were a padded table's spare rows
        table, old = grown.model.embed_tokens.weight, model.model.embed_tokens.weight
        assert torch.equal(table[:48], old[:48]) and torch.equal(table[56:], torch.zeros(2, 16))
        assert torch.allclose(table[48:56], old[:48].mean(0).expand(8, 16))
        assert (grown.lm_head is None) == tied
        ids = torch.tensor([[1, 5, 47, 3]])
        with torch.no_grad():  # the tokens the model had keep their logits
            assert max_diff(grown(ids)[..., :48], model(ids)[..., :48]) == 0.0


# ------------------------------------------------------------------------------------------------- full runs
COMMON = ["--data", "{corpus}", "--max-steps", "4", "--checkpoint-every", "2", "--set", "train.seq_len=64",
          "--set", "train.micro_batch_size=2", "--set", "train.grad_accum=1", "--set", "train.num_threads=1",
          "--set", "train.eval_every=0", "--set", "train.lr=5e-3", "--set", "train.warmup_steps=1",
          "--set", "objective.add_sentinels=true", "--set", "tokenizer.num_masks=8", "--set", "objective.max_spans=4"]


def train_cli(hf_dir: Path, corpus: Path, out: Path, *extra: str) -> int:
    args = [a.replace("{corpus}", str(corpus)) for a in COMMON]
    return cli.main(["train", "--init-from", str(hf_dir), *args, "--out", str(out), *extra])


@pytest.fixture(scope="module")
def full_runs(hf_dirs, small_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    for family, hf_dir in hf_dirs.items():
        assert train_cli(hf_dir, small_corpus, root / family) == 0
    return root


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_full_run_trains_span_corruption_and_exports_the_grown_model(family, hf_dirs, full_runs, tmp_path):
    run = full_runs / family
    base = CodeGenTokenizer.load(hf_dirs[family])
    tok = CodeGenTokenizer.load(run)
    assert tok.sentinel_rows == range(base.vocab_size, base.vocab_size + 10)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert any("loss_span" in r for r in log)
    loaded = load_checkpoint(run)
    assert loaded.config.vocab_size == tok.vocab_size and loaded.tokenizer.fingerprint() == tok.fingerprint()
    out = tmp_path / "hf"
    assert cli.main(["export-hf", str(run), str(out)]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert len(transformers.AutoTokenizer.from_pretrained(out)) == tok.vocab_size
    assert hf.config.tie_word_embeddings == (family == "qwen2")
    with torch.no_grad():
        assert max_diff(hf(ids_of(tok)).logits, loaded.model(ids_of(tok))) <= 1e-4


def test_full_run_that_grew_resumes_bitwise(hf_dirs, small_corpus, full_runs, tmp_path, monkeypatch, capsys):
    import codegen2.train as train_module

    real = train_module._run_loop
    monkeypatch.setattr(train_module, "_run_loop", lambda run, stop_after: real(run, 3))  # "crash" after step 3
    capsys.readouterr()
    assert train_cli(hf_dirs["qwen2"], small_corpus, tmp_path / "run") == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "objective.add_sentinels" in line]
    assert len(said) == 1 and "<mask_1>..<mask_8>" in said[0] and "embedding (tied head) has" in said[0]
    monkeypatch.setattr(train_module, "_run_loop", real)
    assert cli.main(["train", "--out", str(tmp_path / "run"), "--resume"]) == 0
    straight = read_file(latest_checkpoint(full_runs / "qwen2") / WEIGHTS)
    resumed = read_file(latest_checkpoint(tmp_path / "run") / WEIGHTS)
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


# ------------------------------------------------------------------------------------------------- LoRA runs
@pytest.fixture(scope="module")
def lora_runs(hf_dirs, small_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    for family, hf_dir in hf_dirs.items():
        assert train_cli(hf_dir, small_corpus, root / family, "--lora", "2") == 0
    return root


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_lora_trains_the_new_rows_only_and_peft_loads_them(family, hf_dirs, lora_runs, tmp_path):
    run, hf_dir = lora_runs / family, hf_dirs[family]
    tok, base_vocab = CodeGenTokenizer.load(run), CodeGenTokenizer.load(hf_dir).vocab_size
    checkpoint = latest_checkpoint(run)
    saved = read_file(checkpoint / WEIGHTS)
    rows = {k: t for k, t in saved.items() if k.endswith(".rows")}
    assert set(rows) == ({"model.embed_tokens.rows"} | (set() if family == "qwen2" else {"lm_head.rows"}))
    assert all(t.shape == (10, 32) and t.dtype == torch.float32 for t in rows.values())
    assert not torch.equal(rows["model.embed_tokens.rows"][0], rows["model.embed_tokens.rows"][-1])  # <sep> trained
    optim = torch.load(checkpoint / "trainer_state.pt", weights_only=False)["optimizer"]
    assert set(optim["state"]) == set(saved)  # the rows have optimizer state beside the adapters
    assert read_meta(checkpoint)["lora"]["rows"] == [base_vocab, base_vocab + 10]
    unmerged = load_lora_run(run, checkpoint, "cpu").model
    merged = load_checkpoint(run)
    source = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    table = merged.model.model.embed_tokens.weight
    assert torch.equal(table[:base_vocab], source.model.embed_tokens.weight)  # the old rows stayed frozen
    assert torch.equal(table[base_vocab:], rows["model.embed_tokens.rows"])
    if family == "llama":  # the untied head: its old rows frozen too, its new rows the trained ones
        head = merged.model.lm_head.weight
        assert torch.equal(head[:base_vocab], source.lm_head.weight)
        assert torch.equal(head[base_vocab:], rows["lm_head.rows"])
    x = ids_of(tok)
    with torch.no_grad():
        want = unmerged(x)
        assert max_diff(merged.model(x), want) <= 1e-5
        out = tmp_path / "merged"
        assert cli.main(["export-hf", str(run), str(out)]) == 0
        assert max_diff(transformers.AutoModelForCausalLM.from_pretrained(out)(x).logits, want) <= 1e-4
        adapter = tmp_path / "adapter"
        assert cli.main(["export-hf", str(run), str(adapter), "--adapter-only"]) == 0
        hf_base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
        hf_base.resize_token_embeddings(len(transformers.AutoTokenizer.from_pretrained(adapter)))
        reference = peft.PeftModel.from_pretrained(hf_base, adapter).eval()
        assert max_diff(reference(x).logits, want) <= 1e-4
        assert max_diff(load_checkpoint(hf_dir, adapter=adapter).model(x), want) <= 1e-4
        assert max_diff(load_checkpoint(hf_dir, adapter=run).model(x), want) <= 1e-5
    (adapter / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="holds no tokenizer.json") as info:
        load_checkpoint(hf_dir, adapter=adapter)
    assert "\n" not in str(info.value)


def test_trainable_token_indices_must_be_one_run_of_ids():
    assert adapter_token_rows({"trainable_token_indices": {"embed_tokens": [3, 4], "lm_head": [3, 4]}}) == range(3, 5)
    assert adapter_token_rows({"trainable_token_indices": [7, 6]}) == range(6, 8)
    assert adapter_token_rows({}) == range(0)
    for bad in ([5, 7], {"embed_tokens": [3, 4], "lm_head": [3]}):
        with pytest.raises(UserError, match="one run of consecutive ids"):
            adapter_token_rows({"trainable_token_indices": bad})


def test_lora_run_that_grew_resumes_bitwise(hf_dirs, small_corpus, lora_runs, tmp_path, monkeypatch):
    import codegen2.train as train_module

    real = train_module._run_loop
    monkeypatch.setattr(train_module, "_run_loop", lambda run, stop_after: real(run, 3))
    assert train_cli(hf_dirs["llama"], small_corpus, tmp_path / "run", "--lora", "2") == 0
    monkeypatch.setattr(train_module, "_run_loop", real)
    assert cli.main(["train", "--out", str(tmp_path / "run"), "--resume"]) == 0
    straight = read_file(latest_checkpoint(lora_runs / "llama") / WEIGHTS)
    resumed = read_file(latest_checkpoint(tmp_path / "run") / WEIGHTS)
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_sample_and_infill_with_the_adapter_use_the_extended_tokenizer(hf_dirs, lora_runs, capsys):
    run, hf_dir = lora_runs / "llama", hf_dirs["llama"]
    common = ["--prompt", "def f(x):\n", "--max-new-tokens", "4", "--temperature", "0"]
    capsys.readouterr()
    assert cli.main(["sample", "--checkpoint", str(run), *common]) == 0
    of_run = capsys.readouterr().out
    assert cli.main(["sample", "--checkpoint", str(hf_dir), "--adapter", str(run), *common]) == 0
    assert capsys.readouterr().out == of_run
    assert cli.main(["infill", "--checkpoint", str(hf_dir), "--adapter", str(run), "--infill-format", "codegen2",
                     "--prefix", "a = ", "--suffix", "\n", "--max-new-tokens", "3"]) == 0


# ------------------------------------------------------------------------------------------------- LoRA under FSDP
# Dropout 0 and one global batch (2 samples per step) for both layouts, so that they compute the same steps.
SAME_STEPS = ["--lora", "2", "--set", "train.lora.dropout=0.0", "--set", "train.micro_batch_size=1",
              "--set", "train.global_batch_tokens=128"]


def train_fsdp(*args: str) -> subprocess.CompletedProcess:
    """`codegen2 train ARGS --parallel fsdp` on two CPU processes (gloo)."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "codegen2.cli", "train", *args, "--parallel", "fsdp"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def log_losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_lora_with_new_rows_under_fsdp_follows_one_process_and_resumes_bitwise(family, hf_dirs, small_corpus,
                                                                               tmp_path):
    """The rows of the embedding (and of the untied head) trained under FSDP2 on two ranks: the same losses, rows and
    adapters as one process, checkpointed with their optimizer state in one process's format, and resumed on FSDP
    bit for bit."""
    assert train_cli(hf_dirs[family], small_corpus, tmp_path / "single", *SAME_STEPS) == 0
    args = [a.replace("{corpus}", str(small_corpus)) for a in COMMON]
    done = train_fsdp("--init-from", str(hf_dirs[family]), *args, *SAME_STEPS, "--out", str(tmp_path / "fsdp"))
    assert "(fsdp, fp32)" in done.stderr and "objective.add_sentinels" in done.stderr
    assert log_losses(tmp_path / "fsdp") == pytest.approx(log_losses(tmp_path / "single"), rel=1e-5)
    want, got = (read_file(latest_checkpoint(tmp_path / run) / WEIGHTS) for run in ("single", "fsdp"))
    heads = {"model.embed_tokens.rows"} | (set() if family == "qwen2" else {"lm_head.rows"})
    assert got.keys() == want.keys() and heads <= set(got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=2e-5, rtol=1e-4, msg=name)
    checkpoint = latest_checkpoint(tmp_path / "fsdp")
    assert set(torch.load(checkpoint / "trainer_state.pt", weights_only=False)["optimizer"]["state"]) == set(got)
    if family == "qwen2":
        return
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "fsdp", resumed)
    shutil.rmtree(resumed / checkpoint.relative_to(tmp_path / "fsdp"))  # a crash after step 2's checkpoint
    assert latest_checkpoint(resumed).name != checkpoint.name
    train_fsdp("--out", str(resumed), "--resume")
    again = read_file(latest_checkpoint(resumed) / WEIGHTS)
    assert all(torch.equal(again[k], got[k]) for k in got)
    assert log_losses(resumed) == log_losses(tmp_path / "fsdp")
