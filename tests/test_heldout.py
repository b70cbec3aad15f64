"""Held-out metrics: the infill task set is fixed and lossless; the loss matches a direct computation."""

import torch
import torch.nn.functional as F

from codegen2.data import Document
from codegen2.eval.heldout import chunk_tokens, heldout_loss, single_line_tasks
from codegen2.model import CodeGenModel
from codegen2.config import ModelConfig


def docs():
    return [Document(text="".join(f"line_{d}_{i} = {i}\n" for i in range(30)), path=f"f{d}.py", kind="code")
            for d in range(4)]


def test_tasks_are_deterministic_spread_and_rebuild_the_file():
    tasks = single_line_tasks(docs(), 10)
    assert tasks == single_line_tasks(list(reversed(docs())), 10)
    assert len(tasks) == 10 and {t.path for t in tasks} == {"f0.py", "f1.py", "f2.py", "f3.py"}
    by_path = {d.path: d.text for d in docs()}
    for task in tasks:
        assert task.prefix + task.line + task.suffix == by_path[task.path]
        assert "\n" not in task.line and task.line.strip()


class ByteTokenizer:
    eot_id = 256

    def encode_batch(self, texts):
        return [list(t.encode()) for t in texts]


def test_heldout_loss_equals_a_direct_cross_entropy():
    torch.manual_seed(0)
    model = CodeGenModel(ModelConfig(vocab_size=260, n_layer=1, n_embd=32, n_head=2, rotary_dim=8, n_ctx=64,
                                     mp_num=1)).eval()
    texts = [d.text for d in docs()]
    result = heldout_loss(model, ByteTokenizer(), texts, window=32, max_tokens=200, batch_size=3)
    rows = chunk_tokens(ByteTokenizer().encode_batch(texts), 256, 32, 200)
    assert rows.shape == (6, 33) and result["tokens"] == 6 * 32
    with torch.no_grad():
        direct = F.cross_entropy(model(rows[:, :-1]).flatten(0, 1), rows[:, 1:].flatten())
    assert abs(result["loss"] - float(direct)) < 1e-5
