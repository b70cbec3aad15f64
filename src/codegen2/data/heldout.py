"""The held-out split of a run and the loss measured on it: one home for the in-training probe
(`train.eval_every`) and `codegen2 eval heldout`, below both.

The documents are exactly those the run's prepared data held out (never trained on); they are joined with
the end-of-text token and cut into rows of the training window, and the loss is next-token cross-entropy.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from codegen2.data.pipeline import run_prepared_dir
from codegen2.data.prepare import PreparedData
from codegen2.errors import UserError


def run_heldout_documents(config, run_dir) -> list:
    """The held-out documents of a run: exactly those its prepared data kept (RUN/prepared, or data.prepared)."""
    root = run_prepared_dir(config, run_dir)
    if not config.data.prepared and not root.is_dir():
        raise UserError(f"{run_dir} has no prepared data ({root}): it was trained by an earlier codegen2 on its "
                        f"token cache; `codegen2 train --out {run_dir} --resume` prepares it")
    return PreparedData.open(root).heldout_documents()


def chunk_tokens(docs_tokens: list[list[int]], eot: int, window: int, max_tokens: int) -> torch.Tensor:
    """Join documents with eot and cut [N, window + 1] rows (inputs plus the shifted targets)."""
    stream: list[int] = []
    for tokens in docs_tokens:
        stream.extend(tokens)
        stream.append(eot)
        if len(stream) > max_tokens:
            break
    stream = stream[: max_tokens + 1]
    rows = (len(stream) - 1) // window
    if rows < 1:
        return torch.empty(0, window + 1, dtype=torch.long)
    data = torch.tensor(stream[: rows * window + 1], dtype=torch.long)
    return torch.stack([data[i * window: i * window + window + 1] for i in range(rows)])


@torch.inference_mode()
def rows_loss(model, rows: torch.Tensor, batch_size: int, split: int = 0, bidirectional: bool = False,
              autocast=None) -> tuple[float, int]:
    """(summed cross-entropy, scored tokens) of [N, window + 1] rows, scoring the positions from `split` on.

    The one scoring loop behind the held-out loss, the completion loss and the in-training probe; with
    `bidirectional` the first `split` positions are the model's bidirectional prefix.
    """
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start: start + batch_size].to(device)
        prefix_len = torch.full((len(batch),), split, device=device) if bidirectional else None
        with autocast if autocast is not None else contextlib.nullcontext():
            logits = model(batch[:, :-1], prefix_len=prefix_len)[:, split:]
        targets = batch[:, split + 1:]
        total += float(F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum"))
        count += targets.numel()
    return total, count


class HeldoutProbe:
    """Held-out code and prose loss during training (`train.eval_every`): the rows are tokenized once, then
    every probe is a few forward passes with no randomness, so it never changes what training does next."""

    def __init__(self, documents: list, tokenizer, window: int, max_tokens: int, batch_size: int):
        self.batch_size = batch_size
        self.rows = {}
        for kind in ("code", "nl"):
            texts = [d.text for d in documents if d.kind == kind]
            rows = chunk_tokens(tokenizer.encode_batch(texts), tokenizer.eot_id, window, max_tokens) if texts else None
            if rows is not None and len(rows):
                self.rows[kind] = rows

    @torch.no_grad()
    def __call__(self, model, autocast=None) -> dict[str, float]:
        """{"eval_code_loss": ..., "eval_nl_loss": ...} for the kinds the held-out split has."""
        was_training = model.training
        model.eval()
        out = {}
        try:
            for kind, rows in self.rows.items():
                total, count = rows_loss(model, rows, self.batch_size, autocast=autocast)
                out[f"eval_{kind}_loss"] = total / count
        finally:
            model.train(was_training)
        return out
