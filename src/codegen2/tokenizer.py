"""The CodeGen2 tokenizer: GPT-2 byte-level BPE plus CodeGen's added tokens (docs/design.md §3).

Built on Hugging Face `tokenizers` (the BPE itself is never hand-written). Added tokens:
`<|endoftext|>`, runs of 2-31 spaces and 2-9 tabs (normal added tokens, so indentation becomes one
token), `<sep>`, `<eom>` and the infill sentinels `<mask_1>..<mask_N>`. A trained tokenizer follows
the published id layout: BPE ids first, then `<|endoftext|>`, the whitespace runs, padding
`<dummy_k>` tokens, `<sep>`, `<eom>` and the masks with `<mask_N> = vocab_size - N`, so its total
vocabulary equals the model's embedding size exactly. Special ids are always looked up by their
token string, so the released CodeGen2 tokenizer (eot 50256, sep 50299, eom 50300) loads as well.

Other families' tokenizers (Qwen2.5-Coder, StarCoder2, DeepSeek-Coder, CodeLlama) load from their tokenizer.json
and tokenizer_config.json as they are: end-of-text and BOS come from the config, and the CodeGen2 sentinels are
not required (see `CodeGenTokenizer`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from codegen2.errors import UserError
from codegen2.fsutil import atomic_write_text

if TYPE_CHECKING:
    from codegen2.objectives import SpecialIds

EOT = "<|endoftext|>"
SEP = "<sep>"
EOM = "<eom>"
WHITESPACE_TOKENS: tuple[str, ...] = tuple(" " * n for n in range(2, 32)) + tuple("\t" * n for n in range(2, 10))
REQUIRED_TOKENS = (EOT, SEP, EOM, "<mask_1>")

# Whitespace runs that the added tokens capture before BPE sees the text; training text is split
# the same way so that the learned merges match what encoding will actually meet.
_WHITESPACE_RUN = re.compile(r" {2,}|\t{2,}")


def mask_token(k: int) -> str:
    """The infill sentinel string `<mask_k>`."""
    return f"<mask_{k}>"


def _byte_level_pipeline(tokenizer: Tokenizer) -> None:
    """GPT-2 / CodeGen byte-level settings: no prefix space, byte-level decoding."""
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)


def _added(content: str) -> AddedToken:
    """Whitespace runs are ordinary added tokens (kept when decoding); the rest are special."""
    special = not content.isspace()
    return AddedToken(content, special=special, normalized=False, single_word=False, lstrip=False, rstrip=False)


class CodeGenTokenizer:
    """A `tokenizers.Tokenizer` with its special tokens resolved by name.

    Every family has an end-of-text token (`eot_id`: the document separator and the padding id) and may have a
    BOS (`bos_id`, put before each document when `add_bos`). Both come from tokenizer_config.json
    (`eos_token`, `bos_token`, `add_bos_token`) where the directory has one, else `<|endoftext|>` and no BOS.
    CodeGen2's sentinels (`<sep>`, `<eom>`, `<mask_k>`) are optional: `has_sentinels` says whether span
    corruption and the codegen2 infill formats can run; other families infill in their own format (`infill`).
    """

    def __init__(self, backend: Tokenizer, hf_config: dict[str, Any] | None = None):
        self.backend = backend
        self.hf_config = hf_config  # the family's tokenizer_config.json, written back unchanged by `save`
        vocab = backend.get_vocab(with_added_tokens=True)
        self.token_ids: dict[str, int] = vocab
        eos, bos, add_bos = _ends_of(hf_config or {})
        if eos not in vocab:
            raise UserError(f"tokenizer lacks its end-of-text token {eos} (tokenizer_config.json eos_token, "
                            f"else {EOT})")
        for token in (eos, *(t for t in (SEP, EOM, mask_token(1), bos) if t in vocab)):
            ids = backend.encode(token, add_special_tokens=False).ids
            if ids != [vocab[token]]:
                raise UserError(f"tokenizer does not encode {token} as one token (got ids {ids}); "
                                f"add it as a special token")
        # Embedding rows must cover the largest id even if ids have gaps.
        self.vocab_size: int = max(vocab.values()) + 1
        self.eot_id: int = vocab[eos]
        self.bos_id: int | None = vocab.get(bos) if bos else None
        self.add_bos: bool = add_bos and self.bos_id is not None
        self.has_sentinels = all(t in vocab for t in (SEP, EOM, mask_token(1)))
        self.sep_id: int | None = vocab.get(SEP)
        self.eom_id: int | None = vocab.get(EOM)
        num_masks = 0
        while mask_token(num_masks + 1) in vocab:
            num_masks += 1
        self.num_masks: int = num_masks
        self._mask_ids = tuple(vocab[mask_token(k)] for k in range(1, num_masks + 1))
        self._literal_backend: Tokenizer | None = None
        self._no_space_backend: Tokenizer | None = None

    # ---------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str | Path) -> CodeGenTokenizer:
        """Load a tokenizer.json (file or directory holding one, with its tokenizer_config.json if any), or a
        vocab.json + merges.txt directory."""
        path = Path(path)
        if not path.exists():
            raise UserError(f"tokenizer not found: {path}")
        if path.is_dir():
            if not (path / "tokenizer.json").is_file():
                if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
                    return cls(_load_vocab_merges(path))
                raise UserError(f"{path}: no tokenizer.json, nor vocab.json + merges.txt, in this directory")
            path = path / "tokenizer.json"
        try:
            backend = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise UserError(f"{path}: not a valid tokenizer.json ({exc})") from None
        config_file = path.parent / "tokenizer_config.json"
        hf_config = _read_json(config_file) if config_file.is_file() else None
        if hf_config is not None and hf_config.get("tokenizer_class") == "CodeGenTokenizer":
            hf_config = None  # codegen2's own (what `save` writes without a family config)
        return cls(backend, hf_config)

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json plus the small files transformers' AutoTokenizer needs: the family's own
        tokenizer_config.json where the tokenizer came with one, else a CodeGen one."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # Atomic: a kill during the first save must not leave a truncated tokenizer for resume to read.
        atomic_write_text(directory / "tokenizer.json", self.backend.to_str())
        if self.hf_config is not None:
            config = self.hf_config
            special_map = {key: config[key] for key in ("bos_token", "eos_token", "unk_token", "pad_token")
                           if config.get(key) is not None}
        else:
            config = {
                "tokenizer_class": "CodeGenTokenizer",
                "bos_token": EOT,
                "eos_token": EOT,
                "unk_token": EOT,
                "add_prefix_space": False,
                "clean_up_tokenization_spaces": False,
            }
            special_map = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
        atomic_write_text(directory / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
        atomic_write_text(directory / "special_tokens_map.json", json.dumps(special_map, indent=2) + "\n")

    def encode_document(self, text: str) -> list[int]:
        """One training document: [BOS where the family adds one] text <end-of-text> (sentinels as plain text)."""
        head = [self.bos_id] if self.add_bos else []
        return head + self.encode(text, literal_specials=True) + [self.eot_id]

    def encode_suffix(self, text: str) -> list[int]:
        """`text` without the word-start space a SentencePiece-style tokenizer puts before it (CodeLlama's infill
        suffix); the same as `encode` for byte-level tokenizers, which add none."""
        if self._no_space_backend is None:
            self._no_space_backend = _without_prefix_space(self.backend)
        return self._no_space_backend.encode(text, add_special_tokens=False).ids

    # --------------------------------------------------------------------------------- encoding
    def encode(self, text: str, literal_specials: bool = False) -> list[int]:
        """Token ids of `text`; special tokens are never added implicitly.

        With `literal_specials`, special-token strings inside the text (say a file that mentions
        "<|endoftext|>") are encoded as ordinary text, so data can never forge a sentinel.
        """
        return self._backend_for(literal_specials).encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], literal_specials: bool = False) -> list[list[int]]:
        """Encode many texts in parallel (tokenizers' Rust thread pool)."""
        backend = self._backend_for(literal_specials)
        return [e.ids for e in backend.encode_batch_fast(list(texts), add_special_tokens=False)]

    def _backend_for(self, literal_specials: bool) -> Tokenizer:
        if not literal_specials:
            return self.backend
        if self._literal_backend is None:  # a copy, so the shared backend's mode never flips
            copy = Tokenizer.from_str(self.backend.to_str())
            copy.encode_special_tokens = True
            self._literal_backend = copy
        return self._literal_backend

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ----------------------------------------------------------------------------- special ids
    def mask_id(self, k: int) -> int:
        """Id of `<mask_k>`, k >= 1."""
        if not 1 <= k <= self.num_masks:
            raise ValueError(f"<mask_{k}> does not exist: this tokenizer has <mask_1>..<mask_{self.num_masks}>")
        return self._mask_ids[k - 1]

    def mask_token(self, k: int) -> str:
        return mask_token(k)

    def special_ids(self) -> SpecialIds:
        """The ids span corruption and CodeGen2's sentinel FIM write (the tokenizer must have the sentinels)."""
        from codegen2.objectives import SpecialIds

        if not self.has_sentinels:
            raise UserError(f"the tokenizer lacks CodeGen2's sentinels ({SEP}, {EOM}, <mask_1>) that span "
                            f"corruption and sentinel FIM write")
        return SpecialIds(eot=self.eot_id, sep=self.sep_id, eom=self.eom_id, masks=self._mask_ids)

    def with_sentinels(self, num_masks: int) -> CodeGenTokenizer:
        """A copy with CodeGen2's `<sep>`, `<eom>`, `<mask_1>..<mask_N>` added as special tokens after every existing
        id (for span corruption on a family's tokenizer that lacks them); the same tokens in the same order each
        time, so the copy of the same tokenizer always has the same ids."""
        if self.has_sentinels:
            return self
        if num_masks < 1:
            raise UserError(f"tokenizer.num_masks={num_masks} must be at least 1 to add span corruption's sentinels")
        names = [SEP, EOM, *(mask_token(k) for k in range(1, num_masks + 1))]
        taken = [name for name in names if name in self.token_ids]
        if taken:
            raise UserError(f"the tokenizer already holds {taken[0]} but not all of CodeGen2's sentinels "
                            f"({SEP}, {EOM}, <mask_1>); it cannot be extended for span corruption")
        backend = Tokenizer.from_str(self.backend.to_str())
        _add_in_order(backend, names)
        ids = [backend.token_to_id(name) for name in names]
        if ids != list(range(self.vocab_size, self.vocab_size + len(names))):
            raise UserError(f"the sentinels added to this tokenizer got ids {ids[0]}..{ids[-1]}, not the ids after "
                            f"its last one ({self.vocab_size}); it cannot be extended for span corruption")
        return CodeGenTokenizer(backend, _with_added_decoder(self.hf_config, names, ids))

    @property
    def sentinel_rows(self) -> range:
        """The ids of `<sep>`, `<eom>` and the masks when they are contiguous and last (what `with_sentinels` adds);
        an empty range otherwise."""
        if not self.has_sentinels:
            return range(0)
        rows = range(self.sep_id, self.sep_id + 2 + self.num_masks)
        ids = [self.sep_id, self.eom_id, *self._mask_ids]
        return rows if ids == list(rows) and rows.stop == self.vocab_size else range(0)

    def fingerprint(self) -> str:
        """A hash of the full tokenizer definition (with a family's tokenizer_config.json, which decides BOS and
        end-of-text); token caches are keyed by it."""
        text = self.backend.to_str()
        if self.hf_config is not None:
            text += json.dumps(self.hf_config, sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _token_text(value: Any) -> str | None:
    """A tokenizer_config.json token entry: a string, or an AddedToken dict with `content`."""
    return value.get("content") if isinstance(value, dict) else value


def _ends_of(hf_config: dict[str, Any]) -> tuple[str, str | None, bool]:
    """(end-of-text token, BOS token, whether documents start with BOS) from a tokenizer_config.json."""
    eos = _token_text(hf_config.get("eos_token")) or EOT
    bos = _token_text(hf_config.get("bos_token"))
    return eos, bos, bool(hf_config.get("add_bos_token", False)) and bos is not None


def _with_added_decoder(hf_config: dict[str, Any] | None, names: Sequence[str],
                        ids: Sequence[int]) -> dict[str, Any] | None:
    """A family's tokenizer_config.json with the added tokens in its `added_tokens_decoder` (where it has one), so
    that transformers' AutoTokenizer lists them as the special tokens they are."""
    if hf_config is None or "added_tokens_decoder" not in hf_config:
        return hf_config
    decoder = dict(hf_config["added_tokens_decoder"])
    for name, token_id in zip(names, ids):
        decoder[str(token_id)] = {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                                  "single_word": False, "special": True}
    return {**hf_config, "added_tokens_decoder": decoder}


def _without_prefix_space(backend: Tokenizer) -> Tokenizer:
    """A copy of `backend` that puts no "▁" before the text: Prepend("▁") normalizers dropped, Metaspace
    pre-tokenizers set to prepend never (the two ways tokenizer.json files of LLaMA-style models say it)."""
    spec = json.loads(backend.to_str())

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            if node.get("type") == "Sequence":
                for key in ("normalizers", "pretokenizers"):
                    if key in node:
                        node[key] = [strip(n) for n in node[key] if not _prepends_space(n)]
            if node.get("type") == "Metaspace":
                node["prepend_scheme"] = "never"
                if "add_prefix_space" in node:
                    node["add_prefix_space"] = False
        return node

    for key in ("normalizer", "pre_tokenizer"):
        spec[key] = None if _prepends_space(spec.get(key)) else strip(spec.get(key))
    return Tokenizer.from_str(json.dumps(spec))


def _prepends_space(node: Any) -> bool:
    return isinstance(node, dict) and node.get("type") == "Prepend" and node.get("prepend") == "\u2581"


def _load_vocab_merges(directory: Path) -> Tokenizer:
    """Rebuild the byte-level BPE that HF's slow GPT-2/CodeGen tokenizer saves as separate files."""
    try:
        vocab, merges = models.BPE.read_file(str(directory / "vocab.json"), str(directory / "merges.txt"))
    except Exception as exc:
        raise UserError(f"{directory}: cannot read vocab.json / merges.txt ({exc})") from None
    backend = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
    _byte_level_pipeline(backend)
    added: dict[str, int] = {}
    added_file = directory / "added_tokens.json"
    if added_file.is_file():
        added.update(_read_json(added_file))
    config_file = directory / "tokenizer_config.json"
    if config_file.is_file():
        for key, entry in _read_json(config_file).get("added_tokens_decoder", {}).items():
            added[entry["content"]] = int(key)
    if EOT in vocab:
        added.setdefault(EOT, vocab[EOT])
    for content, wanted in sorted(added.items(), key=lambda item: item[1]):
        token = _added(content)
        if token.special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
        got = backend.token_to_id(content)
        if got != wanted:
            raise UserError(
                f"{directory}: added token {content!r} should have id {wanted} but the ids are not contiguous "
                f"after the BPE vocabulary (it got {got})"
            )
    return backend


def _add_in_order(backend: Tokenizer, contents: Sequence[str]) -> None:
    """Add tokens keeping their order (ids are assigned sequentially), batching runs of one kind."""
    run: list[AddedToken] = []
    for content in contents:
        token = _added(content)
        if run and run[-1].special != token.special:
            _add_run(backend, run)
            run = []
        run.append(token)
    if run:
        _add_run(backend, run)


def _add_run(backend: Tokenizer, run: list[AddedToken]) -> None:
    if run[0].special:
        backend.add_special_tokens(run)
    else:
        backend.add_tokens(run)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: invalid JSON ({exc})") from None


# ---------------------------------------------------------------------------------------- training
def _training_pieces(texts: Iterable[str]) -> Iterator[list[str]]:
    """Cut each text where the whitespace-run tokens will cut it, so BPE learns what encoding meets."""
    for text in texts:
        pieces = [p for p in _WHITESPACE_RUN.split(text) if p]
        if pieces:
            yield pieces


def num_added_tokens(num_masks: int) -> int:
    """Tokens added on top of the BPE vocabulary (not counting padding dummies)."""
    return 1 + len(WHITESPACE_TOKENS) + 2 + num_masks


def train_tokenizer(texts: Iterable[str], vocab_size: int, num_masks: int) -> CodeGenTokenizer:
    """Train a byte-level BPE on `texts` and add CodeGen2's tokens; total vocabulary == vocab_size.

    If the text is too small to learn enough merges, `<dummy_k>` tokens fill the gap so that the
    embedding size and the `<mask_N> = vocab_size - N` convention still hold.
    """
    if num_masks < 1:
        raise UserError(f"tokenizer.num_masks={num_masks} must be at least 1")
    bpe_target = vocab_size - num_added_tokens(num_masks)
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    if bpe_target < len(byte_alphabet):
        raise UserError(
            f"tokenizer.vocab_size={vocab_size} is too small: the 256 byte tokens and "
            f"{num_added_tokens(num_masks)} added tokens need at least "
            f"{len(byte_alphabet) + num_added_tokens(num_masks)}"
        )
    backend = Tokenizer(models.BPE(fuse_unk=False))
    _byte_level_pipeline(backend)
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_target,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=byte_alphabet,
        special_tokens=[],
    )
    backend.train_from_iterator(_training_pieces(texts), trainer=trainer)
    bpe_size = backend.get_vocab_size(with_added_tokens=False)
    tokens = [EOT, *WHITESPACE_TOKENS]
    tokens += [f"<dummy_{k}>" for k in range(bpe_target - bpe_size)]
    tokens += [SEP, EOM]
    tokens += [mask_token(k) for k in range(num_masks, 0, -1)]
    _add_in_order(backend, tokens)
    tokenizer = CodeGenTokenizer(backend)
    assert tokenizer.vocab_size == vocab_size, (tokenizer.vocab_size, vocab_size)
    assert tokenizer.mask_id(num_masks) == vocab_size - num_masks
    return tokenizer
