"""A tokenizer built like CodeGen2's, saved the way Hugging Face saves it, must give the same ids in
codegen2 and in transformers' AutoTokenizer on a 1 MB sample of code and prose (issue 3, point 4).

Two on-disk layouts are checked: the one transformers' `save_pretrained` writes (tokenizer.json +
tokenizer_config.json) and the legacy one the published CodeGen2 repositories ship (vocab.json +
merges.txt + added_tokens.json + special_tokens_map.json + tokenizer_config.json).
"""

from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from codegen2.errors import UserError
from codegen2.hf import load_hf_tokenizer
from codegen2.tokenizer import EOT, WHITESPACE_TOKENS, train_tokenizer

NUM_MASKS = 899  # as in the released tokenizer: <mask_1> .. <mask_899>
VOCAB_SIZE = 2048  # small BPE, same structure (bytes + merges, then EOT, whitespace runs, <sep>, <eom>, masks)
SAMPLE_BYTES = 1_000_000


def _code_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if p.stat().st_size < 200_000)


def _prose() -> list[str]:
    from pydoc_data.topics import topics  # the English reference documentation shipped with Python

    return [topics[key] for key in sorted(topics)]


def _sample(rng: random.Random) -> list[str]:
    """≥ 1 MB of stdlib code and documentation prose in documents, sprinkled with the tokens CodeGen2 adds."""
    code = [p.read_text(encoding="utf-8", errors="replace") for p in _code_files()]
    prose = _prose()
    specials = [EOT, "<sep>", "<eom>", "<mask_1>", "<mask_2>", f"<mask_{NUM_MASKS}>", "<mask_17>",
                "\t" * 12, " " * 40, "  \t  ", "héllo wörld ", "日本語のテキスト", "🙂🚀", "\r\n",
                "<mask_>", "<mask_0>"]
    pieces = ["x = 1" + "".join(specials) + " " * 31 + "y" + "\t" * 9 + "z<mask_3>\n"]  # every kind up front
    size = len(pieces[0].encode("utf-8"))
    index = 0
    while size < SAMPLE_BYTES:
        text = code[index % len(code)] if index % 3 else prose[index % len(prose)]
        index += 1
        cut = rng.randrange(0, max(1, len(text) - 1))
        piece = text[:cut] + rng.choice(specials) + text[cut:] + rng.choice([EOT, "\n", "<sep><mask_1>", "\n\n"])
        pieces.append(piece)
        size += len(piece.encode("utf-8"))
    return pieces


@pytest.fixture(scope="module")
def codegen2_style_tokenizer():
    rng = random.Random(0)
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in _code_files()[:60]] + _prose()[:20]
    sample = _sample(rng)
    assert sum(len(doc.encode("utf-8")) for doc in sample) >= SAMPLE_BYTES
    return train_tokenizer(texts, vocab_size=VOCAB_SIZE, num_masks=NUM_MASKS), sample


def _save_with_transformers(tokenizer, directory: Path) -> Path:
    """Let transformers write the directory itself (its save_pretrained format)."""
    staging = directory / "staging"
    tokenizer.save(staging)
    out = directory / "saved_by_transformers"
    transformers.AutoTokenizer.from_pretrained(staging).save_pretrained(out)
    assert (out / "tokenizer.json").is_file()
    return out


def _save_legacy(tokenizer, directory: Path, tokenizer_class: str) -> Path:
    """The published CodeGen2 layout: GPT-2 style vocab.json (with <|endoftext|>) + merges + added tokens."""
    out = directory / f"legacy_{tokenizer_class}"
    out.mkdir()
    spec = json.loads(tokenizer.backend.to_str())
    vocab = dict(spec["model"]["vocab"])
    added = {t["content"]: t["id"] for t in spec["added_tokens"]}
    vocab[EOT] = added.pop(EOT)
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (out / "added_tokens.json").write_text(json.dumps(added, ensure_ascii=False), encoding="utf-8")
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    (out / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    config = {"tokenizer_class": tokenizer_class, "add_prefix_space": False, "model_max_length": 2048, **special}
    (out / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return out


def _assert_same_ids(directory: Path, sample: list[str], reference) -> None:
    """Encode every document of the sample (batched: both libraries use the Rust thread pool)."""
    ours = load_hf_tokenizer(directory, vocab_size=VOCAB_SIZE)
    theirs = transformers.AutoTokenizer.from_pretrained(directory)
    ours_ids = ours.encode_batch(sample)
    theirs_ids = theirs(sample, add_special_tokens=True)["input_ids"]
    for doc, a, b in zip(sample, ours_ids, theirs_ids):
        if a != b:
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            pytest.fail(f"{directory.name}: ids differ at token {first} of a document: ours {a[first:first + 5]} "
                        f"transformers {b[first:first + 5]} (text {doc[:60]!r}...)")
    assert len(ours_ids) == len(theirs_ids) == len(sample)
    assert ours_ids[:20] == reference.encode_batch(sample[:20])  # the layout on disk changes nothing
    # Special tokens were encoded as single ids, and both sides decode back to the exact text.
    flat = [i for ids in ours_ids for i in ids]
    for token in (EOT, "<sep>", "<eom>", "<mask_1>", f"<mask_{NUM_MASKS}>", " " * 31, "\t" * 9):
        assert flat.count(ours.backend.token_to_id(token)) > 0, token
    assert (ours.eot_id, ours.sep_id, ours.eom_id) == (reference.eot_id, reference.sep_id, reference.eom_id)
    assert ours.mask_id(NUM_MASKS) == VOCAB_SIZE - NUM_MASKS
    assert [ours.decode(ids) for ids in ours_ids[:50]] == sample[:50]
    assert theirs.batch_decode(theirs_ids[:50], clean_up_tokenization_spaces=False) == sample[:50]


def test_ids_match_transformers_save_pretrained_layout(codegen2_style_tokenizer, tmp_path):
    tokenizer, sample = codegen2_style_tokenizer
    _assert_same_ids(_save_with_transformers(tokenizer, tmp_path), sample, tokenizer)


# The full 1 MB with one tokenizer_class; the other spelling on the first 6 documents to keep the suite fast.
@pytest.mark.parametrize("tokenizer_class,documents", [("GPT2Tokenizer", None), ("CodeGenTokenizer", 6)])
def test_ids_match_published_legacy_layout(codegen2_style_tokenizer, tmp_path, tokenizer_class, documents):
    tokenizer, sample = codegen2_style_tokenizer
    sample = sample[:documents]
    directory = _save_legacy(tokenizer, tmp_path, tokenizer_class)
    added = json.loads((directory / "added_tokens.json").read_text())
    assert all(token in added for token in WHITESPACE_TOKENS) and added["<mask_1>"] == VOCAB_SIZE - 1
    _assert_same_ids(directory, sample, tokenizer)


def test_tokenizer_without_codegen2_special_tokens_is_rejected(codegen2_style_tokenizer, tmp_path):
    """Other families' tokenizers have no sentinels, so loading one is fine; what needs them (span corruption,
    CodeGen2's infill formats) refuses it, naming what is missing."""
    tokenizer, _ = codegen2_style_tokenizer
    directory = _save_legacy(tokenizer, tmp_path, "CodeGenTokenizer")
    added = json.loads((directory / "added_tokens.json").read_text())
    added = {token: i for token, i in added.items() if not token.startswith("<mask_")}  # ids stay contiguous
    (directory / "added_tokens.json").write_text(json.dumps(added))
    loaded = load_hf_tokenizer(directory, vocab_size=VOCAB_SIZE)
    assert not loaded.has_sentinels
    with pytest.raises(UserError, match=r"lacks CodeGen2's sentinels.*<mask_1>"):
        loaded.special_ids()


def test_missing_tokenizer_files_are_named(tmp_path):
    with pytest.raises(UserError, match="no tokenizer files"):
        load_hf_tokenizer(tmp_path, vocab_size=VOCAB_SIZE)


def test_tokenizer_larger_than_model_vocab_is_rejected(codegen2_style_tokenizer, tmp_path):
    tokenizer, _ = codegen2_style_tokenizer
    tokenizer.save(tmp_path)
    with pytest.raises(UserError, match="vocab_size"):
        load_hf_tokenizer(tmp_path, vocab_size=VOCAB_SIZE - 1)
