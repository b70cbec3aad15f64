"""Fill-in-the-middle prompts: the one place an infill prompt is laid out, for every command.

A format turns a prefix and a suffix (token ids) into the prompt after which the model's next token starts
the middle. Formats read only the tokenizer's sentinel ids (`Sentinels`), so this module needs no tokenizer:

  codegen2: prefix <mask_1> suffix <|endoftext|> <sep> <mask_1>   -> middle <eom>   (docs/design.md §2)
  fim:      <mask_1> prefix <mask_2> suffix <sep>                   -> middle <eom>   (FIM, PSM order)

`codegen2 infill`, the server's `suffix` requests and the infilling evaluations all build their prompts here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Sentinels:
    """The special token ids infill prompts are built from; `masks` holds <mask_1> and, if any, <mask_2>."""

    masks: tuple[int, ...]
    eot: int
    sep: int
    eom: int

    @classmethod
    def of(cls, tokenizer) -> Sentinels:
        """The sentinel ids of a tokenizer (anything with `mask_id(k)`, `eot_id`, `sep_id` and `eom_id`)."""
        masks = [tokenizer.mask_id(1)]
        try:
            masks.append(tokenizer.mask_id(2))
        except ValueError:  # a tokenizer with one mask still serves the codegen2 format
            pass
        return cls(masks=tuple(masks), eot=tokenizer.eot_id, sep=tokenizer.sep_id, eom=tokenizer.eom_id)

    def mask(self, k: int) -> int:
        if k > len(self.masks):
            raise ValueError(f"<mask_{k}> does not exist: this tokenizer has <mask_1>..<mask_{len(self.masks)}>")
        return self.masks[k - 1]


def _codegen2(s: Sentinels, prefix: list[int], suffix: list[int]) -> list[int]:
    return prefix + [s.mask(1)] + suffix + [s.eot, s.sep, s.mask(1)]


def _fim(s: Sentinels, prefix: list[int], suffix: list[int]) -> list[int]:
    return [s.mask(1)] + prefix + [s.mask(2)] + suffix + [s.sep]


FORMATS: dict[str, Callable[[Sentinels, list[int], list[int]], list[int]]] = {"codegen2": _codegen2, "fim": _fim}
INFILL_FORMATS = tuple(FORMATS)


def infill_prompt(sentinels: Sentinels, prefix_ids: list[int], suffix_ids: list[int],
                  fmt: str = "codegen2") -> list[int]:
    """Token ids of an infill prompt in format `fmt`; the model's next token starts the middle."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown infill format {fmt!r}; choose from {', '.join(INFILL_FORMATS)}")
    return FORMATS[fmt](sentinels, list(prefix_ids), list(suffix_ids))


def infill_stop_ids(sentinels: Sentinels) -> tuple[int, ...]:
    """Token ids that end a middle: <eom>, or <|endoftext|> from a model that gave up."""
    return (sentinels.eom, sentinels.eot)
