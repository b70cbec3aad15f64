"""Fill-in-the-middle formats: the one registry of infill layouts and their stop tokens, for every command.

A format turns a prefix and a suffix (token ids) into the prompt after which the model's next token starts
the middle, and names the tokens that end a middle. Formats read only token ids by their strings
(`Specials`: the tokenizer's vocabulary, end-of-text and BOS), so this module needs no tokenizer:

  codegen2       prefix <mask_1> suffix <|endoftext|> <sep> <mask_1>       -> middle <eom>   (docs/design.md §2)
  fim            <mask_1> prefix <mask_2> suffix <sep>                      -> middle <eom>   (CodeGen2 sentinel FIM)
  qwen           <|fim_prefix|>prefix<|fim_suffix|>suffix<|fim_middle|>     -> middle <|endoftext|>  (Qwen2.5-Coder)
  starcoder2     <fim_prefix>prefix<fim_suffix>suffix<fim_middle>           -> middle <|endoftext|>
  deepseek       BOS <｜fim▁begin｜>prefix<｜fim▁hole｜>suffix<｜fim▁end｜>     -> middle EOS
  codellama      BOS ▁<PRE> prefix ▁<SUF>suffix ▁<MID>                      -> middle ▁<EOT>  (PSM)
  codellama-spm  BOS ▁<PRE> ▁<SUF>suffix ▁<MID> prefix                      -> middle ▁<EOT>  (SPM)

CodeLlama's suffix is encoded without a leading space (`InfillFormat.suffix_space`; callers encode it with the
tokenizer's `encode_suffix`). Every format stops on its family's end-of-text, its end token and every FIM and
repository token the tokenizer has, so that no infill runs on into `<|fim_pad|>` or a new file. Formats with a
repository layout (qwen: `<|repo_name|>name\\n<|file_sep|>path\\ncode`, starcoder2: `<repo_name>name<file_sep>path
\\ncode`) put other files of the project before the FIM prompt (`build_infill(..., extra_files=[(path, text)])`).

The format of a model is detected from its family and its tokenizer (`detect_format`); where a tokenizer holds
several (CodeGen2.5's has CodeGen2's sentinels and `<fim_*>` tokens), the family decides. `codegen2 infill`,
the server's `suffix` and `/infill`, the infilling evaluations and the FIM training objective all lay their
prompts out here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .errors import UserError


@dataclass(frozen=True)
class Specials:
    """What a format reads from a tokenizer: ids by token string, end-of-text, and BOS where documents start
    with one."""

    ids: Mapping[str, int]
    eot: int
    bos: int | None = None

    @classmethod
    def of(cls, tokenizer) -> Specials:
        """From a `CodeGenTokenizer` (anything with `token_ids`, `eot_id`, `bos_id` and `add_bos`)."""
        return cls(tokenizer.token_ids, tokenizer.eot_id, tokenizer.bos_id if tokenizer.add_bos else None)

    def find(self, *tokens: str) -> int | None:
        """Id of the first of `tokens` the tokenizer has (CodeLlama's markers are `▁<PRE>` or `<PRE>`)."""
        return next((self.ids[t] for t in tokens if t in self.ids), None)


@dataclass(frozen=True)
class InfillFormat:
    """One fill-in-the-middle layout: `markers` are (before prefix, before suffix, before middle), each a tuple
    of spellings; `end` ends a middle (None: the end-of-text); `stops` end it too where the tokenizer has them."""

    name: str
    family: str
    markers: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]
    layout: str  # "psm", "spm", "codegen2" or "sentinel-fim"
    end: tuple[str, ...] | None = None
    stops: tuple[str, ...] = ()
    bos: bool = False  # the prompt starts with BOS (where the tokenizer adds one)
    suffix_space: bool = True  # False: the suffix is encoded without a word-start space (CodeLlama)
    repo: tuple[str, str] | None = None  # (repository-name token, file-separator token)

    def available(self, specials: Specials) -> bool:
        return all(specials.find(*spellings) is not None for spellings in self.markers) and (
            self.end is None or specials.find(*self.end) is not None)

    def marker_ids(self, specials: Specials) -> tuple[int, int, int]:
        if not self.available(specials):
            raise UserError(f"infill format {self.name!r} needs the tokens "
                            f"{', '.join(s[0] for s in self.markers)}, which this tokenizer lacks")
        return tuple(specials.find(*spellings) for spellings in self.markers)  # type: ignore[return-value]


_QWEN_STOPS = ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
_STARCODER_STOPS = ("<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<repo_name>", "<file_sep>",
                    "<filename>", "<gh_stars>")
_DEEPSEEK_STOPS = ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>", "<|EOT|>")
_CODELLAMA = (("▁<PRE>", "<PRE>"), ("▁<SUF>", "<SUF>"), ("▁<MID>", "<MID>"))
_CODELLAMA_STOPS = ("▁<PRE>", "<PRE>", "▁<SUF>", "<SUF>", "▁<MID>", "<MID>")
_SENTINELS = (("<mask_1>",), ("<mask_2>",), ("<sep>",))

FORMATS: dict[str, InfillFormat] = {f.name: f for f in (
    InfillFormat("codegen2", "codegen", (("<mask_1>",), ("<mask_1>",), ("<sep>",)), "codegen2", end=("<eom>",)),
    InfillFormat("fim", "codegen", _SENTINELS, "sentinel-fim", end=("<eom>",)),
    InfillFormat("qwen", "qwen2", (("<|fim_prefix|>",), ("<|fim_suffix|>",), ("<|fim_middle|>",)), "psm",
                 stops=_QWEN_STOPS, repo=("<|repo_name|>", "<|file_sep|>")),
    InfillFormat("starcoder2", "starcoder2", (("<fim_prefix>",), ("<fim_suffix>",), ("<fim_middle>",)), "psm",
                 stops=_STARCODER_STOPS, repo=("<repo_name>", "<file_sep>")),
    InfillFormat("deepseek", "llama", (("<｜fim▁begin｜>",), ("<｜fim▁hole｜>",), ("<｜fim▁end｜>",)), "psm",
                 stops=_DEEPSEEK_STOPS, bos=True),
    InfillFormat("codellama", "llama", _CODELLAMA, "psm", end=("▁<EOT>", "<EOT>"), stops=_CODELLAMA_STOPS,
                 bos=True, suffix_space=False),
    InfillFormat("codellama-spm", "llama", _CODELLAMA, "spm", end=("▁<EOT>", "<EOT>"), stops=_CODELLAMA_STOPS,
                 bos=True, suffix_space=False),
)}
INFILL_FORMATS = tuple(FORMATS)

# Which formats a family tries, in order: the family decides where a tokenizer holds several.
_FAMILY_ORDER = {
    "codegen": ("codegen2",),
    "llama": ("codegen2", "deepseek", "codellama", "qwen", "starcoder2"),
    "qwen2": ("qwen",),
    "starcoder2": ("starcoder2",),
}


def detect_format(arch: str, specials: Specials) -> str | None:
    """The infill format of a model of family `arch` with this tokenizer, or None when it has none."""
    order = _FAMILY_ORDER.get(arch, ("codegen2",)) + tuple(n for n in FORMATS if n != "fim")
    return next((name for name in order if FORMATS[name].available(specials)), None)


def resolve_format(name: InfillFormat | str | None, arch: str, specials: Specials) -> InfillFormat:
    """The format `name` (None: detected), checked against the tokenizer; one line when there is none."""
    if isinstance(name, InfillFormat):
        name.marker_ids(specials)
        return name
    if name is None:
        name = detect_format(arch, specials)
        if name is None:
            raise UserError(f"this {arch} model has no infill format: its tokenizer has none of the FIM tokens "
                            f"of {', '.join(INFILL_FORMATS)}")
    if name not in FORMATS:
        raise UserError(f"unknown infill format {name!r}; choose from {', '.join(INFILL_FORMATS)}")
    fmt = FORMATS[name]
    fmt.marker_ids(specials)  # refuses a format whose tokens the tokenizer lacks
    return fmt


def _as_format(fmt: InfillFormat | str) -> InfillFormat:
    if isinstance(fmt, InfillFormat):
        return fmt
    if fmt not in FORMATS:
        raise UserError(f"unknown infill format {fmt!r}; choose from {', '.join(INFILL_FORMATS)}")
    return FORMATS[fmt]


def infill_prompt(specials: Specials, prefix_ids: Sequence[int], suffix_ids: Sequence[int],
                  fmt: InfillFormat | str = "codegen2", context_ids: Sequence[int] = ()) -> list[int]:
    """Token ids of an infill prompt in format `fmt`; the model's next token starts the middle.

    `context_ids` (from `repo_context`) go after BOS and before the FIM markers."""
    fmt = _as_format(fmt)
    p, s, m = fmt.marker_ids(specials)
    prefix, suffix = list(prefix_ids), list(suffix_ids)
    head = [specials.bos] if fmt.bos and specials.bos is not None else []
    head += list(context_ids)
    if fmt.layout == "codegen2":
        return head + prefix + [p] + suffix + [specials.eot, m, p]
    if fmt.layout == "spm":
        return head + [p, s] + suffix + [m] + prefix
    return head + [p] + prefix + [s] + suffix + [m]  # psm and CodeGen2's sentinel FIM


def end_id(specials: Specials, fmt: InfillFormat | str) -> int:
    """The token that closes a middle in training and in the infill loss (<eom>, ▁<EOT>, else end-of-text)."""
    fmt = _as_format(fmt)
    return specials.eot if fmt.end is None else specials.find(*fmt.end)


def infill_stop_ids(specials: Specials, fmt: InfillFormat | str = "codegen2") -> tuple[int, ...]:
    """Token ids that end a middle: the end token, the end-of-text, and every FIM / repository token there is."""
    fmt = _as_format(fmt)
    ids = [end_id(specials, fmt), specials.eot] + [specials.ids[t] for t in fmt.stops if t in specials.ids]
    return tuple(dict.fromkeys(ids))


def repo_context(specials: Specials, fmt: InfillFormat | str, encode: Callable[[str], list[int]],
                 extra_files: Sequence[tuple[str, str]], repo_name: str = "repo") -> list[int]:
    """Other files of the project laid out as the format's repository level (empty without files or a layout):
    qwen `<|repo_name|>name\\n<|file_sep|>path\\ntext\\n...`, starcoder2 `<repo_name>name<file_sep>path\\ntext...`."""
    fmt = _as_format(fmt)
    if not extra_files or fmt.repo is None or any(t not in specials.ids for t in fmt.repo):
        return []
    repo, sep = (specials.ids[t] for t in fmt.repo)
    newline = "\n" if fmt.name == "qwen" else ""
    ids = [repo] + encode(repo_name + newline)
    for path, text in extra_files:
        ids += [sep] + encode(f"{path}\n{text}{newline}")
    return ids


def build_infill(tokenizer, prefix: str, suffix: str, fmt: InfillFormat | str,
                 extra_files: Sequence[tuple[str, str]] = (), repo_name: str = "repo") -> list[int]:
    """Encode and lay out one infill request (what the CLI and the server call): prefix, suffix and other files
    of the project (path, text) where the format has a repository layout."""
    fmt = _as_format(fmt)
    specials = Specials.of(tokenizer)
    suffix_ids = tokenizer.encode(suffix) if fmt.suffix_space else tokenizer.encode_suffix(suffix)
    context = repo_context(specials, fmt, tokenizer.encode, extra_files, repo_name)
    return infill_prompt(specials, tokenizer.encode(prefix), suffix_ids, fmt, context)


def add_infill_format_arg(parser) -> None:
    """The one `--infill-format NAME` flag (codegen2 infill, eval infill-single / infill-multi, eval heldout)."""
    parser.add_argument("--infill-format", dest="infill_format", choices=INFILL_FORMATS, default=None,
                        help="fill-in-the-middle layout (default: detected from the model's family and tokenizer)")
