"""CodeGen2.5's tokenizer as a plain `tokenizers` tokenizer.json, built from GPT-2's BPE table (DESIGN §6).

Salesforce ships CodeGen2.5's tokenizer as remote code (`tokenization_codegen25.py`) that builds a tiktoken
`Encoding` at run time from tiktoken's GPT-2 ranks, downloaded on first use. Its layout, after GPT-2's
50,257 ids: runs of 31..2 spaces, then 9..2 tabs (ordinary BPE ranks, longest first), 18 StarCoder tokens
(`<fim_prefix>` ...), `<dummy_0..3>`, `<sep>` = 50317, `<eom>` = 50318 and `<mask_N>` = 51200 - N for
N = 881..1 (special tokens). Nothing here downloads: GPT-2's table (`encoder.json`, the same content as
Hugging Face GPT-2's `vocab.json`) must be in the model directory or in tiktoken's cache.

tiktoken merges the adjacent pair whose concatenation has the lowest rank, and takes a whole pre-tokenized
piece that is itself a token as it is. `tokenizers`' BPE does the same with merges listed by the rank of
their result (every split of a token into two tokens is a merge) and `ignore_merges`; the GPT-2 regex is
the ByteLevel pre-tokenizer's. tests/test_llama_tokenizer.py checks the result against tiktoken itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from ..errors import UserError

REMOTE_CODE = "tokenization_codegen25.py"
EOT = "<|endoftext|>"
SPACE_RUNS = tuple(" " * n for n in range(31, 1, -1))
TAB_RUNS = tuple("\t" * n for n in range(9, 1, -1))
STARCODER_TOKENS = ("<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<filename>", "<gh_stars>",
                    "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>",
                    "<jupyter_code>", "<jupyter_output>", "<empty_output>", "<commit_before>", "<commit_msg>",
                    "<commit_after>", "<reponame>")
NUM_MASKS = 881
VOCAB_SIZE = 51200
# Where tiktoken keeps GPT-2's table once downloaded: sha1 of this URL, in its cache directory.
ENCODER_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"


def is_codegen25_directory(path: str | Path) -> bool:
    """A HF directory whose tokenizer is CodeGen2.5's remote code (the file, or tokenizer_config.json naming it)."""
    path = Path(path)
    if (path / REMOTE_CODE).is_file():
        return True
    try:
        config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return "codegen25" in json.dumps(config.get("auto_map", "")).lower() or \
        config.get("tokenizer_class") == "CodeGen25Tokenizer"


def tiktoken_cache_file() -> Path:
    """tiktoken's cached copy of GPT-2's encoder.json (whether or not it exists)."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
        os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return Path(cache) / hashlib.sha1(ENCODER_URL.encode()).hexdigest()


def find_gpt2_table(directory: str | Path) -> Path:
    """GPT-2's token -> id table for a CodeGen2.5 directory, or a UserError naming each place looked at."""
    directory = Path(directory)
    candidates = [directory / "encoder.json", directory / "vocab.json", tiktoken_cache_file()]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise UserError(f"{directory}: CodeGen2.5's tokenizer ({REMOTE_CODE}) is built on GPT-2's BPE table, which is "
                    f"missing: none of {', '.join(str(c) for c in candidates)} exists; copy GPT-2's encoder.json "
                    f"(or vocab.json) into {directory}")


def _byte_level(text: str) -> str:
    """`text` in the byte-level alphabet of GPT-2's table (a space is 'Ġ', a tab 'ĉ')."""
    return "".join(piece for piece, _ in pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
                   .pre_tokenize_str(text))


def _merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of every token into two tokens, ordered by the rank of the token it makes (tiktoken's rule)."""
    found = []
    for token, rank in vocab.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                found.append((rank, vocab[left], left, right))
    found.sort()
    return [(left, right) for _, _, left, right in found]


def read_gpt2_table(file: Path) -> dict[str, int]:
    try:
        table = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{file}: not GPT-2's encoder.json / vocab.json ({exc})") from None
    if not isinstance(table, dict) or EOT not in table or \
            sorted(table.values()) != list(range(len(table))) or table[EOT] != len(table) - 1:
        raise UserError(f"{file}: not GPT-2's encoder.json / vocab.json (expected ids 0..N-1 with {EOT} last)")
    return table


def build_codegen25_tokenizer(table: dict[str, int]) -> Tokenizer:
    """The CodeGen2.5 tokenizer over a GPT-2-format table (ids 0..N-2 BPE, N-1 `<|endoftext|>`).

    With GPT-2's own table (N = 50257) the ids are CodeGen2.5's; with a smaller table (tests) the same layout
    follows it, masks still ending at `<mask_1>` as the last id.
    """
    vocab = {token: i for token, i in table.items() if token != EOT}
    next_id = len(table)
    for run in SPACE_RUNS + TAB_RUNS:
        vocab[_byte_level(run)] = next_id  # as tiktoken's dict update: a run already in the table moves here
        next_id += 1
    merges = _merges(vocab)
    specials = [*STARCODER_TOKENS, *(f"<dummy_{i}>" for i in range(4)), "<sep>", "<eom>",
                *(f"<mask_{n}>" for n in range(NUM_MASKS, 0, -1))]
    # Special tokens sit in the vocabulary at their ids (never reached by merges, which are computed above), so
    # registering them as added tokens keeps those ids even where the runs left a hole in the table.
    vocab[EOT] = len(table) - 1
    for token in specials:
        vocab[token] = next_id
        next_id += 1
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    added = tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in [EOT, *specials]])
    if added != len(specials) + 1 or tokenizer.token_to_id(EOT) != len(table) - 1 or \
            tokenizer.token_to_id("<mask_1>") != next_id - 1:
        raise UserError("could not lay out CodeGen2.5's special tokens over this GPT-2 table")
    return tokenizer


def load_codegen25_tokenizer(directory: str | Path) -> Tokenizer:
    """CodeGen2.5's tokenizer for a HF directory whose tokenizer is the remote code, from GPT-2's table."""
    return build_codegen25_tokenizer(read_gpt2_table(find_gpt2_table(directory)))
