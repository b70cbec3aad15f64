"""The CodeGen2 tokenizer: special tokens, whitespace runs, exact vocabulary, round trips, formats."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer

from codegen2.errors import UserError
from codegen2.tokenizer import EOT, WHITESPACE_TOKENS, CodeGenTokenizer, num_added_tokens, train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
VOCAB, MASKS = 1024, 16


def _read(*names: str) -> list[str]:
    return [(STDLIB / name).read_text(encoding="utf-8") for name in names]


TRAIN_FILES = ("json/decoder.py", "json/encoder.py", "textwrap.py", "string.py", "shlex.py", "bisect.py")
# Files the tokenizer never saw, with non-ASCII text, tabs, long lines and odd bytes.
HELD_FILES = ("difflib.py", "calendar.py", "locale.py", "codecs.py", "tabnanny.py")


@pytest.fixture(scope="module")
def tok() -> CodeGenTokenizer:
    return train_tokenizer(_read(*TRAIN_FILES), VOCAB, MASKS)


def test_total_vocab_and_published_id_layout(tok):
    assert tok.vocab_size == VOCAB == tok.backend.get_vocab_size(with_added_tokens=True)
    assert [tok.mask_id(n) for n in range(1, MASKS + 1)] == [VOCAB - n for n in range(1, MASKS + 1)]
    assert tok.num_masks == MASKS
    # As in CodeGen2: BPE ids, then <|endoftext|>, whitespace runs, (dummies), <sep>, <eom>, masks.
    bpe = tok.backend.get_vocab_size(with_added_tokens=False)
    assert tok.eot_id == bpe
    assert tok.backend.token_to_id(WHITESPACE_TOKENS[0]) == bpe + 1
    assert (tok.sep_id, tok.eom_id) == (VOCAB - MASKS - 2, VOCAB - MASKS - 1)
    ids = tok.special_ids()
    assert (ids.eot, ids.sep, ids.eom, ids.masks[0], len(ids.masks)) == (tok.eot_id, tok.sep_id, tok.eom_id,
                                                                          VOCAB - 1, MASKS)
    with pytest.raises(ValueError, match="mask_17"):
        tok.mask_id(MASKS + 1)


def test_small_corpus_is_padded_to_the_exact_vocab_size():
    small = train_tokenizer(["def f(x):\n    return x\n"] * 3, 1000, 8)
    assert small.vocab_size == 1000 == small.backend.get_vocab_size(with_added_tokens=True)
    assert small.mask_id(8) == 1000 - 8 and small.mask_id(1) == 999
    dummies = [t for t in small.backend.get_vocab(with_added_tokens=True) if t.startswith("<dummy_")]
    bpe = small.backend.get_vocab_size(with_added_tokens=False)
    assert len(dummies) == 1000 - bpe - num_added_tokens(8) > 0


def test_vocab_too_small_is_an_error():
    with pytest.raises(UserError, match="too small"):
        train_tokenizer(["x"], 300, 8)


def test_every_special_token_is_one_id(tok):
    specials = [EOT, "<sep>", "<eom>"] + [f"<mask_{k}>" for k in range(1, MASKS + 1)]
    for token in specials:
        assert len(tok.encode(token)) == 1, token
        assert tok.encode(f"x = 1{token}y")[-2] == tok.backend.token_to_id(token)
    assert tok.encode("<mask_3>") == [tok.mask_id(3)]
    prompt = "def f():<mask_1>\n<|endoftext|><sep><mask_1>"
    assert tok.encode(prompt)[-3:] == [tok.eot_id, tok.sep_id, tok.mask_id(1)]


def test_whitespace_runs_are_single_added_tokens(tok):
    for n in range(2, 32):
        run_id = tok.backend.token_to_id(" " * n)
        assert tok.encode(" " * n) == [run_id]
        assert run_id in tok.encode("x" + " " * n + "y")
    for n in range(2, 10):
        assert tok.encode("\t" * n) == [tok.backend.token_to_id("\t" * n)]
    # Longer runs split into the longest token first (31 spaces) and the rest.
    assert tok.encode(" " * 40)[0] == tok.backend.token_to_id(" " * 31)
    # Indentation is one token and is kept when special tokens are skipped in decoding.
    code = "def f():\n        return 1\n"
    assert tok.backend.token_to_id(" " * 8) in tok.encode(code)
    assert tok.decode(tok.encode(code + EOT), skip_special_tokens=True) == code


def test_round_trip_on_unseen_stdlib_code(tok):
    texts = _read(*HELD_FILES) + ["naïve café 日本語 🙂\r\n\t\t  \x00\x7f end", "", " leading space"]
    encoded = tok.encode_batch(texts)
    assert encoded == [tok.encode(t) for t in texts]
    for text, ids in zip(texts, encoded):
        assert tok.decode(ids) == text


def test_literal_specials_never_produce_sentinel_ids(tok):
    text = "x = '<|endoftext|>' + '<mask_1>' + '<sep>'  # <eom>\n"
    ids = tok.encode(text, literal_specials=True)
    forbidden = {tok.eot_id, tok.sep_id, tok.eom_id, *tok.special_ids().masks}
    assert not forbidden & set(ids)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text], literal_specials=True) == [ids]
    assert tok.eot_id in tok.encode(text)  # the default still recognises them


def test_training_is_deterministic(tok):
    again = train_tokenizer(_read(*TRAIN_FILES), VOCAB, MASKS)
    assert again.backend.to_str() == tok.backend.to_str()
    assert again.fingerprint() == tok.fingerprint()


def test_save_and_load_identity(tok, tmp_path):
    tok.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"tokenizer.json", "tokenizer_config.json",
                                                     "special_tokens_map.json"}
    sample = _read(HELD_FILES[0])[0][:5000] + "<mask_2><sep>"
    for loaded in (CodeGenTokenizer.load(tmp_path), CodeGenTokenizer.load(tmp_path / "tokenizer.json")):
        assert loaded.backend.to_str() == tok.backend.to_str()
        assert loaded.encode(sample) == tok.encode(sample)
        assert (loaded.vocab_size, loaded.eot_id, loaded.sep_id, loaded.eom_id, loaded.num_masks) == (
            tok.vocab_size, tok.eot_id, tok.sep_id, tok.eom_id, tok.num_masks)


def test_transformers_autotokenizer_reads_the_saved_directory(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = _read(HELD_FILES[1])[0][:8000] + "    <mask_1>\t\t<|endoftext|><sep><mask_1>"
    assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert hf.decode(tok.encode(text)) == text
    assert hf.eos_token_id == tok.eot_id


def _write_vocab_merges(tok: CodeGenTokenizer, directory: Path, eot_in_vocab: bool) -> dict[str, int]:
    """Save as HF's slow GPT-2/CodeGen tokenizer does: vocab.json + merges.txt + added_tokens.json."""
    directory.mkdir()
    spec = json.loads(tok.backend.to_str())
    vocab = dict(spec["model"]["vocab"])
    added = {t["content"]: t["id"] for t in spec["added_tokens"]}
    if eot_in_vocab:  # GPT-2 keeps <|endoftext|> in vocab.json
        vocab[EOT] = added.pop(EOT)
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (directory / "added_tokens.json").write_text(json.dumps(added, ensure_ascii=False), encoding="utf-8")
    (directory / "special_tokens_map.json").write_text(json.dumps({"eos_token": EOT}), encoding="utf-8")
    return added


@pytest.mark.parametrize("eot_in_vocab", [True, False])
def test_load_vocab_merges_directory(tok, tmp_path, eot_in_vocab):
    _write_vocab_merges(tok, tmp_path / "slow", eot_in_vocab)
    loaded = CodeGenTokenizer.load(tmp_path / "slow")
    text = _read(HELD_FILES[2])[0] + "\t\t<mask_5>  <sep>" + EOT
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.decode(loaded.encode(text)) == text
    assert loaded.decode(loaded.encode(text), skip_special_tokens=True) == tok.decode(tok.encode(text), True)
    assert (loaded.vocab_size, loaded.eot_id, loaded.sep_id, loaded.eom_id, loaded.mask_id(MASKS)) == (
        tok.vocab_size, tok.eot_id, tok.sep_id, tok.eom_id, tok.mask_id(MASKS))


def test_non_contiguous_added_tokens_are_an_error(tok, tmp_path):
    added = _write_vocab_merges(tok, tmp_path / "slow", True)
    added["<eom>"] += 1000  # leaves a gap at <eom>'s old id
    (tmp_path / "slow" / "added_tokens.json").write_text(json.dumps(added), encoding="utf-8")
    with pytest.raises(UserError, match=r"slow: added token .* should have id \d+ but the ids are not contiguous"):
        CodeGenTokenizer.load(tmp_path / "slow")


def test_special_ids_are_looked_up_by_name_not_position(tok):
    """Masks added in ascending order (mask_1 first) and sep after the masks still resolve."""
    backend = Tokenizer.from_str(tok.backend.to_str())
    fresh = Tokenizer(backend.model)
    fresh.pre_tokenizer, fresh.decoder = backend.pre_tokenizer, backend.decoder
    fresh.add_special_tokens([AddedToken(f"<mask_{k}>", special=True, normalized=False) for k in range(1, 4)])
    fresh.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<eom>", EOT, "<sep>")])
    loaded = CodeGenTokenizer(fresh)
    base = fresh.get_vocab_size(with_added_tokens=False)
    assert [loaded.mask_id(k) for k in (1, 2, 3)] == [base, base + 1, base + 2]
    assert (loaded.eom_id, loaded.eot_id, loaded.sep_id, loaded.vocab_size) == (base + 3, base + 4, base + 5, base + 6)


@pytest.mark.parametrize("missing", [EOT, "<sep>", "<eom>", "<mask_1>"])
def test_missing_special_token_is_a_user_error(tok, missing):
    """The end-of-text token is required; CodeGen2's sentinels only where span corruption or sentinel FIM runs
    (other families' tokenizers have none)."""
    backend = Tokenizer.from_str(tok.backend.to_str())
    fresh = Tokenizer(backend.model)
    fresh.pre_tokenizer = backend.pre_tokenizer
    keep = [t for t in (EOT, "<sep>", "<eom>", "<mask_1>") if t != missing]
    fresh.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in keep])
    if missing == EOT:
        with pytest.raises(UserError, match=f"lacks its end-of-text token {missing}"):
            CodeGenTokenizer(fresh)
        return
    loaded = CodeGenTokenizer(fresh)
    assert not loaded.has_sentinels
    with pytest.raises(UserError, match="lacks CodeGen2's sentinels"):
        loaded.special_ids()


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(UserError, match="tokenizer not found: .*nowhere"):
        CodeGenTokenizer.load(tmp_path / "nowhere")
    with pytest.raises(UserError, match="no tokenizer.json"):
        CodeGenTokenizer.load(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        CodeGenTokenizer.load(bad)
