"""The chunked head + cross-entropy (`codegen2.head_loss`) against the plain way: the full [tokens, vocab] logits
through `F.cross_entropy`, in float32. The same token losses and the same gradients for every trained tensor, on
CodeGen (untied head with a bias), LLaMA (untied, no bias) and Qwen2 (tied head), for full training, LoRA and LoRA
with added token rows; and no tensor of the full logits' size is ever made."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from codegen2.config import ModelConfig
from codegen2.head_loss import IGNORE_INDEX, chunk_positions, head_loss
from codegen2.lora import LoraSettings, attach_lora, train_rows
from codegen2.models import build_model
from codegen2.train import output_head

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # (fixture in conftest.py)

VOCAB = 300
SHAPES = {
    "codegen": dict(vocab_size=VOCAB, n_layer=2, n_embd=32, n_head=4, rotary_dim=4, n_ctx=64, mp_num=2),
    "llama": dict(arch="llama", vocab_size=VOCAB, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, rotary_dim=8,
                  n_inner=48, n_ctx=64),
    "qwen2": dict(arch="qwen2", vocab_size=VOCAB, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, rotary_dim=8,
                  n_inner=48, n_ctx=64, tie_word_embeddings=True),
}


def make_model(arch: str, mode: str) -> torch.nn.Module:
    """A random model of `arch`: fully trained, with LoRA (B nonzero, so the adapters change the logits), or with
    LoRA and the last 6 token rows trained."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(**SHAPES[arch])).train()
    if mode != "full":
        attach_lora(model, LoraSettings(rank=4, dropout=0.0), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.05)
    if mode == "rows":
        train_rows(model, range(VOCAB - 6, VOCAB))
        with torch.no_grad():
            for module in model.modules():
                if hasattr(module, "rows"):
                    module.rows.normal_(0.0, 0.1)
    return model


def batch(seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences of 21 tokens (42 positions: no chunk size below divides them evenly), some targets ignored
    and the added rows' ids among the targets."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 21), generator=generator)
    labels = torch.randint(0, VOCAB, (2, 21), generator=generator)
    labels[0, :4] = IGNORE_INDEX
    labels[1, 10:13] = IGNORE_INDEX
    labels[1, -3:] = torch.tensor([VOCAB - 1, VOCAB - 3, VOCAB - 6])
    return ids, labels


def plain(model: torch.nn.Module, ids, labels, scale: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The token losses and the gradients of `scale * sum of token losses` by the plain way."""
    model.zero_grad(set_to_none=True)
    logits = model(ids)
    losses = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                             reduction="none").view_as(labels)
    (losses.sum() * scale).backward()
    return losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def chunked(model: torch.nn.Module, ids, labels, scale: float, chunk: int):
    model.zero_grad(set_to_none=True)
    hidden = model(ids, return_hidden=True)
    head, params, _ = output_head(model, contextlib.nullcontext())
    total, losses = head_loss(hidden, labels, head, params, chunk)
    (total * scale).backward()
    return total.detach(), losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["full", "lora", "rows"])
@pytest.mark.parametrize("arch", ["codegen", "llama", "qwen2"])
def test_chunked_loss_and_gradients_equal_the_full_logits_way(arch, mode):
    model = make_model(arch, mode)
    ids, labels = batch()
    want_losses, want_grads = plain(model, ids, labels, 1 / 37)
    assert (want_losses == 0).sum() == 7  # the ignored targets
    for chunk in (5, 16, chunk_positions(VOCAB, 32)):
        total, losses, grads = chunked(model, ids, labels, 1 / 37, chunk)
        torch.testing.assert_close(losses, want_losses, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(total, want_losses.sum(), atol=1e-5, rtol=1e-6)
        assert grads.keys() == want_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, want_grads[name], atol=1e-7, rtol=1e-5, msg=f"{name}, chunk {chunk}")
    if mode == "rows":
        assert any(name.endswith(".rows") for name in grads)
    with torch.no_grad():  # evaluation: the same losses, no gradient taken
        total, losses = head_loss(model(ids, return_hidden=True), labels, *output_head(model, contextlib.nullcontext()))
    assert not total.requires_grad
    torch.testing.assert_close(losses, want_losses, atol=1e-6, rtol=1e-6)
    if mode == "full":
        assert any("lm_head" in n or "embed" in n or "wte" in n for n in grads)  # the head's own gradient


class LargestTensor(TorchDispatchMode):
    """The largest number of elements of any new tensor an operator returns (views of its inputs left out)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_no_tensor_holds_the_full_logits(mode):
    """Chunks of 8 positions: nothing bigger than 8 x vocab is made (the plain way makes 42 x vocab)."""
    model = make_model("codegen", mode)
    ids, labels = batch()
    hidden = model(ids, return_hidden=True)
    head, params, _ = output_head(model, contextlib.nullcontext())
    with LargestTensor() as seen:
        total, _ = head_loss(hidden, labels, head, params, 8)
        total.backward(inputs=[hidden, *params])
    weights = max(p.numel() for p in params) if params else 0  # a trained head's [vocab, d] gradient
    assert seen.largest <= max(8 * VOCAB, weights)
    assert 8 * VOCAB < ids.numel() * VOCAB and weights < ids.numel() * VOCAB
    with LargestTensor() as seen:
        F.cross_entropy(model(ids).flatten(0, 1), labels.flatten()).backward()
    assert seen.largest >= ids.numel() * VOCAB  # the check above can fail


def test_bf16_autocast_head_agrees_with_the_plain_way():
    model = make_model("llama", "lora")
    ids, labels = batch()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    with autocast:
        logits = model(ids)
    want = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="none").view_as(labels)
    want.sum().backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    with autocast:
        hidden = model(ids, return_hidden=True)
    total, losses = head_loss(hidden, labels, *output_head(model, autocast)[:2], chunk=8)
    total.backward()
    torch.testing.assert_close(losses, want.detach(), atol=0.0, rtol=0.0)  # the same bf16 head, the same losses
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, want_grads[name], atol=1e-3, rtol=2e-2, msg=name)


def test_chunk_size_is_a_budget_of_logits_growing_with_the_width():
    assert chunk_positions(51200, 768) == 81 and chunk_positions(51200, 1024) == 102
    assert chunk_positions(51200, 2048) == 204 and chunk_positions(152064, 896) == 89
    assert chunk_positions(152064, 64) == 32 and chunk_positions(1000, 768) == 4194
    assert chunk_positions(51200, 768, head_trains=True) == 256
    assert chunk_positions(51200, 4096, head_trains=True) == 409
    assert chunk_positions(1000, 768, head_trains=True) == 4194
    model = make_model("codegen", "lora")
    assert output_head(model, contextlib.nullcontext())[1:] == ([], chunk_positions(VOCAB, 32))
