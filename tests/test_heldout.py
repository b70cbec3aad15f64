"""Held-out metrics: the infill task set is fixed and lossless; the loss matches a direct computation."""

import json

import pytest
import torch
import torch.nn.functional as F

from codegen2.config import ModelConfig
from codegen2.data import Document
from codegen2.data.heldout import chunk_tokens
from codegen2.eval.heldout import (
    InfillTask,
    completion_loss,
    default_infill_format,
    evaluation_data_config,
    heldout_loss,
    infill_loss,
    single_line_tasks,
)
from codegen2.infill import Specials, infill_prompt
from codegen2.models.codegen.model import CodeGenModel


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


def tiny_model(seed: int = 0) -> CodeGenModel:
    torch.manual_seed(seed)
    return CodeGenModel(ModelConfig(vocab_size=300, n_layer=2, n_embd=32, n_head=2, rotary_dim=8, n_ctx=128,
                                    mp_num=1)).eval()


def test_infill_prompts_follow_the_trained_layouts():
    import numpy as np

    from codegen2.objectives import SpecialIds, fim_transform
    from conftest import CharTokenizer

    tok = CharTokenizer()
    prefix, suffix = tok.encode("def f(x):\n    "), tok.encode("\n    return y\n")
    # CodeGen2 (docs/design.md §2): prefix <mask_1> suffix <|endoftext|> <sep> <mask_1>
    assert infill_prompt(Specials.of(tok), prefix, suffix, "codegen2") == (
        prefix + [tok.mask_id(1)] + suffix + [tok.eot_id, tok.sep_id, tok.mask_id(1)])
    # FIM PSM: the training transform's output up to and including <sep>, for a cut at the same places.
    special = SpecialIds(eot=tok.eot_id, sep=tok.sep_id, eom=tok.eom_id, masks=tuple(tok.mask_id(k) for k in (1, 2)))
    middle = tok.encode("y = x")
    doc = np.array(prefix + middle + suffix)

    class Cuts:  # the rng of fim_transform draws the two cut points
        def integers(self, low, high, size):
            return np.array([len(prefix), len(prefix) + len(middle)])

    transformed = fim_transform(doc, Cuts(), special, spm=False).tolist()
    sep = transformed.index(tok.sep_id)
    assert infill_prompt(Specials.of(tok), prefix, suffix, "fim") == transformed[: sep + 1]
    assert transformed[sep + 1:] == middle + [tok.eom_id]


def test_infill_loss_equals_one_task_at_a_time():
    from conftest import CharTokenizer

    tok = CharTokenizer()
    tasks = [InfillTask("a.py", "import os\n" * k, f"x_{k} = {k * 7}", "\nprint(x)\n" * (3 - k)) for k in range(3)]
    for bidirectional in (False, True):
        for fmt in ("codegen2", "fim"):
            model = tiny_model()
            batched = infill_loss(model, tok, tasks, context_tokens=60, batch_size=2,
                                  bidirectional_prompt=bidirectional, fmt=fmt)
            total, count = 0.0, 0
            for task in tasks:  # no padding, no batching: the whole sequence scored directly
                prompt = infill_prompt(Specials.of(tok), tok.encode(task.prefix)[-36:],
                                       tok.encode(task.suffix)[:24], fmt)
                target = tok.encode(task.line) + [tok.eom_id]
                ids = torch.tensor([prompt + target])
                kwargs = {"prefix_len": torch.tensor([len(prompt)])} if bidirectional else {}
                with torch.no_grad():
                    logits = model(ids, **kwargs)[0, len(prompt) - 1: -1]
                total += float(F.cross_entropy(logits, torch.tensor(target), reduction="sum"))
                count += len(target)
            assert batched["tokens"] == count
            assert abs(batched["loss"] - total / count) < 1e-5, (bidirectional, fmt)


def test_every_mixture_is_scored_on_the_same_heldout_files():
    from codegen2.config import DataConfig, ObjectiveConfig
    from codegen2.data import heldout_documents

    code_only = evaluation_data_config(DataConfig(embedded_code_weight=1.0, embedded_nl_weight=0.0,
                                                  embedded_max_files=40, heldout_fraction=0.2))
    prose_only = evaluation_data_config(DataConfig(embedded_code_weight=0.0, embedded_nl_weight=1.0,
                                                   embedded_max_files=40, heldout_fraction=0.2))
    for kind in ("code", "nl"):
        a = [d.path for d in heldout_documents(code_only, kind=kind)]
        b = [d.path for d in heldout_documents(prose_only, kind=kind)]
        assert a and a == b
    assert default_infill_format(ObjectiveConfig(span_rate=0.0, fim_rate=0.5)) == "fim"
    assert default_infill_format(ObjectiveConfig(span_rate=0.5)) == "codegen2"
    assert default_infill_format(ObjectiveConfig(span_rate=0.0)) == "codegen2"


def test_completion_loss_scores_the_second_half_given_the_first():
    model = tiny_model()
    texts = [d.text for d in docs()]
    rows = chunk_tokens(ByteTokenizer().encode_batch(texts), 256, 32, 200)
    for bidirectional in (False, True):
        result = completion_loss(model, ByteTokenizer(), texts, window=32, max_tokens=200, batch_size=4,
                                 bidirectional=bidirectional)
        losses = []
        for row in rows:  # one window at a time (the prefix-LM mask itself is checked in test_masks.py)
            with torch.no_grad():
                logits = model(row[None, :-1], prefix_len=torch.tensor([16]) if bidirectional else None)[0]
            losses.append(F.cross_entropy(logits[16:], row[17:], reduction="none"))
        direct = torch.cat(losses).mean()
        assert result["tokens"] == len(rows) * 16
        assert abs(result["loss"] - float(direct)) < 1e-5
    causal = completion_loss(model, ByteTokenizer(), texts, 32, 200, 4, bidirectional=False)["loss"]
    mixed = completion_loss(model, ByteTokenizer(), texts, 32, 200, 4, bidirectional=True)["loss"]
    assert abs(causal - mixed) > 1e-6  # the prefix really is read differently


@pytest.mark.parametrize("fraction, words", [(0.0, "data.heldout_fraction = 0"),
                                             (0.01, "fell in the held-out split")])
def test_heldout_with_nothing_held_out_says_why(tmp_path, small_tokenizer, capsys, fraction, words):
    from codegen2 import cli
    from codegen2.config import SourceConfig, load_config, save_config
    from codegen2.data import prepare_data
    from conftest import make_random_run

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "one.py").write_text("def one():\n    return 1\n" * 30)
    run = make_random_run(tmp_path / "run", small_tokenizer, 64)
    config = load_config(run / "config.toml")
    config.data.sources = [SourceConfig(path=str(corpus), kind="code")]
    config.data.heldout_fraction = fraction
    save_config(config, run / "config.toml")
    prepare_data(config, run, log=lambda message: None)  # what training does first: RUN/prepared
    capsys.readouterr()
    assert cli.main(["eval", "heldout", "--checkpoint", str(run), "--n-infill", "0"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured
    assert "no held-out documents" in captured.err and words in captured.err, captured.err


def test_eval_scores_exactly_the_prepared_heldout_documents(tmp_path, small_tokenizer, capsys, monkeypatch):
    """`eval heldout` on a run reads the held-out documents of the run's prepared data, not the raw sources:
    a held-out file that duplicates a training file was removed there and is not scored, and the raw files
    can be gone."""
    import shutil

    from codegen2 import cli
    from codegen2.config import SourceConfig, load_config, save_config
    from codegen2.data import is_heldout, prepare_data
    from codegen2.data.prepare import PreparedData
    from codegen2.eval import heldout as heldout_module
    from conftest import make_random_run

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"m{i}.py").write_text(f"def f{i}(value):\n    total = value * {i}\n    return total + {i}\n")
    names = [f"m{i}.py" for i in range(40)]
    held = [n for n in names if is_heldout(n, 0.25)]
    trained = [n for n in names if not is_heldout(n, 0.25)]
    (corpus / held[0]).write_text((corpus / trained[0]).read_text())  # a held-out copy of a training file
    run = make_random_run(tmp_path / "run", small_tokenizer, 64)
    config = load_config(run / "config.toml")
    config.data.sources = [SourceConfig(path=str(corpus), kind="code")]
    config.data.heldout_fraction = 0.25
    save_config(config, run / "config.toml")
    prepare_data(config, run, log=lambda message: None)
    prepared = PreparedData.open(run / "prepared").heldout_documents()
    assert len(prepared) in (len(held) - 1, len(held))  # the duplicate pair keeps one copy, in whichever split
    removed = [line for line in (run / "prepared" / "removed.jsonl").read_text().splitlines()]
    assert len(removed) == 1 and "exact_duplicate" in removed[0]
    seen = []
    evaluate = heldout_module.evaluate_heldout
    monkeypatch.setattr(heldout_module, "evaluate_heldout",
                        lambda loaded, documents, *args: seen.append(documents) or evaluate(loaded, documents, *args))
    shutil.rmtree(corpus)  # evaluation never reads the raw files
    assert cli.main(["eval", "heldout", "--checkpoint", str(run), "--n-infill", "0", "--max-tokens", "500"]) == 0
    assert [(d.path, d.text, d.kind) for d in seen[0]] == [(d.path, d.text, d.kind) for d in prepared]
    assert json.loads((run / "eval" / "heldout.json").read_text())["heldout_docs"] == {"code": len(prepared), "nl": 0}
    # --baseline scores a freshly initialised model of the same shape, seeded: the same table on every run
    # (and the caller's random state is left as it was)
    untrained = []
    for _ in range(2):
        state = torch.random.get_rng_state()
        assert cli.main(["eval", "heldout", "--checkpoint", str(run), "--n-infill", "0", "--max-tokens", "500",
                         "--baseline"]) == 0
        assert torch.equal(torch.random.get_rng_state(), state)
        untrained.append(json.loads((run / "eval" / "heldout.json").read_text())["untrained"]["code"]["loss"])
    assert untrained[0] == untrained[1]


def test_eval_data_of_a_run_must_be_prepared_data(tmp_path, small_tokenizer, capsys):
    """--data on a run scores another prepared directory (tests/test_lora_train.py); a directory that is none is
    refused in one line."""
    from codegen2 import cli
    from conftest import make_random_run

    run = make_random_run(tmp_path / "run", small_tokenizer, 64)
    (tmp_path / "empty").mkdir()
    assert cli.main(["eval", "heldout", "--checkpoint", str(run), "--data", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "prepared data" in err and "no manifest.json" in err and err.count("\n") == 1, err
