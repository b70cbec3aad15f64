"""Model: cached decoding, prefix-LM / document masks in the model, presets' parameter counts.

The behaviour tests run for every architecture (ARCHS): the same masks and cache rules hold for all.
"""

import pytest
import torch

from codegen2.config import ModelConfig, config_from_dict, preset_dict
from codegen2.models import architecture, build_model
from codegen2.models.codegen.model import CodeGenModel, count_parameters
from codegen2.models.common import KVCache

# One small shape per architecture; llama's has grouped-query attention (6 query heads, 2 key/value heads).
SMALL = {
    "codegen": dict(vocab_size=300, n_layer=2, n_embd=96, n_head=6, rotary_dim=8, n_ctx=128, mp_num=3),
    "llama": dict(arch="llama", vocab_size=300, n_layer=2, n_embd=96, n_head=6, n_kv_head=2, rotary_dim=16,
                  n_inner=160, n_ctx=128),
}
ARCHS = pytest.mark.parametrize("arch", list(SMALL))


def small_model(arch: str = "codegen") -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(**SMALL[arch])).eval()


@ARCHS
@pytest.mark.parametrize("split", [[40], [1] * 40, [7, 1, 1, 13, 18], [20, 20]])
def test_kv_cache_matches_full_forward(split, arch):
    model = small_model(arch)
    ids = torch.randint(0, 300, (3, 40))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, 3, 64)
        pieces, start = [], 0
        for length in split:
            pieces.append(model(ids[:, start:start + length], cache=cache))
            start += length
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= 1e-5


@ARCHS
def test_left_padded_batch_matches_single_prompts(arch):
    model = small_model(arch)
    prompts = [torch.randint(0, 300, (n,)) for n in (5, 12, 9)]
    longest = 12
    ids = torch.zeros(3, longest, dtype=torch.long)
    valid = torch.zeros(3, longest, dtype=torch.bool)
    for row, p in enumerate(prompts):
        ids[row, longest - len(p):] = p
        valid[row, longest - len(p):] = True
    positions = (valid.long().cumsum(1) - 1).clamp_min(0)
    cache = KVCache(model.config, 3, 32)
    cache.valid[:, :longest] = valid
    cache.has_padding = True
    with torch.no_grad():
        batched = model(ids, position_ids=positions, cache=cache)
        for row, p in enumerate(prompts):
            alone = model(p[None])
            assert (batched[row, longest - len(p):] - alone[0]).abs().max() <= 1e-5


@ARCHS
def test_prefix_lm_lets_earlier_positions_see_later_prefix_tokens(arch):
    model = small_model(arch)
    ids = torch.randint(0, 300, (1, 20))
    changed = ids.clone()
    changed[0, 6] = (changed[0, 6] + 1) % 300  # a later prefix token
    prefix = torch.tensor([10])
    with torch.no_grad():
        causal_delta = (model(ids) - model(changed))[0, :6].abs().max()
        prefix_delta = (model(ids, prefix_len=prefix) - model(changed, prefix_len=prefix))[0, :6].abs().max()
    assert causal_delta == 0
    assert prefix_delta > 1e-4


@ARCHS
def test_document_mask_isolates_packed_documents(arch):
    model = small_model(arch)
    a = torch.randint(0, 300, (1, 8))
    b = torch.randint(0, 300, (1, 12))
    packed = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 8 + [1] * 12])
    with torch.no_grad():
        out = model(packed, doc_ids=doc_ids)
        # The second document sees nothing of the first, but keeps its absolute positions 8..19.
        alone = model(b, position_ids=torch.arange(8, 20)[None])
        first = model(a)
    assert (out[0, 8:] - alone[0]).abs().max() <= 1e-5
    assert (out[0, :8] - first[0]).abs().max() <= 1e-5


@pytest.mark.parametrize("name,expected", [("1b", 1_015_306_240), ("3_7b", 3_641_174_016),
                                           ("7b", 6_862_858_240), ("16b", 16_032_155_648)])
def test_published_parameter_counts(name, expected):
    cfg = config_from_dict(preset_dict(name)).validate().model
    assert count_parameters(cfg) == expected
    with torch.device("meta"):
        model = CodeGenModel(cfg)
    assert model.num_parameters() == expected


def test_bad_shapes_are_rejected():
    from codegen2.config import ConfigError

    with pytest.raises(ConfigError, match="mp_num"):
        architecture(ModelConfig(n_embd=96, n_head=6, mp_num=4, rotary_dim=8))


@ARCHS
def test_last_only_and_decode_layout_keep_the_logits(arch):
    model = small_model(arch)
    ids = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        full = model(ids)
        last = model(ids, last_only=True)
        assert (last[:, -1] - full[:, -1]).abs().max() <= 1e-6
        state_before = {k: v.clone() for k, v in model.state_dict().items()}
        model.use_decode_layout()
        after = model(ids)
    assert (after - full).abs().max() <= 1e-5
    for name, value in model.state_dict().items():
        assert torch.equal(value, state_before[name]), name
