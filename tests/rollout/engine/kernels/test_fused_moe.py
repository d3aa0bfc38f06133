"""The fused MoE kernel against the float64 reference, its pair layout, batch invariance and config tables."""

import json

import pytest
import torch

pytest.importorskip("triton")

from rollout.engine.kernels import fused_moe  # noqa: E402
from rollout.engine.kernels.fused_moe import (  # noqa: E402
    GemmConfig, MoEConfig, MoEShape, config_for, fused_experts, pair_layout, parse_table, table_key,
)
from rollout.engine.kernels.tuned import CONFIG_DIR_ENV  # noqa: E402
from rollout.engine.models.layers import experts_forward  # noqa: E402
from kernel_params import DEVICE, BF16  # noqa: E402

# Triton's CPU interpreter miscomputes bf16 tl.dot (see test_paged_decode_attention): bf16 on the GPU only
SMALL = MoEConfig(16, GemmConfig(16, 16, 4, 2), GemmConfig(16, 32, 4, 2))  # several tiles in every dimension


def _case(n, experts, top_k, hidden, inter, dtype, seed=0, used=None):
    gen = torch.Generator().manual_seed(seed)
    used = used or experts
    x = torch.randn(n, hidden, generator=gen)
    ids = torch.stack([torch.randperm(used, generator=gen)[:top_k] for _ in range(n)])
    weights = torch.rand(n, top_k, generator=gen)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    down = torch.randn(experts, hidden, inter, generator=gen) / inter**0.5
    return [t.to(DEVICE) for t in (x.to(dtype), ids, weights.to(dtype), gate_up.to(dtype), down.to(dtype))]


def _reference(x, ids, weights, gate_up, down):
    return experts_forward(x.double(), ids, weights.double(), gate_up.double(), down.double())


def _rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3), BF16])
@pytest.mark.parametrize("shape", [
    (5, 8, 2, 64, 32),     # tiny presets
    (37, 6, 3, 48, 40),    # nothing a power of two
    (70, 4, 2, 32, 16),    # 35 pairs an expert: several blocks per expert
])
@pytest.mark.parametrize("config", [None, SMALL], ids=["default", "small-tiles"])
def test_fused_experts_match_reference(shape, dtype, tol, config):
    args = _case(*shape, dtype=dtype)
    out = fused_experts(*args, config=config)
    assert out.shape == args[0].shape and out.dtype == dtype
    assert _rel_err(out, _reference(*args)) < tol


def test_unused_experts_and_strided_weights():
    """Experts no token picks run no program; weights seen through a transposed view (any strides) still work."""
    x, ids, w, gate_up, down = _case(9, 16, 2, 32, 16, torch.float32, used=5)
    strided_down = down.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    out = fused_experts(x, ids, w, gate_up, strided_down, config=SMALL)
    assert _rel_err(out, _reference(x, ids, w, gate_up, down)) < 1e-5


def test_pair_layout_groups_every_pair_once():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 7, (50, 2), generator=gen).to(DEVICE)
    ids[:, 1] = (ids[:, 0] + 1 + torch.randint(0, 6, (50,), generator=gen).to(DEVICE)) % 7  # distinct per token
    layout = pair_layout(ids, num_experts=9, block_m=16)  # experts 7, 8 unused
    flat = ids.reshape(-1).cpu()
    sorted_pairs, block_expert = layout.sorted_pairs.cpu(), layout.block_expert.cpu()
    counts = torch.bincount(flat, minlength=9)
    live = int((block_expert >= 0).sum())
    assert live == int(((counts + 15) // 16).sum())
    assert torch.all(block_expert[live:] == -1) and torch.all(block_expert[:live].diff() >= 0)
    rows = sorted_pairs[: live * 16].view(live, 16)
    real = rows[rows < 100]
    assert sorted(real.tolist()) == list(range(100))  # every pair exactly once; padding marked num_pairs
    assert torch.all(rows[rows >= 100] == 100)
    for b in range(live):
        pairs = rows[b][rows[b] < 100]
        assert len(pairs) and torch.all(flat[pairs.long()] == block_expert[b])


def test_rows_do_not_depend_on_the_rest_of_the_batch():
    """A token's output is the same bits alone, in a small batch or in a large one (same config), run after run."""
    x, ids, w, gate_up, down = _case(40, 8, 2, 64, 32, torch.float32, seed=3)
    full = fused_experts(x, ids, w, gate_up, down, config=SMALL)
    assert torch.equal(full, fused_experts(x, ids, w, gate_up, down, config=SMALL))
    for m in (1, 7):
        assert torch.equal(fused_experts(x[:m], ids[:m], w[:m], gate_up, down, config=SMALL), full[:m])


def test_graph_padding_keeps_the_config():
    """Eager steps and the padded graph that replaces them look up the same config key."""
    from rollout.engine.cuda_graph import graph_batch_sizes, padded_batch_size

    sizes = graph_batch_sizes(1024)
    for b in range(1, 1025):
        assert table_key(b) == table_key(padded_batch_size(b, sizes))
    assert table_key(1) == 1 and table_key(300) == 512 and table_key(10**9) == fused_moe.CONFIG_KEYS[-1]


def test_tuned_tables_are_read_and_checked(tmp_path, monkeypatch):
    shape = MoEShape(8, 64, 32, 2, "float32")
    tuned = MoEConfig(32, GemmConfig(32, 64, 4, 3), GemmConfig(64, 32, 8, 4))
    (tmp_path / shape.file_name("Some_GPU")).write_text(json.dumps({"64": tuned.to_json()}))
    monkeypatch.setenv(CONFIG_DIR_ENV, str(tmp_path))
    fused_moe.load_table.cache_clear()
    try:
        assert config_for(40, shape, "Some_GPU") == tuned
        assert config_for(100, shape, "Some_GPU") == fused_moe.default_config(128, shape)  # untuned key
        assert config_for(40, shape, "Other_GPU") == fused_moe.default_config(64, shape)
    finally:
        fused_moe.load_table.cache_clear()
    with pytest.raises(ValueError, match="powers of two"):
        parse_table(json.dumps({"48": tuned.to_json()}), "t.json")
    with pytest.raises(ValueError, match="block sizes must be powers of two"):
        parse_table(json.dumps({"64": dict(tuned.to_json(), block_m=24)}), "t.json")
    with pytest.raises(ValueError, match="not a fused-MoE config table"):
        parse_table("[1, 2]", "t.json")


def test_bad_shapes_are_refused():
    x, ids, w, gate_up, down = _case(4, 8, 2, 32, 16, torch.float32)
    with pytest.raises(ValueError, match="want x"):
        fused_experts(x[:, :16], ids, w, gate_up, down)
    with pytest.raises(ValueError, match="down"):
        fused_experts(x, ids, w, gate_up, down[:, :, :8])
