"""CodeGen2.5's tokenizer rebuilt as tokenizer.json, against tiktoken running the remote code's construction.

No network: GPT-2's real table is not on this machine, so a byte-level BPE table is trained here in GPT-2's
format (ids in merge order, `<|endoftext|>` last) and both sides are built over it. The reference is a
tiktoken `Encoding` made exactly as `tokenization_codegen25.py` makes it: GPT-2's ranks plus space and tab
runs as ordinary ranks, then the special tokens, encoding with every special token allowed.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from codegen2.errors import UserError
from codegen2.hf.codegen25_tokenizer import (
    NUM_MASKS,
    SPACE_RUNS,
    STARCODER_TOKENS,
    TAB_RUNS,
    build_codegen25_tokenizer,
    find_gpt2_table,
    is_codegen25_directory,
)
from codegen2.tokenizer import CodeGenTokenizer

tiktoken = pytest.importorskip("tiktoken")

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (as published with GPT-2's encoder)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


@pytest.fixture(scope="module")
def gpt2_format_table() -> dict[str, int]:
    """A GPT-2-format table: 256 byte tokens, merged tokens in merge order, `<|endoftext|>` last."""
    texts = [(STDLIB / name).read_text(encoding="utf-8") for name in ("argparse.py", "textwrap.py", "tokenize.py")]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1500, initial_alphabet=pre_tokenizers.ByteLevel
                                                      .alphabet(), show_progress=False))
    table = dict(bpe.get_vocab())
    table["<|endoftext|>"] = len(table)
    return table


def reference_encoding(table: dict[str, int]):
    """tiktoken, built the way CodeGen2.5's remote code builds it (over this table instead of GPT-2's)."""
    from tiktoken_ext.openai_public import r50k_pat_str

    decode = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {bytes(decode[c] for c in token): i for token, i in table.items() if token != "<|endoftext|>"}
    idx = len(table)
    for run in SPACE_RUNS + TAB_RUNS:
        ranks[run.encode("ascii")] = idx
        idx += 1
    specials = {"<|endoftext|>": len(table) - 1}
    for token in [*STARCODER_TOKENS, *(f"<dummy_{i}>" for i in range(4)), "<sep>", "<eom>",
                  *(f"<mask_{n}>" for n in range(NUM_MASKS, 0, -1))]:
        specials[token] = idx
        idx += 1
    return tiktoken.Encoding(name="codegen25-test", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens=specials)


def test_layout_and_encodings_equal_tiktoken(gpt2_format_table):
    ours = CodeGenTokenizer(build_codegen25_tokenizer(gpt2_format_table))
    reference = reference_encoding(gpt2_format_table)
    n = len(gpt2_format_table)
    # With GPT-2's 50,257 ids these are CodeGen2.5's 50317, 50318 and 51200 - N.
    assert (ours.eot_id, ours.sep_id, ours.eom_id) == (n - 1, n + 60, n + 61)
    assert ours.num_masks == NUM_MASKS and ours.vocab_size == n + 62 + NUM_MASKS == reference.n_vocab
    assert ours.mask_id(1) == ours.vocab_size - 1 and ours.mask_id(NUM_MASKS) == ours.vocab_size - NUM_MASKS
    texts = [(STDLIB / name).read_text(encoding="utf-8") for name in ("json/decoder.py", "heapq.py", "this.py")]
    texts += [
        "def f(x):\n" + " " * 40 + "return x\t\t\t\t\t\t\t\t\t\t\t# tabs\n\n\n  \n",
        "prefix<mask_1>suffix<|endoftext|><sep><mask_1>middle<eom><fim_prefix> é ü 日本語 🙂\r\n\t \t  x",
        "    if a:\n\tb = '''  spaced   out  '''\n" * 3,
    ]
    for text in texts:
        expected = reference.encode(text, allowed_special="all")
        assert ours.encode(text) == expected
        assert ours.decode(expected) == text


def test_codegen25_directory_loads_from_the_table_and_names_what_is_missing(gpt2_format_table, tmp_path,
                                                                              monkeypatch):
    from codegen2.hf import load_hf_tokenizer

    directory = tmp_path / "codegen25"
    directory.mkdir()
    (directory / "tokenization_codegen25.py").write_text("# remote code, never run\n")
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["tokenization_codegen25.CodeGen25Tokenizer", None]}}))
    assert is_codegen25_directory(directory)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "no-cache"))
    with pytest.raises(UserError, match=r"GPT-2's BPE table, which is missing: none of .*encoder.json, .*vocab.json, "
                                        r".*no-cache/6c7ea1a7e38e3a7f062df639a5b80947f075ffe6 exists"):
        load_hf_tokenizer(directory, 51200)
    # tiktoken's cache is where a machine that once ran the remote code has the table.
    cache = tmp_path / "cache"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    cache.mkdir()
    find_gpt2_table_path = cache / "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6"
    find_gpt2_table_path.write_text(json.dumps(gpt2_format_table))
    assert find_gpt2_table(directory) == find_gpt2_table_path
    tokenizer = load_hf_tokenizer(directory, 51200)
    assert tokenizer.encode("<sep>") == [len(gpt2_format_table) + 60]
    (directory / "encoder.json").write_text("{\"a\": 1}")
    with pytest.raises(UserError, match="encoder.json: not GPT-2's encoder.json"):
        load_hf_tokenizer(directory, 51200)


def test_codegen25_style_directory_samples_infills_and_imports_without_remote_code(gpt2_format_table, tmp_path,
                                                                                    capsys):
    """A LlamaForCausalLM directory laid out like Salesforce's CodeGen2.5 (remote-code tokenizer, no tokenizer.json):
    `infill` runs on it, and import -> export gives a directory transformers loads with a plain tokenizer.json."""
    import torch

    transformers = pytest.importorskip("transformers")
    from codegen2.cli import main
    from codegen2.loading import load_checkpoint

    n = len(gpt2_format_table)
    vocab = n + 62 + NUM_MASKS  # GPT-2's table + CodeGen2.5's additions: 51,200 with the real table
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=128, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)).eval()
    directory = tmp_path / "codegen25-style"
    hf.save_pretrained(directory)
    (directory / "tokenization_codegen25.py").write_text("# remote code, never run\n")
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["tokenization_codegen25.CodeGen25Tokenizer", None]}}))
    (directory / "encoder.json").write_text(json.dumps(gpt2_format_table))

    loaded = load_checkpoint(directory)
    assert loaded.config.arch == "llama" and loaded.tokenizer.sep_id == n + 60
    assert main(["infill", "--checkpoint", str(directory), "--prefix", "def f(x):\n", "--suffix", "\n    return y\n",
                 "--max-new-tokens", "4"]) == 0
    capsys.readouterr()

    run, out = tmp_path / "run", tmp_path / "exported"
    assert main(["import-hf", str(directory), str(run)]) == 0
    assert main(["export-hf", str(run), str(out)]) == 0
    assert (out / "tokenizer.json").is_file() and not (out / "tokenization_codegen25.py").exists()
    text = "def f(x):\n        return x<mask_1>\t\t<sep><eom><|endoftext|>"
    assert transformers.AutoTokenizer.from_pretrained(out)(text)["input_ids"] == loaded.tokenizer.encode(text)
    ids = torch.tensor([loaded.tokenizer.encode(text)])
    with torch.no_grad():
        reference = hf(ids).logits
        assert (transformers.AutoModelForCausalLM.from_pretrained(out)(ids).logits - reference).abs().max() <= 1e-4
