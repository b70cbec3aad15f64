"""LoRA adapters: targets, frozen base, merge, and PEFT's adapter directory, with Hugging Face PEFT as the reference.

The bases are small random codegen2 models exported with `codegen2.hf.export_hf` and loaded by transformers;
every adapter gets a random nonzero B so that a wrong row, name or scale shows in the logits.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from codegen2.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    KEY_PREFIX,
    adapter_config,
    hf_module_names,
    load_adapter,
    write_adapter,
)
from codegen2.checkpoint import write_checkpoint
from codegen2.config import Config, ModelConfig, save_config
from codegen2.errors import UserError
from codegen2.hf import export_hf
from codegen2.lora import (
    LoraLinear,
    LoraSettings,
    adapter_parameters,
    attach_lora,
    lora_modules,
    merge_lora,
    select_targets,
)
from codegen2.models import build_model
from codegen2.models.codegen.hf import regroup_qkv
from codegen2.tokenizer import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # (fixture in conftest.py)

VOCAB = 512
SHAPES = {
    "codegen": dict(vocab_size=VOCAB, n_layer=2, n_embd=64, n_head=8, rotary_dim=4, n_ctx=64, mp_num=4),
    "codegen-mp8": dict(vocab_size=VOCAB, n_layer=2, n_embd=64, n_head=8, rotary_dim=4, n_ctx=64, mp_num=8),
    "llama": dict(arch="llama", vocab_size=VOCAB, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, rotary_dim=16,
                  n_inner=96, n_ctx=64),
}


@pytest.fixture(scope="module")
def tokenizer():
    import sysconfig

    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text(encoding="utf-8")
    return train_tokenizer([text], vocab_size=VOCAB, num_masks=16)


def random_model(shape: str, seed: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(ModelConfig(**SHAPES[shape])).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def exported(tokenizer, tmp_path_factory):
    """shape -> (codegen2 base model, its HF directory written by codegen2's exporter)."""
    cache = {}

    def make(shape: str):
        if shape not in cache:
            model = random_model(shape)
            run, out = tmp_path_factory.mktemp(f"run-{shape}"), tmp_path_factory.mktemp(f"hf-{shape}") / "hf"
            config = Config(model=model.config)
            config.train.seq_len = 64
            save_config(config, run / "config.toml")
            tokenizer.save(run)
            write_checkpoint(run, 1, model.state_dict(), {"tokens_seen": 0})
            cache[shape] = model, export_hf(run, out)
        base, hf_dir = cache[shape]
        return copy.deepcopy(base), hf_dir

    return make


def hf_base(hf_dir: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def prompt() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def randomise_b(model: nn.Module, seed: int = 11) -> None:
    generator = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def one_line_error(call, *needles: str) -> str:
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and all(n in message for n in needles), message
    return message


# ------------------------------------------------------------------------------------------ targets
def test_defaults_are_the_documented_ones():
    assert LoraSettings() == LoraSettings(rank=16, alpha=32.0, dropout=0.05, targets="all-linear", rslora=False)
    assert LoraSettings().scale == 2.0 and LoraSettings(rslora=True).scale == 8.0


def test_target_groups_and_names_select_the_right_layers():
    codegen, llama = random_model("codegen"), random_model("llama")
    leaves = lambda names: sorted({n.rsplit(".", 1)[-1] for n in names})  # noqa: E731
    assert leaves(select_targets(codegen, "all-linear")) == ["fc_in", "fc_out", "out_proj", "qkv_proj"]
    assert len(select_targets(codegen, "all-linear")) == 8  # 2 layers, no lm_head
    assert leaves(select_targets(codegen, "attention")) == ["out_proj", "qkv_proj"]
    assert leaves(select_targets(llama, "all-linear")) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                          "up_proj", "v_proj"]
    assert leaves(select_targets(llama, "attention")) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert select_targets(llama, ["q_proj", "v_proj"]) == [f"model.layers.{i}.self_attn.{p}_proj"
                                                            for i in range(2) for p in "qv"]
    assert select_targets(llama, ["model.layers.1.mlp.up_proj", "lm_head"]) == ["model.layers.1.mlp.up_proj",
                                                                                 "lm_head"]


def test_bad_settings_are_refused_in_one_line():
    model = random_model("llama")
    one_line_error(lambda: attach_lora(model, LoraSettings(targets=("nope_proj",))), "'nope_proj'", "q_proj")
    one_line_error(lambda: attach_lora(model, LoraSettings(targets="mlp")), "'mlp'")
    one_line_error(lambda: attach_lora(model, LoraSettings(rank=0)), "rank", "0")
    one_line_error(lambda: attach_lora(model, LoraSettings(rank=33)), "rank 33", "model.layers.0.self_attn.k_proj",
                   "at most 32")
    one_line_error(lambda: attach_lora(model, LoraSettings(dropout=1.0)), "dropout")
    one_line_error(lambda: attach_lora(model, LoraSettings(targets=())), "list of module names")
    assert not lora_modules(model) and all(p.requires_grad for p in model.parameters())  # nothing half-attached
    attach_lora(model, LoraSettings(rank=32))  # the largest rank the smallest layer (k_proj, 32 x 64) allows
    one_line_error(lambda: attach_lora(model, LoraSettings()), "already has LoRA adapters")


# ------------------------------------------------------------------------------ training precision
def test_only_adapters_train_and_have_optimizer_state():
    model = random_model("codegen").train()
    base_names = {name for name, _ in model.named_parameters()}
    names = attach_lora(model, LoraSettings(rank=4), base_dtype=torch.bfloat16)
    adapters = adapter_parameters(model)
    assert set(adapters) == {f"{n}.{f}.weight" for n in names for f in ("lora_A", "lora_B")}
    assert all(p.dtype == torch.float32 and p.requires_grad for p in adapters.values())
    frozen = {name: p for name, p in model.named_parameters() if name not in adapters}
    assert set(frozen) == base_names  # the base's state-dict names are unchanged
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in frozen.values())
    assert all((m.lora_B.weight == 0).all() and (m.lora_A.weight != 0).any() for m in lora_modules(model).values())

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = prompt()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
    nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.flatten()).backward()
    optimizer.step()
    assert all(p.grad is None for p in frozen.values())
    assert all(p.grad is not None for p in adapters.values())
    assert {id(p) for p in optimizer.state} == {id(p) for p in adapters.values()}
    assert any((m.lora_B.weight != 0).any() for m in lora_modules(model).values())  # B trained


def test_a_fresh_adapter_changes_nothing_and_dropout_acts_in_training_only():
    model = random_model("llama")
    ids = prompt()
    with torch.no_grad():
        before = model(ids)
        attach_lora(model, LoraSettings(rank=8, targets="attention"), generator=torch.Generator().manual_seed(0))
        assert torch.equal(model(ids), before)
        randomise_b(model)
        assert torch.equal(model(ids), model(ids))  # eval mode (as the model was): no dropout
        model.train()
        assert not torch.equal(model(ids), model(ids))  # dropout 0.05 on the adapters' input


# ------------------------------------------------------------------------------------------ merge
@pytest.mark.parametrize("shape", ["codegen", "codegen-mp8", "llama"])
def test_lora_forward_equals_the_merged_forward(shape):
    model = random_model(shape)
    keys = set(model.state_dict())
    attach_lora(model, LoraSettings(rank=4, alpha=8.0))
    randomise_b(model)
    ids = prompt()
    with torch.no_grad():
        unmerged = model(ids)
        merge_lora(model)
        merged = model(ids)
    assert not lora_modules(model) and all(type(m) is not LoraLinear for m in model.modules())
    assert set(model.state_dict()) == keys
    assert max_diff(unmerged, merged) <= 1e-5
    assert max_diff(unmerged, random_model(shape)(ids).detach()) > 1e-2  # the adapter does change the function


# ------------------------------------------------------------------------------------- PEFT layout
@pytest.mark.parametrize("shape,targets,rslora", [("codegen", "all-linear", False), ("llama", "all-linear", False),
                                                  ("llama", ("q_proj", "v_proj", "down_proj"), True)])
def test_our_adapter_loads_in_peft_with_equal_logits(shape, targets, rslora, exported, tmp_path):
    model, hf_dir = exported(shape)
    attach_lora(model, LoraSettings(rank=4, alpha=12.0, targets=targets, rslora=rslora))
    randomise_b(model)
    out = write_adapter(model, tmp_path / "adapter", base_model=str(hf_dir))
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["lora_dropout"]) == ("LORA", 4, 12, 0.05)
    assert config["base_model_name_or_path"] == str(hf_dir) and config["use_rslora"] == rslora
    keys = set(load_file(out / ADAPTER_WEIGHTS))
    assert len(keys) == 2 * len(lora_modules(model)) and all(k.startswith(KEY_PREFIX) for k in keys)

    reference = peft.PeftModel.from_pretrained(hf_base(hf_dir), out).eval()
    ids = prompt()
    with torch.no_grad():
        assert max_diff(reference(ids).logits, model(ids)) <= 1e-4


@pytest.mark.parametrize("shape,rslora", [("codegen", False), ("llama", False), ("llama", True)])
def test_peft_made_adapter_reads_with_peft_logits(shape, rslora, exported, tmp_path):
    model, hf_dir = exported(shape)
    reference = peft.get_peft_model(hf_base(hf_dir), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                                     target_modules="all-linear", use_rslora=rslora))
    randomise_b(reference)
    reference.eval().save_pretrained(tmp_path / "peft")
    settings = load_adapter(model, tmp_path / "peft")
    assert (settings.rank, settings.alpha, settings.dropout, settings.rslora) == (4, 8.0, 0.1, rslora)
    assert set(lora_modules(model)) == set(select_targets(model, "all-linear"))
    model.eval()
    ids = prompt()
    with torch.no_grad():
        expected = reference(ids).logits
        assert max_diff(expected, model(ids)) <= 1e-4
        assert max_diff(expected, merge_lora(model)(ids)) <= 1e-4


def test_adapter_only_export_of_another_qkv_grouping_is_refused_and_merged_export_works(exported, tmp_path,
                                                                                       tokenizer):
    model, hf_dir = exported("codegen-mp8")
    attach_lora(model, LoraSettings(rank=4, targets="attention"))
    randomise_b(model)
    one_line_error(lambda: write_adapter(model, tmp_path / "adapter"), "mp_num=8", "mp_num=4", "merged")
    assert not (tmp_path / "adapter").exists()
    ids = prompt()
    with torch.no_grad():
        unmerged = model(ids)
    run = tmp_path / "run"
    run.mkdir()
    config = Config(model=model.config)
    config.train.seq_len = 64
    save_config(config, run / "config.toml")
    tokenizer.save(run)
    write_checkpoint(run, 1, merge_lora(model).state_dict(), {"tokens_seen": 0})
    with torch.no_grad():
        assert max_diff(hf_base(export_hf(run, tmp_path / "merged"))(ids).logits, unmerged) <= 1e-4


def test_qkv_adapter_rows_move_as_the_weight_rows_do(exported, tmp_path):
    """Why the refusal above: B's rows are the qkv weight's rows, so another grouping would need B regrouped
    (as the merged export regroups the weight); A is unchanged. With mp_num 4 the rows are transformers' own."""
    model, hf_dir = exported("codegen-mp8")  # hf_dir: the base exported in transformers' 4 groups
    attach_lora(model, LoraSettings(rank=4, targets=("qkv_proj",)))
    randomise_b(model)
    d, n_head = model.config.n_embd, model.config.n_head
    rows = regroup_qkv(torch.arange(3 * d, dtype=torch.float64)[:, None].repeat(1, d), n_head, 8, 4)[:, 0].long()
    names = hf_module_names(model)
    modules = lora_modules(model)
    ids = prompt()
    for regrouped in (True, False):
        tensors = {}
        for path, module in modules.items():
            b = module.lora_B.weight.detach()
            tensors[f"{KEY_PREFIX}{names[path]}.lora_A.weight"] = module.lora_A.weight.detach().clone()
            tensors[f"{KEY_PREFIX}{names[path]}.lora_B.weight"] = (b[rows] if regrouped else b).contiguous()
        out = tmp_path / f"regrouped-{regrouped}"
        out.mkdir()
        save_file(tensors, out / ADAPTER_WEIGHTS)
        config = adapter_config(LoraSettings(rank=4, alpha=32.0, dropout=0.05), sorted(names[p] for p in modules),
                                str(hf_dir))
        (out / ADAPTER_CONFIG).write_text(json.dumps(config))
        with torch.no_grad():
            diff = max_diff(peft.PeftModel.from_pretrained(hf_base(hf_dir), out).eval()(ids).logits, model(ids))
        assert (diff <= 1e-4) == regrouped, diff


def test_hf_module_names_are_transformers_own(exported):
    for shape in ("codegen", "llama"):
        model, hf_dir = exported(shape)
        hf_linears = {n for n, m in hf_base(hf_dir).named_modules() if isinstance(m, nn.Linear)}
        assert set(hf_module_names(model).values()) == hf_linears


# ------------------------------------------------------------------------------------- bad adapters
@pytest.fixture
def adapter_dir(tmp_path):
    model = random_model("llama")
    attach_lora(model, LoraSettings(rank=4, targets="attention"))
    return write_adapter(model, tmp_path / "adapter")


def test_adapter_directory_missing_a_file(adapter_dir):
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        (adapter_dir / name).rename(adapter_dir / f"{name}.away")
        one_line_error(lambda: load_adapter(random_model("llama"), adapter_dir), str(adapter_dir), name)
        (adapter_dir / f"{name}.away").rename(adapter_dir / name)
    model = random_model("llama")
    load_adapter(model, adapter_dir)
    assert len(lora_modules(model)) == 8


def test_adapter_whose_base_does_not_match(adapter_dir):
    wider = build_model(ModelConfig(**{**SHAPES["llama"], "n_embd": 96, "n_head": 6, "n_kv_head": 3}))
    one_line_error(lambda: load_adapter(wider, adapter_dir), "does not match the base", "lora_A has shape [4, 64]",
                   "needs [4, 96]")
    one_line_error(lambda: load_adapter(random_model("codegen"), adapter_dir), "does not match the base",
                   "model.layers.0.self_attn")
    deeper = build_model(ModelConfig(**{**SHAPES["llama"], "n_layer": 1}))
    one_line_error(lambda: load_adapter(deeper, adapter_dir), "does not match the base", "model.layers.1")
    assert not lora_modules(wider) and not lora_modules(deeper)


def test_adapter_files_with_bad_contents(adapter_dir):
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    for change, needle in [({"peft_type": "IA3"}, "IA3"), ({"r": 0}, "r must be"), ({"use_dora": True}, "use_dora"),
                           ({"bias": "all"}, "bias")]:
        (adapter_dir / ADAPTER_CONFIG).write_text(json.dumps({**config, **change}))
        one_line_error(lambda: load_adapter(random_model("llama"), adapter_dir), needle)
    (adapter_dir / ADAPTER_CONFIG).write_text(json.dumps(config))
    tensors = load_file(adapter_dir / ADAPTER_WEIGHTS)
    a_key = next(k for k in tensors if k.endswith("lora_A.weight"))
    save_file({k: v for k, v in tensors.items() if k != a_key}, adapter_dir / ADAPTER_WEIGHTS)
    one_line_error(lambda: load_adapter(random_model("llama"), adapter_dir), "lora_B", "other factor")
    save_file({**tensors, "base_model.model.extra.bias": torch.zeros(2)}, adapter_dir / ADAPTER_WEIGHTS)
    one_line_error(lambda: load_adapter(random_model("llama"), adapter_dir), "extra.bias", "not a LoRA weight")
    (adapter_dir / ADAPTER_WEIGHTS).write_bytes(b"not safetensors")
    one_line_error(lambda: load_adapter(random_model("llama"), adapter_dir), ADAPTER_WEIGHTS)
