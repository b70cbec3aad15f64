"""Data pipeline: sources and formats, held-out split, a run's in-line prepared data, the mixture and the loader."""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import threading
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from codegen2.config import Config, DataConfig, ObjectiveConfig, SourceConfig
from codegen2.data import embedded
from codegen2.data.documents import is_heldout
from codegen2.data.formats import path_selected
from codegen2.data.loader import BatchLoader
from codegen2.data.mixture import BLOCK, PackedMixture
from codegen2.data.pipeline import prepare_data
from codegen2.data.prepare import PreparedData
from codegen2.data.prepare.secrets import SecretScanner
from codegen2.data.sources import embedded_sources, heldout_documents, source_from_path, user_sources
from codegen2.errors import UserError
from codegen2.objectives import OBJECTIVE_CODES, make_example
from codegen2.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    root = embedded.stdlib_root()
    texts = [(root / name).read_text(encoding="utf-8") for name in ("textwrap.py", "shlex.py", "bisect.py")]
    return train_tokenizer(texts, 600, 8)


def _data(sources, fraction=0.0, **kw) -> DataConfig:
    return DataConfig(sources=sources, heldout_fraction=fraction, **kw)


def _docs(cfg: DataConfig, split="train"):
    (source,) = user_sources(cfg, split)
    return source, list(source.documents())


# ------------------------------------------------------------------------------------ held-out split
def test_is_heldout_is_a_stable_hash_of_the_key():
    def reference(key, fraction):  # independent restatement of the documented rule
        digest = hashlib.sha256(b"heldout\x00" + key.encode()).hexdigest()
        return int(digest[:16], 16) / 2**64 < fraction

    keys = [f"pkg/module_{i}.py" for i in range(4000)]
    assert [is_heldout(k, 0.1) for k in keys] == [reference(k, 0.1) for k in keys]
    assert abs(sum(is_heldout(k, 0.1) for k in keys) / len(keys) - 0.1) < 0.02
    assert not any(is_heldout(k, 0.0) for k in keys)


def test_embedded_split_is_a_partition_by_file():
    cfg = DataConfig(embedded_max_files=30, heldout_fraction=0.3)
    files = embedded.stdlib_files(30)
    assert files == embedded.stdlib_files(30) and len(files) == 30
    assert set(files) <= set(embedded.stdlib_files(0))
    assert not any(part in embedded.SKIPPED_DIRS for f in files for part in f.split("/"))
    root = embedded.stdlib_root()
    seen = {}
    for split in ("train", "heldout"):
        for source in embedded_sources(cfg, split):
            for doc in source.documents():
                if doc.path.startswith("pydoc_data.topics:"):
                    key = "topic:" + doc.path.split(":", 1)[1]
                else:
                    key = Path(doc.path.removesuffix(":docstrings")).relative_to(root).as_posix()
                assert is_heldout(key, 0.3) == (split == "heldout"), key
                seen.setdefault((source.kind, key), set()).add(split)
    assert all(len(splits) == 1 for splits in seen.values())
    code_keys = {key for kind, key in seen if kind == "code"}
    assert code_keys == set(files)  # no file lost (none of these is empty or non-UTF-8)
    assert {"train", "heldout"} == {s for splits in seen.values() for s in splits}
    held = heldout_documents(cfg, kind="nl")
    assert held and all(d.kind == "nl" for d in held)


def test_embedded_weights_and_nl_content():
    cfg = DataConfig(embedded_max_files=5, embedded_code_weight=0.6, embedded_nl_weight=0.4, heldout_fraction=0.0)
    code, nl = embedded_sources(cfg, "train")
    assert (code.kind, code.weight, nl.kind, nl.weight) == ("code", 0.6, "nl", 0.4)
    texts = [d.text for d in nl.documents()]
    from pydoc_data.topics import topics

    assert topics["assert"].strip() + "\n" in texts
    assert len(embedded_sources(DataConfig(embedded_nl_weight=0.0), "train")) == 1


def test_docstrings_are_extracted_without_importing():
    import json.decoder as reference  # only the test imports it, to compare with inspect

    source = Path(reference.__file__).read_text(encoding="utf-8")
    found = embedded.docstrings(source)
    assert found[0] == inspect.getdoc(reference)
    assert inspect.getdoc(reference.JSONDecoder.raw_decode) in found
    assert inspect.getdoc(reference.JSONDecoder) in found


# ------------------------------------------------------------------------------------------ formats
def test_glob_semantics():
    assert path_selected("a.py", ["**/*.py"], []) and path_selected("x/y/a.py", ["**/*.py"], [])
    assert path_selected("x/y/a.py", ["*.py"], [])  # no slash: the name at any depth
    assert not path_selected("x/a.py", ["/*.py"], []) and path_selected("a.py", ["/*.py"], [])
    assert path_selected("src/m/a.py", ["src/**/*.py"], []) and not path_selected("lib/a.py", ["src/**"], [])
    assert not path_selected("src/a.pyc", ["*.py"], [])
    assert not path_selected("build/x/a.py", ["**/*"], ["build"])  # excluding a directory excludes below it
    assert path_selected("src/build.py", ["**/*"], ["build"])
    assert not path_selected("a/test_x.py", ["*"], ["test_*.py"])
    assert path_selected("a/b1.py", ["a/b[0-9].py"], []) and not path_selected("a/bx.py", ["a/b[!x].py"], [])


def test_directory_source_with_globs_and_skips(tmp_path):
    root = tmp_path / "repo"
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "build").mkdir()
    (root / ".git").mkdir()
    (root / "a.py").write_text("print('a')\n")
    (root / "pkg" / "sub" / "b.py").write_text("print('b')\n")
    (root / "pkg" / "notes.txt").write_text("notes\n")
    (root / "build" / "gen.py").write_text("generated\n")
    (root / ".git" / "config.py").write_text("never\n")
    (root / "latin1.py").write_bytes("caf\xe9\n".encode("latin-1"))
    (root / "blob.py").write_bytes(b"\x00\x01binary")
    (root / "empty.py").write_text("")
    cfg = _data([SourceConfig(path=str(root), include=["*.py"], exclude=["build"])])
    source, docs = _docs(cfg)
    assert sorted(Path(d.path).relative_to(root).as_posix() for d in docs) == ["a.py", "pkg/sub/b.py"]
    assert source.skipped == Counter(not_utf8=1, binary=1, empty=1)
    assert {d.kind for d in docs} == {"code"}
    cfg = _data([SourceConfig(path=str(root / "a.py"))])  # a single text file
    assert [d.text for d in _docs(cfg)[1]] == ["print('a')\n"]


def test_directory_heldout_split_by_relative_path(tmp_path):
    for i in range(60):
        (tmp_path / f"f{i}.py").write_text(f"x = {i}\n")
    cfg = _data([SourceConfig(path=str(tmp_path))], fraction=0.25)
    train = {Path(d.path).name for d in _docs(cfg, "train")[1]}
    held = {Path(d.path).name for d in _docs(cfg, "heldout")[1]}
    assert train.isdisjoint(held) and len(train | held) == 60 and held
    assert held == {f"f{i}.py" for i in range(60) if is_heldout(f"f{i}.py", 0.25)}


def test_jsonl_custom_field_and_bad_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"content": "one"}\n\n{"content": "two", "x": 1}\n{"content": null}\n')
    source, docs = _docs(_data([SourceConfig(path=str(path), field="content", kind="nl")]))
    assert [(d.text, d.kind) for d in docs] == [("one", "nl"), ("two", "nl")]
    assert [d.path for d in docs] == [f"{path}:1", f"{path}:3"] and source.skipped == Counter(null=1)

    path.write_text('{"content": "one"}\n{"content": "two"\n{"text": "three"}\n{"content": 5}\n')
    with pytest.raises(UserError, match=rf"^{path}:2: malformed JSON line .*skip_bad_lines"):
        _docs(_data([SourceConfig(path=str(path), field="content")]))
    path.write_text('{"content": "one"}\n{"text": "three"}\n')
    with pytest.raises(UserError, match=rf"^{path}:2: record has no field 'content' \(has: text\)"):
        _docs(_data([SourceConfig(path=str(path), field="content")]))
    path.write_text('{"content": 5}\n')
    with pytest.raises(UserError, match=rf"^{path}:1: field 'content' is a int, not a string"):
        _docs(_data([SourceConfig(path=str(path), field="content")]))

    path.write_text('{"content": "one"}\n{"content": "two"\n{"text": "three"}\n[1]\n{"content": "ok"}\n')
    source, docs = _docs(_data([SourceConfig(path=str(path), field="content", skip_bad_lines=True)]))
    assert [d.text for d in docs] == ["one", "ok"]
    assert source.skipped == Counter(bad_lines=1, missing_field=2)
    # A directory of JSONL shards is read as records (auto-detected), keyed per shard and line.
    (tmp_path / "shard2.jsonl").write_text('{"content": "three"}\n')
    source, docs = _docs(_data([SourceConfig(path=str(tmp_path), field="content", skip_bad_lines=True)]))
    assert [d.text for d in docs] == ["one", "ok", "three"]


def test_parquet_source(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "code.parquet"
    pq.write_table(pa.table({"code": ["a = 1", None, "b = 2"], "n": [1, 2, 3]}), path, row_group_size=2)
    source, docs = _docs(_data([SourceConfig(path=str(path), field="code")]))
    assert [d.text for d in docs] == ["a = 1", "b = 2"] and source.skipped == Counter(null=1)
    assert docs[1].path == f"{path}:2"
    with pytest.raises(UserError, match=r"code.parquet: no column 'text' \(columns: code, n\)"):
        _docs(_data([SourceConfig(path=str(path))]))
    with pytest.raises(UserError, match=r"column 'n' has type int64, not string"):
        _docs(_data([SourceConfig(path=str(path), field="n")]))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserError, match=r"bad.parquet: cannot read Parquet file"):
        _docs(_data([SourceConfig(path=str(tmp_path / "bad.parquet"))]))


def test_hf_saved_dataset_source(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"content": ["x = 1", "y = 2", "z = 3"], "id": [1, 2, 3]})
    ds.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": ds.select([2, 0]), "test": ds}).save_to_disk(str(tmp_path / "dict"))
    source, docs = _docs(_data([SourceConfig(path=str(tmp_path / "single"), field="content")]))
    assert [d.text for d in docs] == ["x = 1", "y = 2", "z = 3"]
    _, docs = _docs(_data([SourceConfig(path=str(tmp_path / "dict"), format="hf", field="content")]))
    assert [d.text for d in docs] == ["z = 3", "x = 1"]
    with pytest.raises(UserError, match=r"single: no column 'text' \(columns: content, id\)"):
        _docs(_data([SourceConfig(path=str(tmp_path / "single"))]))
    with pytest.raises(UserError, match="format 'hf' needs a directory written by datasets' save_to_disk"):
        user_sources(_data([SourceConfig(path=str(tmp_path), format="hf")]), "train")


def test_path_errors_are_one_line_and_name_the_path(tmp_path):
    with pytest.raises(UserError, match=r"data source #1 \(data.sources\[0\]\) has an empty path"):
        user_sources(_data([SourceConfig(path="")]), "train")
    with pytest.raises(UserError, match=r"data source '.*missing': no such file or directory"):
        user_sources(_data([SourceConfig(path=str(tmp_path / "missing"))]), "train")
    with pytest.raises(UserError, match=r"--data .*nothing: no such file or directory"):
        source_from_path(str(tmp_path / "nothing"))
    assert source_from_path(str(tmp_path)) == SourceConfig(path=str(tmp_path), kind="code", weight=1.0)
    (tmp_path / "x.json").write_text("[]")
    with pytest.raises(UserError, match=r"x.json: a .json file is ambiguous"):
        user_sources(_data([SourceConfig(path=str(tmp_path / "x.json"))]), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty: no files match include"):
        _docs(_data([SourceConfig(path=str(tmp_path / "empty"))]))
    with pytest.raises(UserError, match="heldout_fraction=1.5"):
        user_sources(_data([SourceConfig(path=str(tmp_path))], fraction=1.5), "train")


def test_truncation_is_counted(tmp_path):
    (tmp_path / "long.txt").write_text("x" * 100)
    source, docs = _docs(_data([SourceConfig(path=str(tmp_path))], max_doc_chars=30))
    assert [d.text for d in docs] == ["x" * 30] and source.truncated == 1


# ------------------------------------------------------------------------- a run's in-line prepared data
def _split_docs(tokens: np.ndarray, eot: int) -> list[tuple[int, ...]]:
    cuts = np.flatnonzero(tokens == eot)
    assert len(cuts) and cuts[-1] == len(tokens) - 1, "every document is followed by one eot"
    return [tuple(p) for p in np.split(np.asarray(tokens), cuts + 1)[:-1]]


def _quiet(message: str) -> None:
    pass


def _small_config(data: DataConfig, vocab: int = 600) -> Config:
    config = Config()
    config.data = data
    config.tokenizer.vocab_size, config.tokenizer.num_masks, config.tokenizer.train_chars = vocab, 8, 30_000
    config.model.vocab_size, config.train.seq_len = vocab, 32
    return config


def test_run_prepares_exactly_the_kept_training_documents(tmp_path):
    """The in-line path runs the prepare stages into RUN/prepared: its train shards hold every training document
    the stages kept (each followed by one eot), none of the held-out ones, which are in heldout.jsonl."""
    config = _small_config(DataConfig(embedded_max_files=16, heldout_fraction=0.3), vocab=700)
    run = tmp_path / "run"
    tok, mix, stats = prepare_data(config, run, log=_quiet)
    data = PreparedData.open(run / "prepared")
    removed = {(d["source"], d["split"], d["path"]) for d in map(json.loads, open(data.root / "removed.jsonl"))}
    code_entry = next(s for s in data.sources if s["name"] == "stdlib-code")
    stored = _split_docs(data.stream(code_entry, "train")[:], tok.eot_id)
    (code, _) = embedded_sources(config.data, "train")
    redact = SecretScanner().redact  # the secrets stage replaces the authors' e-mail addresses
    train = [tuple(tok.encode(redact(d.text).text, literal_specials=True)) + (tok.eot_id,) for d in code.documents()
             if ("stdlib-code", "train", d.path) not in removed]
    assert Counter(stored) == Counter(train) and len(train) == code_entry["splits"]["train"]["docs"]
    held = [replace(d, text=redact(d.text).text) for d in heldout_documents(config.data)
            if (f"stdlib-{d.kind}", "heldout", d.path) not in removed]
    assert held and [(d.path, d.text) for d in sorted(held, key=lambda d: d.path)] == \
        [(d.path, d.text) for d in sorted(data.heldout_documents(), key=lambda d: d.path)]
    held_code = {tuple(tok.encode(d.text, literal_specials=True)) + (tok.eot_id,) for d in held if d.kind == "code"}
    assert not held_code & set(stored)
    assert stats["sources"][0]["docs"] == len(train) and stats["tokens"] == sum(len(s) for s in mix.streams)


def test_special_strings_in_documents_stay_text(tmp_path):
    data = tmp_path / "src"
    data.mkdir()
    (data / "a.py").write_text("s = '<|endoftext|><mask_1><sep>'\n" * 3)
    config = _small_config(_data([SourceConfig(path=str(data))]))
    tok, mix, _ = prepare_data(config, tmp_path / "run", log=_quiet)
    tokens = mix.streams[0][:]
    assert int((tokens == tok.eot_id).sum()) == 1 and tok.mask_id(1) not in tokens and tok.sep_id not in tokens


def test_source_without_documents_is_an_error(tmp_path):
    (tmp_path / "blob.bin").write_bytes(b"\x00\x00")
    config = _small_config(_data([SourceConfig(path=str(tmp_path))]))
    expected = r"no training documents \(" + tmp_path.name + r": 0 documents, skipped 1 binary\)"
    with pytest.raises(UserError, match=expected):
        prepare_data(config, tmp_path.parent / f"{tmp_path.name}-run", log=_quiet)


# ------------------------------------------------------------------------------------------ mixture
def _streams():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 500, size=n).astype(np.uint16) for n in (40_001, 9_001, 113)]


def test_mixture_proportions_and_per_source_counters():
    mix = PackedMixture(_streams(), [7, 2, 1], seq_len=16, seed=11)
    n_blocks = 12
    source, k, chunk = mix.locate(np.arange(n_blocks * BLOCK))
    for s, w in enumerate([0.7, 0.2, 0.1]):
        per_block = np.bincount(np.arange(n_blocks * BLOCK)[source == s] // BLOCK, minlength=n_blocks)
        assert np.all(np.abs(per_block - w * BLOCK) < 1)  # systematic sampling: off by less than one
        ks = np.sort(k[source == s])
        assert np.array_equal(ks, np.arange(len(ks)))  # every per-source position used once, in order
    # Blocks are mixed: a batch of 32 neighbours is not dominated by one source.
    assert len(set(source[:32].tolist())) == 3


def test_mixture_epochs_cycle_with_fresh_orders():
    streams = _streams()
    mix = PackedMixture(streams, [7, 2, 1], seq_len=16, seed=11)
    n_small = mix.num_chunks[2]
    assert n_small == (113 - 1) // 16 == 7
    source, k, chunk = mix.locate(np.arange(3000))
    small = chunk[source == 2][np.argsort(k[source == 2])]
    epochs = [small[e * n_small:(e + 1) * n_small] for e in range(len(small) // n_small)]
    assert len(epochs) > 30
    assert all(sorted(e.tolist()) == list(range(n_small)) for e in epochs)
    assert len({tuple(e.tolist()) for e in epochs}) > 1
    assert mix.epochs_at(3000)[2] == pytest.approx(3000 * 0.1 / 7)
    assert mix.num_samples_per_epoch == sum((len(s) - 1) // 16 for s in streams)


def test_mixture_samples_are_pure_functions_of_index_and_seed():
    streams = _streams()
    a = PackedMixture(streams, [7, 2, 1], seq_len=16, seed=11)
    idx = np.random.default_rng(1).integers(0, 50_000, size=200)
    forward = a.get_batch(idx)
    b = PackedMixture(streams, [7, 2, 1], seq_len=16, seed=11)
    backward = np.stack([b[int(i)] for i in idx[::-1]])[::-1]
    assert np.array_equal(forward, backward) and forward.dtype == np.int64 and forward.shape == (200, 17)
    source, _, chunk = a.locate(idx)
    for row, s, c in zip(forward, source, chunk):  # chunks of T+1 tokens, overlapping by one
        assert np.array_equal(row, streams[s][c * 16:c * 16 + 17])
    other = PackedMixture(streams, [7, 2, 1], seq_len=16, seed=12).get_batch(idx)
    assert not np.array_equal(forward, other)
    assert a[5_000_000].shape == (17,)


def test_mixture_rejects_bad_input():
    with pytest.raises(UserError, match="tiny has 5 tokens; seq_len=16 needs at least 17"):
        PackedMixture([np.zeros(5, np.uint16)], [1.0], 16, 0, names=["tiny"])
    with pytest.raises(UserError, match="weights must be positive"):
        PackedMixture(_streams(), [1, 0, 1], 16, 0)


# ------------------------------------------------------------------------------------------- loader
@pytest.fixture(scope="module")
def mixture_and_special(tok):
    rng = np.random.default_rng(5)
    eot = tok.eot_id
    streams = []
    for n_docs in (300, 80):
        docs = [np.append(rng.integers(0, 500, size=rng.integers(5, 60)), eot) for _ in range(n_docs)]
        streams.append(np.concatenate(docs).astype(np.uint16))
    return PackedMixture(streams, [0.75, 0.25], seq_len=32, seed=9), tok.special_ids()


OBJ = ObjectiveConfig(span_rate=0.4, fim_rate=0.2, prefix_lm=True)


def _take(loader, n):
    out = []
    for i, step in enumerate(loader):
        out.append(step)
        if i + 1 == n:
            break
    return out


def _same(a, b):
    return all(
        all(bool((getattr(x, f) == getattr(y, f)).all()) for f in x.__dataclass_fields__)
        for sa, sb in zip(a, b) for x, y in zip(sa, sb)
    ) and len(a) == len(b)


def test_loader_is_deterministic_and_uses_make_example(mixture_and_special):
    mix, special = mixture_and_special
    def make():
        return BatchLoader(mix, OBJ, special, micro_batch_size=4, grad_accum=2, seed=21)

    a, b = _take(make(), 3), _take(make(), 3)
    assert _same(a, b) and len(a[0]) == 2
    codes = {int(c) for step in a for mb in step for c in mb.objective}
    assert codes == set(OBJECTIVE_CODES.values())
    mb = a[1][1]
    for row, index in enumerate(mb.sample_index.tolist()):
        ex = make_example(mix[index], index, 21, OBJ, special)
        assert np.array_equal(mb.input_ids[row].numpy(), ex.input_ids)
        assert np.array_equal(mb.labels[row].numpy(), ex.labels)
        assert np.array_equal(mb.doc_ids[row].numpy(), ex.doc_ids)
        assert (int(mb.prefix_len[row]), int(mb.objective[row])) == (ex.prefix_len, OBJECTIVE_CODES[ex.objective])
    other = _take(BatchLoader(mix, OBJ, special, 4, 2, seed=22), 1)
    assert not _same(a[:1], other)


def test_ranks_partition_the_sample_indices(mixture_and_special):
    mix, special = mixture_and_special
    world, steps = 3, 4
    seen = []
    for rank in range(world):
        loader = BatchLoader(mix, OBJ, special, micro_batch_size=2, grad_accum=3, seed=1, rank=rank,
                             world_size=world)
        for step, micro_batches in enumerate(_take(loader, steps)):
            for micro, mb in enumerate(micro_batches):
                assert mb.sample_index.tolist() == loader.sample_indices(step, micro)
                seen.extend(mb.sample_index.tolist())
    assert sorted(seen) == list(range(steps * world * 3 * 2))


def test_resume_from_state_dict_continues_the_same_stream(mixture_and_special):
    mix, special = mixture_and_special
    full = _take(BatchLoader(mix, OBJ, special, 3, 2, seed=5), 5)
    first = BatchLoader(mix, OBJ, special, 3, 2, seed=5)
    _take(first, 2)
    state = first.state_dict()
    assert state["step"] == 2
    resumed = BatchLoader(mix, OBJ, special, 3, 2, seed=5)
    resumed.load_state_dict(state)
    assert _same(_take(resumed, 3), full[2:])
    assert _same(_take(BatchLoader(mix, OBJ, special, 3, 2, seed=5, start_step=4), 1), full[4:])
    with pytest.raises(UserError, match="cannot resume the data stream"):
        BatchLoader(mix, OBJ, special, 4, 2, seed=5).load_state_dict(state)


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "codegen2-batch-prefetch"]


def test_loader_shuts_down_cleanly_and_forwards_errors(mixture_and_special):
    mix, special = mixture_and_special
    loader = BatchLoader(mix, OBJ, special, 2, 1, seed=0, prefetch=1)
    _take(loader, 2)
    assert not _prefetch_threads()
    iterator = iter(loader)
    next(iterator)
    loader.close()
    iterator.close()
    assert not _prefetch_threads()

    class Broken:
        seq_len = 64

        def get_batch(self, indices):
            raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        _take(BatchLoader(Broken(), OBJ, special, 2, 1, seed=0), 1)
    assert not _prefetch_threads()


# ----------------------------------------------------------------------------------------- pipeline
def test_prepare_data_end_to_end(tmp_path):
    data = tmp_path / "code"
    data.mkdir()
    root = embedded.stdlib_root()
    for name in ("textwrap.py", "shlex.py", "bisect.py", "glob.py", "fnmatch.py", "this.py"):
        (data / name).write_text((root / name).read_text(encoding="utf-8"))
    config = _small_config(_data([SourceConfig(path=str(data), weight=3),
                                  SourceConfig(path=str(data / "this.py"), kind="nl")]), vocab=700)
    config.tokenizer.train_chars = 50_000
    run = tmp_path / "run"
    tokenizer, mix, stats = prepare_data(config, run, log=_quiet)
    assert (run / "tokenizer.json").is_file() and tokenizer.vocab_size == 700
    manifest = PreparedData.open(run / "prepared").manifest
    assert manifest["tokenizer"]["origin"] == "trained" and manifest["tokenizer"]["train_chars"] <= 50_000
    # this.py is in both sources: one copy is kept (the smaller key hash), the other removed as a duplicate
    kept = {s["name"]: s["splits"]["train"]["docs"] for s in manifest["sources"]}
    assert sorted(kept) == ["code", "this"] and sum(kept.values()) == 6
    assert sum(s["splits"]["train"]["removed"].get("exact_duplicate", 0) for s in manifest["sources"]) == 1
    assert [s["name"] for s in stats["sources"]] == [name for name in ("code", "this") if kept[name]]
    from codegen2.train import data_summary

    line = data_summary(stats)["code"]  # the training summary names what the stages removed
    removed = stats["sources"][0]["removed"]
    assert ("; removed 1 exact duplicate" in line) == (removed.get("exact_duplicate") == 1), line
    assert stats["tokens"] == sum(len(s) for s in mix.streams)
    stamp = (run / "prepared" / "manifest.json").stat().st_mtime_ns
    lines: list[str] = []
    again_tok, again_mix, again = prepare_data(config, run, log=lines.append)
    assert lines == [] and (run / "prepared" / "manifest.json").stat().st_mtime_ns == stamp  # reused, not redone
    assert np.array_equal(again_mix.get_batch(range(50)), mix.get_batch(range(50)))
    config.model.vocab_size = 600
    with pytest.raises(UserError, match="model.vocab_size=600"):
        prepare_data(config, run, log=_quiet)


def test_run_directory_inside_the_data_is_never_read(tmp_path):
    project = tmp_path / "proj"
    project.mkdir()
    root = embedded.stdlib_root()
    for name in ("textwrap.py", "shlex.py"):
        (project / name).write_text((root / name).read_text(encoding="utf-8"))
    config = _small_config(_data([source_from_path(str(project))]))
    run = project / "runs" / "r1"
    _, _, stats = prepare_data(config, run, log=_quiet)
    assert stats["sources"][0]["docs"] == 2 and stats["sources"][0]["skipped"] == {}
    (run / "metrics.jsonl").write_text('{"loss": 1.0}\n')  # the run keeps writing while it trains
    shutil.rmtree(run / "prepared")  # prepared again, with the run's tokenizer.json and files present
    _, _, again = prepare_data(config, run, log=_quiet)
    assert again["sources"][0]["docs"] == 2


def test_training_data_stats_count_the_held_out_split(tmp_path):
    """The summary says how many documents the hash split held out, counted by the same rule that split them."""
    from codegen2.train import data_summary

    for i in range(60):
        (tmp_path / f"f{i}.py").write_text(f"x_{i} = {i}\n")
    config = _small_config(_data([SourceConfig(path=str(tmp_path))]))
    config.data.heldout_fraction = 0.2
    (heldout,) = user_sources(config.data, "heldout")
    expected = len(list(heldout.documents()))  # the held-out split itself, read the way evaluation reads it
    (train,) = user_sources(config.data, "train")
    assert 0 < expected < 60 and len(list(train.documents())) == 60 - expected == 60 - train.other_split
    _, _, stats = prepare_data(config, tmp_path.parent / "run", log=_quiet)
    (entry,) = stats["sources"]
    assert entry["heldout_docs"] == expected and entry["docs"] == 60 - expected
    assert data_summary(stats)[entry["name"]].endswith(f"; {expected:,} held out")


def test_removed_cache_dir_key_is_a_clear_error_and_old_configs_still_load(tmp_path):
    from codegen2.config import ConfigError, load_config

    old = tmp_path / "old.toml"
    old.write_text('[data]\ncache_dir = ""\n')  # what an earlier codegen2 wrote into every run's config.toml
    assert not hasattr(load_config(old).data, "cache_dir")
    old.write_text('[data]\ncache_dir = "/shared/cache"\n')
    with pytest.raises(ConfigError, match=r"old.toml: data.cache_dir was removed: .*data.prepared = DIR"):
        load_config(old)
    with pytest.raises(ConfigError, match=r"--set data.cache_dir: data.cache_dir was removed"):
        load_config(None, overrides=["data.cache_dir=x"])


# ------------------------------------------------------------------- the run's prepared data: bad input
def _run_with_prepared_data(tmp_path) -> tuple[Config, Path]:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    root = embedded.stdlib_root()
    for name in ("textwrap.py", "shlex.py", "bisect.py", "glob.py"):
        (corpus / name).write_text((root / name).read_text(encoding="utf-8"))
    config = _small_config(_data([SourceConfig(path=str(corpus))]))
    config.data.heldout_fraction = 0.3
    run = tmp_path / "run"
    prepare_data(config, run, log=_quiet)
    return config, run


def test_resume_needs_no_raw_files_and_damage_is_one_line(tmp_path):
    config, run = _run_with_prepared_data(tmp_path)
    _, before, _ = prepare_data(config, run, log=_quiet)
    shutil.rmtree(tmp_path / "corpus")  # the raw source disappeared: the prepared data is enough
    _, after, _ = prepare_data(config, run, log=_quiet)
    assert np.array_equal(before.get_batch(range(20)), after.get_batch(range(20)))
    changed = _small_config(_data([SourceConfig(path=str(tmp_path / "corpus"))]))
    changed.data.heldout_fraction = 0.5
    with pytest.raises(UserError, match=r"prepared with other settings than its config has now "
                                        r"\(data.heldout_fraction\)"):
        prepare_data(changed, run, log=_quiet)
    shard = next((run / "prepared" / "shards").rglob("train-*.bin"))
    shard.write_bytes(shard.read_bytes()[:-2])  # truncated
    with pytest.raises(UserError, match=r"shard .* has the wrong size \(the run's own prepared data is damaged: "
                                        r"remove .*prepared and run again with --resume"):
        prepare_data(config, run, log=_quiet)
    (run / "prepared" / "manifest.json").write_text('{"format": "codegen2-prep')  # cut short
    with pytest.raises(UserError, match=r"unreadable manifest .*the run's own prepared data is damaged"):
        prepare_data(config, run, log=_quiet)


def test_unfinished_inline_prepare_with_other_settings_is_refused(tmp_path):
    config, run = _run_with_prepared_data(tmp_path)
    (run / "prepared" / "manifest.json").unlink()  # as if stopped before the last stage
    config.prepare.minhash_threshold = 0.8
    with pytest.raises(UserError, match="unfinished data preparation was started with other settings"):
        prepare_data(config, run, log=_quiet)


def test_run_from_the_old_token_cache_is_prepared_again_with_a_note(tmp_path):
    """A run started by an earlier codegen2 (RUN/data/*.npy token caches, no RUN/prepared): evaluation says what
    to do, and --resume prepares its sources into RUN/prepared with a note that the sample order changes."""
    from codegen2.data.heldout import run_heldout_documents

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    root = embedded.stdlib_root()
    for name in ("textwrap.py", "shlex.py"):
        (corpus / name).write_text((root / name).read_text(encoding="utf-8"))
    config = _small_config(_data([SourceConfig(path=str(corpus))]))
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    np.save(run / "data" / "corpus-train-0123.npy", np.zeros(10, dtype=np.uint16))
    with pytest.raises(UserError, match=r"has no prepared data .*`codegen2 train --out .* --resume` prepares it"):
        run_heldout_documents(config, run)
    lines: list[str] = []
    prepare_data(config, run, log=lines.append)
    assert any(line.startswith("note: ") and "token cache" in line and "another sample order" in line
               for line in lines), lines
    assert (run / "prepared" / "manifest.json").is_file() and (run / "data" / "corpus-train-0123.npy").is_file()
