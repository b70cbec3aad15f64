"""Shared fixtures: a small corpus and a tiny training config that run in seconds on 2 cores."""

from __future__ import annotations

import importlib.util
import sys
import sysconfig
from pathlib import Path

import pytest

from codegen2.config import load_config

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS_FILES = ["textwrap.py", "glob.py", "fnmatch.py", "shlex.py", "bisect.py", "heapq.py", "colorsys.py",
                "keyword.py", "string.py", "genericpath.py", "posixpath.py", "queue.py", "sched.py", "this.py"]


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A directory of real Python files (copied from the standard library)."""
    root = tmp_path_factory.mktemp("corpus")
    for name in CORPUS_FILES:
        (root / name).write_text((STDLIB / name).read_text(encoding="utf-8"), encoding="utf-8")
    return root


def tiny_overrides(corpus: Path, **extra) -> list[str]:
    values = {
        "model.vocab_size": 512, "model.n_layer": 2, "model.n_embd": 64, "model.n_head": 4, "model.rotary_dim": 8,
        "model.n_ctx": 128, "model.mp_num": 2,
        "tokenizer.vocab_size": 512, "tokenizer.num_masks": 8, "tokenizer.train_chars": 200000,
        "objective.max_spans": 4, "objective.span_len_max": 8,
        "train.seq_len": 64, "train.micro_batch_size": 4, "train.grad_accum": 2, "train.lr": 3e-3,
        "train.warmup_steps": 2, "train.max_steps": 6, "train.checkpoint_every": 3, "train.log_every": 1,
        "train.num_threads": 1,
    }
    values.update(extra)
    import json

    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


@pytest.fixture
def tiny_config(small_corpus):
    def make(**extra):
        from codegen2.config import SourceConfig

        config = load_config(None, overrides=tiny_overrides(small_corpus, **extra))
        config.data.sources = [SourceConfig(path=str(small_corpus), kind="code", weight=1.0, include=["*.py"])]
        config.data.heldout_fraction = 0.0
        return config.validate()

    return make


STRESS = Path(__file__).resolve().parents[1] / "benchmarks" / "kill_resume_stress.py"


def load_stress():
    """The launch / kill / compare machinery of benchmarks/kill_resume_stress.py, shared by the
    distributed and resume tests (one module, loaded once)."""
    if "kill_resume_stress" not in sys.modules:
        spec = importlib.util.spec_from_file_location("kill_resume_stress", STRESS)
        module = importlib.util.module_from_spec(spec)
        sys.modules["kill_resume_stress"] = module
        spec.loader.exec_module(module)
    return sys.modules["kill_resume_stress"]


@pytest.fixture
def suite(request, tiny_config, tmp_path_factory):
    """Config and reference runs shared by tests/test_distributed.py and tests/test_resume.py.

    CodeGen by default; a test parametrised with `@pytest.mark.parametrize("suite", [...], indirect=True)`
    gets the same run for each architecture named (benchmarks/kill_resume_stress.py ARCH_OVERRIDES).
    """
    arch = getattr(request, "param", "codegen")
    base = tmp_path_factory.getbasetemp() / ("distributed-suite" if arch == "codegen" else f"distributed-suite-{arch}")
    stress = load_stress()
    config = tiny_config(**{"train.global_batch_tokens": 512, **stress.ARCH_OVERRIDES[arch]})
    config, path = stress.suite_setup(config, base)
    return base, config, path


class CharTokenizer:
    """Test stand-in: one id per byte, specials above 255 (independent of the project's tokenizer)."""

    eot_id, sep_id, eom_id = 256, 257, 258
    bos_id, add_bos, has_sentinels = None, False, True
    token_ids = {"<|endoftext|>": 256, "<sep>": 257, "<eom>": 258, "<mask_1>": 260, "<mask_2>": 261}

    def mask_id(self, k: int) -> int:
        return 259 + k

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls on a shared 2-core machine run far faster on one thread (use with pytest.mark.usefixtures)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def naive_greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding with no cache: the whole sequence through the model for every new token."""
    import torch

    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def make_random_run(directory: Path, tokenizer, n_ctx: int, never_ends: bool = False) -> Path:
    """A random-weight run directory (config, tokenizer, one checkpoint at step 0); `never_ends` makes
    <|endoftext|> unreachable, so completions run to max_tokens."""
    import torch

    from codegen2.checkpoint import write_checkpoint
    from codegen2.config import Config, ModelConfig, TokenizerConfig, TrainConfig, save_config
    from codegen2.models import build_model

    config = Config(model=ModelConfig(vocab_size=512, n_layer=2, n_embd=64, n_head=4, rotary_dim=16, n_ctx=n_ctx,
                                      mp_num=2),
                    tokenizer=TokenizerConfig(vocab_size=512, num_masks=8), train=TrainConfig(seq_len=min(128, n_ctx)))
    torch.manual_seed(0)
    model = build_model(config.model)
    if never_ends:
        with torch.no_grad():
            model.lm_head.bias[tokenizer.eot_id] = -1e4
    directory.mkdir(parents=True, exist_ok=True)
    save_config(config, directory / "config.toml")
    tokenizer.save(directory)
    write_checkpoint(directory, 0, model.state_dict(), {"tokens_seen": 0})
    return directory


@pytest.fixture(scope="session")
def small_tokenizer():
    """A 512-token BPE trained on two standard-library modules (seconds)."""
    import argparse as text_a
    import json as text_b

    from codegen2.tokenizer import train_tokenizer

    texts = [Path(m.__file__).read_text(encoding="utf-8") for m in (text_a, text_b)]
    return train_tokenizer(texts, vocab_size=512, num_masks=8)


@pytest.fixture
def int8_kernel(monkeypatch):
    """Choose the int8 matmul kernel for one test: `int8_kernel("native")` or `int8_kernel("torch")`.

    "native" skips the test where the native kernel cannot run (no C compiler, a CPU without AVX2), with
    the reason; on such machines the torch variant of the same test still runs.
    """
    from codegen2.kernels import int8

    def choose(name: str) -> None:
        monkeypatch.setenv("CODEGEN2_INT8_KERNEL", "auto" if name == "native" else name)
        int8.reset()
        if name == "native":
            available, why = int8.native_available()
            if not available:
                pytest.skip(f"the native int8 kernel cannot run here: {why}")

    yield choose
    int8.reset()
