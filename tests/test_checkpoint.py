"""Checkpoint files: atomic against SIGKILL, restorable after an interrupted swap, pruned whole, DCP shards
consolidated into one safetensors file, meta-device streaming init equal to whole-model init, and the
data-position mapping used when resuming on another number of ranks."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from codegen2 import checkpoint as ckpt
from codegen2 import fsutil
from codegen2.config import ModelConfig
from codegen2.distributed import init_streaming
from codegen2.errors import UserError
from codegen2.models.codegen.model import CodeGenModel
from codegen2.safetensors_io import read_file
from codegen2.train import resume_batching


def small_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(64, 32, generator=g), "a.bias": torch.randn(64, generator=g)}


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_usable(tmp_path):
    # A child writes step 1, then starts step 2 with a slow save; we SIGKILL it once step 2's staging
    # directory has its first file.
    script = textwrap.dedent(f"""
        import os, torch
        from codegen2.checkpoint import SAVE_PAUSE_ENV, write_checkpoint
        def state(seed):
            g = torch.Generator().manual_seed(seed)
            return {{"a.weight": torch.randn(64, 32, generator=g), "a.bias": torch.randn(64, generator=g)}}
        write_checkpoint({str(tmp_path)!r}, 1, state(1), {{"tokens_seen": 1}}, {{"x": 1}})
        os.environ[SAVE_PAUSE_ENV] = "30"  # every file of step 2's save is followed by a long pause
        write_checkpoint({str(tmp_path)!r}, 2, state(2), {{"tokens_seen": 2}}, {{"x": 2}})
    """)
    child = subprocess.Popen([sys.executable, "-c", script])
    root = tmp_path / ckpt.CHECKPOINTS
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            staging = list(root.glob("step_00000002.tmp-*")) if root.is_dir() else []
            if staging and (staging[0] / ckpt.WEIGHTS).is_file():
                break
            assert child.poll() is None, "the child ended before it could be killed"
            time.sleep(0.01)
        else:
            pytest.fail("step 2's save never started")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000001"]
    weights = read_file(ckpt.latest_checkpoint(tmp_path) / ckpt.WEIGHTS)
    assert all(torch.equal(weights[k], v) for k, v in small_state(1).items())
    ckpt.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001"]


def test_a_swap_cut_short_is_undone_and_a_finished_one_cleaned(tmp_path):
    ckpt.write_checkpoint(tmp_path, 4, small_state(4), {"tokens_seen": 4})
    root = tmp_path / ckpt.CHECKPOINTS
    gone = subprocess.Popen([sys.executable, "-c", "pass"])  # the writer: a process of this host that is dead
    gone.wait()
    # Killed between "move the old copy aside" and "move the new one in": the old copy comes back.
    os.rename(root / "step_00000004", root / f"step_00000004.tmp-old-{gone.pid}@{fsutil.host_name()}")
    assert ckpt.list_checkpoints(tmp_path) == []
    ckpt.remove_stale_temporaries(tmp_path)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000004"]
    # Killed after the swap but before the old copy was deleted: the old copy goes.
    (root / f"step_00000004.tmp-old-{gone.pid}").mkdir()  # a name from before staging names carried the host
    ckpt.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004"]
    # Re-saving an existing step replaces it whole.
    ckpt.write_checkpoint(tmp_path, 4, small_state(5), {"tokens_seen": 5})
    assert ckpt.read_meta(root / "step_00000004")["tokens_seen"] == 5
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004"]


def test_prune_keeps_the_newest_k_and_nothing_half_deleted(tmp_path):
    for step in (2, 4, 6, 8, 10):
        ckpt.write_checkpoint(tmp_path, step, small_state(step), {"tokens_seen": step})
    ckpt.prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in (tmp_path / ckpt.CHECKPOINTS).iterdir()) == ["step_00000008", "step_00000010"]
    ckpt.prune_checkpoints(tmp_path, 0)  # 0 keeps everything
    assert len(ckpt.list_checkpoints(tmp_path)) == 2


def test_an_atomic_write_that_fails_keeps_the_old_file_and_leaves_no_staging_file(tmp_path):
    target = tmp_path / "config.toml"
    fsutil.atomic_write_text(target, "old\n")
    with pytest.raises(RuntimeError), fsutil.atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["config.toml"]
    fsutil.atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["config.toml"]


def test_every_reader_names_the_file_and_the_tensor_it_lacks(tmp_path, small_tokenizer):
    """Run checkpoints, HF directories and resumes share one reader and one set of checks."""
    from safetensors.torch import load_file, save_file

    from codegen2.hf import export_hf
    from codegen2.loading import load_checkpoint
    from conftest import make_random_run

    run = make_random_run(tmp_path / "run", small_tokenizer, 64)
    export_hf(run, tmp_path / "hf")
    for directory in (run, tmp_path / "hf"):
        weights = (ckpt.latest_checkpoint(run) if directory == run else directory) / ckpt.WEIGHTS
        state = load_file(weights)
        del state["lm_head.bias"]
        save_file(state, weights, metadata={"format": "pt"})
        for dtype in (None, "bfloat16"):
            with pytest.raises(UserError, match=r"the weights lack 1 tensor\(s\) .*lm_head\.bias \[512\]") as info:
                load_checkpoint(directory, dtype=dtype)
            assert str(directory) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_checkpoint_consolidates_to_the_saved_tensors(tmp_path):
    import torch.distributed.checkpoint as dcp

    model = {k: v.clone() for k, v in small_state(7).items()}
    optim = {"state": {"a.weight": {"exp_avg": torch.ones(64, 32), "step": torch.tensor(3.0)}},
             "param_groups": [{"lr": 0.1, "params": ["a.weight", "a.bias"]}]}
    dcp.save({ckpt.MODEL_KEY: model, ckpt.OPTIM_KEY: optim}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    merged = ckpt.consolidate_sharded(tmp_path / "dcp")
    assert merged.keys() == model.keys()  # the optimizer's tensors are not mistaken for weights
    assert all(torch.equal(merged[k], model[k]) for k in model)


def test_streaming_init_equals_whole_model_init():
    cfg = ModelConfig(vocab_size=300, n_layer=3, n_embd=48, n_head=4, rotary_dim=8, n_ctx=64, mp_num=2)
    reference = CodeGenModel(cfg)
    reference.init_weights(generator=torch.Generator().manual_seed(11))
    with torch.device("meta"):
        model = CodeGenModel(cfg)
    template = copy.deepcopy(model)
    model.to_empty(device="cpu")
    init_streaming(model, template, CodeGenModel.init_weights, torch.Generator().manual_seed(11), torch.device("cpu"))
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert all(p.is_meta for p in template.parameters())  # the one-module copies were released


def test_resume_batching_keeps_samples_per_step(tiny_config):
    config = tiny_config(**{"train.micro_batch_size": 4, "train.grad_accum": 1})
    saved = {"step": 5, "world_size": 2, "micro_batch_size": 4, "grad_accum": 1}
    assert resume_batching(config, 2, saved) == (4, 1, "")
    micro, accum, note = resume_batching(config, 1, saved)
    assert (micro, accum) == (4, 2) and "global sample index 5 * 8 = 40" in note
    micro, accum, note = resume_batching(config, 4, saved)  # 8 samples over 4 ranks: micro-batch 2
    assert (micro, accum) == (2, 1) and "now 4 x 2 x 1" in note
    with pytest.raises(UserError, match="cannot split"):
        resume_batching(config, 3, saved)


def test_init_from_a_run_with_another_qkv_grouping_keeps_the_function(tiny_config, tmp_path):
    from codegen2.distributed import DistEnv
    from codegen2.loading import load_checkpoint
    from codegen2.train import build_training_model, train

    train(tiny_config(**{"train.max_steps": 1, "train.checkpoint_every": 1}), tmp_path / "source")  # mp_num=2
    source = load_checkpoint(tmp_path / "source").model
    config = tiny_config(**{"model.mp_num": 4, "train.init_from": str(tmp_path / "source")})
    model = build_training_model(config, DistEnv()).eval()
    tokens = torch.randint(0, config.model.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), source(tokens))
    with pytest.raises(UserError, match="n_layer 2 vs 3"):
        config = tiny_config(**{"model.n_layer": 3, "train.init_from": str(tmp_path / "source")})
        build_training_model(config, DistEnv())


def test_weights_lacking_a_tensor_are_refused_not_loaded_silently():
    """torch's full-state-dict loader keeps a missing tensor's initial values without a word."""
    from codegen2.distributed import load_full_state

    model = CodeGenModel(ModelConfig(vocab_size=64, n_layer=2, n_embd=32, n_head=4, rotary_dim=4, mp_num=1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = copy.deepcopy(model.state_dict())
    gone = next(k for k in state if "mlp" in k)
    del state[gone]
    state[next(iter(state))] = torch.zeros_like(state[next(iter(state))])
    with pytest.raises(UserError, match=f"lack 1 tensor.*{gone}"):
        load_full_state(model, None, state, None)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing was half-loaded
    load_full_state(model, None, {**state, gone: before[gone]}, None)  # complete: loads
