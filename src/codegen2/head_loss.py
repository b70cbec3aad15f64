"""The training loss: the output head and the cross-entropy over the final hidden states, a chunk of positions at a
time, so that the [tokens, vocab] logits never exist whole.

The plain way (`logits = head(hidden)`, then `F.cross_entropy(logits.float(), labels)`) holds the logits, the
log-softmax that the cross-entropy saves for backward and, in backward, the gradients of both: four [tokens, vocab]
float32 tensors, 0.42 GB for one sequence of 512 tokens over CodeGen's 51,200-token vocabulary. At the 125m shape
that is more than every LoRA activation of the blocks.

Here each chunk of `chunk` positions goes through the head and the cross-entropy, and its gradients (with respect
to its hidden states and to the head's trained parameters) are taken at once, while its logits exist; they are
freed before the next chunk. The backward pass only scales what was kept: the [tokens, d] gradient of the hidden
states, and the head's own gradients when the head trains. So nothing is computed twice (no recompute, as
activation checkpointing would do) and the FLOPs are the plain way's. This works because training differentiates
one number, the (scaled) sum of the token losses: the token losses come out too, for the per-objective
accounting, but carry no gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CHUNK_BYTES = 16 * 2**20  # float32 logits per chunk: 81 positions over a 51,200-token vocabulary
MIN_CHUNK = 32  # positions: fewer make the head's matmuls inefficient
# Positions per chunk at least width / HEAD_READS: every chunk reads the [vocab, d] head twice (its logits, and its
# hidden states' gradient) while it makes and reads ~4 [positions, vocab] tensors, so the head's reads grow against
# the chunk's own work as d / positions. With the 1b shape's head (d 2048, 1 thread, a busy machine), 512 positions
# through the head and the loss took 2.45 s at once, 3.55 s in chunks of 81 (7% of a LoRA forward + backward),
# 2.64 s in chunks of 204 (d / 10) and 2.47 s in chunks of 256. At 125m d / 10 leaves the 16 MiB budget (81
# positions), which its memory target needs: 96 positions put its LoRA peak at 45% of full training's.
HEAD_READS = 10
# Positions per chunk at least when the head trains (full training, added token rows): every chunk then makes and
# adds a [vocab, d] gradient of the head, and at 81 positions those passes made the 125m shape's forward + backward
# 20% slower than the full logits' (256 positions: within the noise; benchmarks/bench_head_loss.py).
TRAINED_HEAD_CHUNK = 256


def chunk_positions(vocab_size: int, width: int, head_trains: bool = False) -> int:
    """Positions per chunk: `CHUNK_BYTES` of float32 logits, at least `MIN_CHUNK` and `width / HEAD_READS` (at least
    `TRAINED_HEAD_CHUNK` when a parameter of the head trains). `width` is the hidden size d."""
    floor = TRAINED_HEAD_CHUNK if head_trains else MIN_CHUNK
    return max(floor, width // HEAD_READS, CHUNK_BYTES // (4 * vocab_size))


def head_loss(hidden: torch.Tensor, labels: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
              params: Sequence[torch.Tensor], chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the token losses, the token losses shaped like `labels`) of `head(hidden)` against `labels`.

    `hidden` [..., d] are the final hidden states and `labels` [...] the targets (IGNORE_INDEX: no loss). `head`
    maps hidden states to logits; `params` are the tensors it reads that need gradients (the head's trained
    parameters; any that it does not read get none). Only the sum carries a gradient, and backward may run once.
    `chunk` positions at a time (`chunk_positions` of the vocabulary). Without grad mode nothing is differentiated.
    """
    if not torch.is_grad_enabled():
        params, hidden = (), hidden.detach()
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    total, losses = _ChunkedHeadLoss.apply(flat_hidden, labels.reshape(-1), head, chunk, *params)
    return total, losses.view(labels.shape)


class _ChunkedHeadLoss(torch.autograd.Function):
    """The loss of `head_loss`, its gradients computed chunk by chunk in forward and scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, labels, head, chunk, *params):
        wanted = [hidden.requires_grad] + [p.requires_grad for p in params]
        sources = [p for p in params if p.requires_grad]
        losses = torch.empty(labels.shape, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        sums: list[torch.Tensor | None] = [None] * len(sources)
        for start in range(0, labels.numel(), chunk):
            stop = min(start + chunk, labels.numel())
            piece = hidden[start:stop].detach().requires_grad_(hidden.requires_grad)
            with torch.enable_grad():
                logits = head(piece)
                loss = F.cross_entropy(logits.float(), labels[start:stop], ignore_index=IGNORE_INDEX,
                                       reduction="none")
                chunk_total = loss.sum()
            inputs = ([piece] if hidden.requires_grad else []) + sources
            if inputs:
                grads = list(torch.autograd.grad(chunk_total, inputs, allow_unused=True))
                if hidden.requires_grad:
                    grad_hidden[start:stop] = grads.pop(0)
                _accumulate(sums, grads)
            losses[start:stop] = loss.detach()
            del logits, loss, chunk_total  # before the next chunk's are made
        ctx.wanted, ctx.grad_hidden = wanted, grad_hidden
        ctx.param_grads = [None if s is None else s.to(p.dtype) for s, p in zip(sums, sources)]
        ctx.mark_non_differentiable(losses)
        return losses.sum(), losses

    @staticmethod
    def backward(ctx, grad_total, _grad_losses):
        kept = iter(ctx.param_grads)
        grads = [ctx.grad_hidden if ctx.wanted[0] else None] + [next(kept) if w else None for w in ctx.wanted[1:]]
        ctx.grad_hidden = ctx.param_grads = None  # backward runs once: the kept gradients are scaled in place
        grads = [None if g is None else g.mul_(grad_total.to(g.dtype)) for g in grads]
        return grads[0], None, None, None, *grads[1:]


def _accumulate(sums: list[torch.Tensor | None], grads: Sequence[torch.Tensor | None]) -> None:
    """Add one chunk's parameter gradients into `sums`, in float32 whatever the parameter's dtype."""
    for index, grad in enumerate(grads):
        if grad is None:
            continue
        if sums[index] is None:
            sums[index] = grad if grad.dtype == torch.float32 else grad.float()
        else:
            sums[index].add_(grad)
