"""normfx.linear_attention and normfx.nn.SimplifiedLinearAttention (SLAB): the formula in float64 in both
association orders, prefix tokens, autocast, and the pass on timm and torchvision ViTs."""
from __future__ import annotations

import pytest
import timm
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.nn as nn
import torchvision

import normfx
from normfx.nn import SelfAttentionSLA, SimplifiedLinearAttention
from normfx.nn.linear_attention import sla_reference
from tests.conftest import rel_err


def _sla(dim: int, heads: int, grid: tuple[int, int], prefix: int, seed: int = 0) -> SimplifiedLinearAttention:
    torch.manual_seed(seed)
    m = SimplifiedLinearAttention(dim, heads, grid, num_prefix_tokens=prefix)
    with torch.no_grad():
        m.positional_encoding.normal_(0, 0.5)   # non-zero: the term must be where the formula puts it
    return m


@pytest.mark.parametrize("prefix", [0, 1, 2])
@pytest.mark.parametrize("grid,dim,heads", [((2, 2), 32, 2), ((6, 5), 16, 4)], ids=["N<=d", "N>d"])
def test_matches_the_formula_in_both_orders(prefix, grid, dim, heads):
    m = _sla(dim, heads, grid, prefix)
    n = prefix + grid[0] * grid[1]
    x = torch.randn(3, n, dim)
    out = m(x)
    for order in ("qk_v", "q_kv"):
        assert rel_err(out.double(), sla_reference(x, m, order)) < 1e-5, order
    assert out.shape == x.shape


def test_prefix_tokens_are_left_out_of_the_dwc_but_attend():
    m = _sla(16, 2, (3, 3), 1)
    x = torch.randn(2, 10, 16)
    with torch.no_grad():
        m.dwc.weight.zero_()
        m.dwc.bias.fill_(5.0)
    y = m(x)
    with torch.no_grad():
        m.dwc.bias.zero_()
    y0 = m(x)
    # the DWC bias reaches every grid token through proj, never the cls token
    assert torch.allclose(y[:, 0], y0[:, 0], atol=1e-6) and not torch.allclose(y[:, 1:], y0[:, 1:])
    x2 = x.clone()
    x2[:, 0] += 1.0
    assert not torch.allclose(m(x2)[:, 1:], y0[:, 1:])          # the cls token still takes part in attention


def test_core_in_float32_under_bf16_autocast():
    m = _sla(32, 4, (4, 4), 1)
    x = torch.randn(2, 17, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y.double(), sla_reference(x, m, "q_kv")) < 3e-2


def test_errors():
    with pytest.raises(ValueError, match="not divisible"):
        SimplifiedLinearAttention(30, 4, (2, 2))
    with pytest.raises(ValueError, match="expects \\[B, 1 \\+ 2·2, 16\\]"):
        _sla(16, 2, (2, 2), 1)(torch.randn(1, 6, 16))
    with pytest.raises(ValueError, match="no attention map to mask"):
        _sla(16, 2, (2, 2), 0)(torch.randn(1, 4, 16), attn_mask=torch.zeros(4, 4))
    sa = SelfAttentionSLA(_sla(16, 2, (2, 2), 0))
    x = torch.randn(1, 4, 16)
    with pytest.raises(ValueError, match="self-attention"):
        sa(x, x.clone(), x)
    with pytest.raises(ValueError, match="kernel_size"):
        normfx.linear_attention(nn.Linear(2, 2), kernel_size=4)


MODELS = {
    "timm_vit": lambda: timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=10),
    "timm_deit_distilled": lambda: timm.create_model("deit_tiny_distilled_patch16_224", img_size=64, num_classes=10),
    "torchvision_vit": lambda: torchvision.models.VisionTransformer(64, 16, 2, 4, 64, 128, num_classes=10),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_pass_on_vits_trains_and_exports(name, tmp_path):
    torch.manual_seed(0)
    base = MODELS[name]().eval()
    n_attn = sum(1 for m in base.modules() if isinstance(m, nn.MultiheadAttention) or type(m).__name__ == "Attention")
    m = normfx.linear_attention(base)
    r = normfx.last_report(m)
    assert len(r.changes) == n_attn and not r.skips
    assert "the function changes" in r.summary()
    assert type(m) is type(base)
    slas = [x for x in m.modules() if isinstance(x, SimplifiedLinearAttention)]
    assert len(slas) == n_attn
    prefix = {"timm_vit": 1, "timm_deit_distilled": 2, "torchvision_vit": 1}[name]
    assert all(s.num_prefix_tokens == prefix and s.grid == (4, 4) for s in slas)
    assert not any(isinstance(x, SimplifiedLinearAttention) for x in base.modules())      # caller untouched
    x = torch.randn(2, 3, 64, 64)
    m.train()
    m(x).float().square().mean().backward()
    assert all(s.positional_encoding.grad is not None and s.dwc.weight.grad is not None for s in slas)
    m.eval()
    report = normfx.export(m, x, tmp_path / "m.onnx")
    assert report.outputs[0].max_rel < 1e-4
    assert report.op_counts.get("Softmax", 0) == 0


def test_cross_attention_and_swin_without_image_size_are_skipped_with_their_reason():
    s = normfx.last_report(normfx.linear_attention(torchvision.models.swin_t()))
    assert not s.changes and len(s.skips) == 12 and all("pass image_size=(H, W)" in k.detail for k in s.skips)
    dec = nn.TransformerDecoderLayer(16, 2, batch_first=True)
    r = normfx.last_report(normfx.linear_attention(dec))
    assert not r.changes and {k.detail for k in r.skips} == {
        "no token grid: the model has no patch embedding normfx reads (cross-attention or text?)"}
    v2 = normfx.last_report(normfx.linear_attention(
        torchvision.models.SwinTransformer([4, 4], 16, [2], [2], [4, 4], block=torchvision.models.swin_transformer
                                           .SwinTransformerBlockV2, downsample_layer=torchvision.models.
                                           swin_transformer.PatchMergingV2), image_size=32))
    assert not v2.changes and all("Swin V2" in k.detail for k in v2.skips) and len(v2.skips) == 2


def test_grid_layout_equals_token_layout():
    """torchvision's Swin calls its attention on [B, H, W, C]: the same SLA over the row-major tokens."""
    m = _sla(16, 2, (3, 5), 0)
    x = torch.randn(2, 3, 5, 16)
    assert torch.equal(m(x), m(x.reshape(2, 15, 16)).reshape(2, 3, 5, 16))
    with pytest.raises(ValueError, match="grid"):
        m(torch.randn(2, 5, 3, 16))
    with pytest.raises(ValueError, match="no attention map to mask"):
        m(x.reshape(2, 15, 16), mask=torch.zeros(1, 15, 15))


def _tv_swin():
    return torchvision.models.SwinTransformer([4, 4], 32, [2, 2, 2, 2], [2, 4, 4, 8], [4, 4], num_classes=10)


def _timm_swin():
    return timm.create_model("swin_tiny_patch4_window7_224", img_size=64, embed_dim=32, depths=(2, 2, 2, 2),
                             num_heads=(2, 4, 4, 8), window_size=4, num_classes=10)


SWINS = {"torchvision_swin": (_tv_swin, {"image_size": 64}), "timm_swin": (_timm_swin, {})}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SWINS))
@pytest.mark.parametrize("stages", [None, (0, 1, 2, 3)])
def test_pass_on_swins_trains_and_exports(name, stages, tmp_path):
    """Stages 16×16, 8×8, 4×4, 2×2: default LLSS swaps the first two; the window becomes the stage."""
    torch.manual_seed(0)
    build, kw = SWINS[name]
    base = build().eval()
    n_attn = sum(1 for m in base.modules() if "WindowAttention" in type(m).__name__)
    m = normfx.linear_attention(base, stages=stages, **kw)
    r = normfx.last_report(m)
    assert type(m) is type(base) and n_attn == 8
    assert len(r.changes) + len(r.skips) == n_attn
    chosen = {0, 1} if stages is None else set(stages)
    assert len(r.changes) == 2 * len(chosen)
    assert {c.detail.split(",")[0] for c in r.changes} == {f"stage {s}" for s in chosen}
    assert all("not selected" in k.detail for k in r.skips)
    res = {0: (16, 16), 1: (8, 8), 2: (4, 4), 3: (2, 2)}
    slas = [x for x in m.modules() if isinstance(x, SimplifiedLinearAttention)]
    assert sorted(s.grid for s in slas) == sorted(res[s] for s in chosen for _ in range(2))
    assert not any(isinstance(x, SimplifiedLinearAttention) for x in base.modules())      # caller untouched
    x = torch.randn(2, 3, 64, 64)
    m.train()
    m(x).square().mean().backward()
    assert all(s.positional_encoding.grad is not None and s.dwc.weight.grad is not None for s in slas)
    m.eval()
    report = normfx.export(m, x, tmp_path / "m.onnx")
    assert report.outputs[0].max_rel < 1e-4
    assert report.op_counts.get("Softmax", 0) == n_attn - len(r.changes)


@pytest.mark.parametrize("name", list(SWINS))
def test_swin_stage_attends_over_the_whole_stage(name):
    """The widened block's attention equals one SLA over the stage's tokens: no windows, no shift."""
    torch.manual_seed(0)
    build, kw = SWINS[name]
    m = normfx.linear_attention(build().eval(), stages=(0,), **kw)
    blocks = [b for b in m.modules() if isinstance(getattr(b, "attn", None), SimplifiedLinearAttention)]
    assert len(blocks) == 2                                     # the shifted one included
    only = normfx.last_report(normfx.linear_attention(build(), stages=(2,), **kw))
    assert [c.detail.split(",")[0] for c in only.changes] == ["stage 2"] * 2 and len(only.skips) == 6
    for block in blocks:
        sla = block.attn
        with torch.no_grad():
            sla.positional_encoding.normal_(0, 0.5)
        x = torch.randn(2, 16, 16, 32)
        got = block._attn(x) if hasattr(block, "_attn") else block.attn(x)
        want = sla_reference(x.reshape(2, 256, 32), sla, "q_kv").reshape(2, 16, 16, 32)
        assert rel_err(got.double(), want) < 1e-5


def test_stage_and_cls_token_errors():
    with pytest.raises(ValueError, match="stages 0..3"):
        normfx.linear_attention(_tv_swin(), stages=(4,), image_size=64)
    with pytest.raises(ValueError, match="image_size must be"):
        normfx.linear_attention(_tv_swin(), image_size=(64, 0))
    with pytest.raises(ValueError, match="one forward of Sequential on a \\[1, 3, 64, 64\\] input failed"):
        normfx.linear_attention(nn.Sequential(_tv_swin(), nn.Linear(7, 2)), image_size=64)   # 10 logits ≠ 7
    with pytest.raises(ValueError, match="sequence of stage indices"):
        normfx.linear_attention(_tv_swin(), stages=1, image_size=64)     # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stages 0..0"):
        normfx.linear_attention(MODELS["torchvision_vit"](), stages=(1,))
    with pytest.raises(ValueError, match="cls_token must be"):
        normfx.linear_attention(MODELS["timm_vit"](), cls_token="avg")   # type: ignore[arg-type]
    with pytest.raises(ValueError, match="torchvision's VisionTransformer.forward reads x\\[:, 0\\]"):
        normfx.linear_attention(MODELS["torchvision_vit"](), cls_token="drop")
    with pytest.raises(ValueError, match="distilled"):
        normfx.linear_attention(MODELS["timm_deit_distilled"](), cls_token="drop")
    vit = MODELS["timm_vit"]()
    with pytest.raises(ValueError, match="stages 0..0"):                   # nothing changed, even in place
        normfx.linear_attention(vit, cls_token="drop", stages=(1,), inplace=True)
    assert vit.cls_token is not None and vit.num_prefix_tokens == 1 and vit.global_pool == "token"


def test_cls_token_drop_is_slab_deits_average_pooling():
    torch.manual_seed(0)
    base = MODELS["timm_vit"]().eval()
    m = normfx.linear_attention(base, cls_token="drop")
    r = normfx.last_report(m)
    assert len(r.changes) == 12 and "class token removed" in r.summary()
    slas = [x for x in m.modules() if isinstance(x, SimplifiedLinearAttention)]
    assert all(s.num_prefix_tokens == 0 and s.grid == (4, 4) for s in slas)
    assert m.cls_token is None and m.num_prefix_tokens == 0 and m.global_pool == "avg"
    assert "cls_token" not in m.state_dict() and base.cls_token is not None          # caller untouched
    assert torch.equal(m.pos_embed, base.pos_embed[:, 1:])
    x = torch.randn(2, 3, 64, 64)
    feats = m.forward_features(x)
    assert feats.shape == (2, 16, 192)
    assert rel_err(m(x), m.head(m.fc_norm(feats.mean(1)))) < 1e-6               # the head reads the patch mean


SLABS = {"torchvision_vit": (lambda: torchvision.models.VisionTransformer(32, 8, 2, 2, 32, 64, num_classes=10),
                             {}, 32),
         **{k: (build, {**kw, "stages": (0, 1, 2, 3)}, 64) for k, (build, kw) in SWINS.items()}}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLABS))
def test_slab_composes_with_repbn_and_deploy(name):
    """SLAB = SLA + PRepBN: after training to λ = 0 the deployed model (a ViT; a Swin with every stage
    linear) has no normalization and no softmax attention, and computes the same function."""
    torch.manual_seed(0)
    build, kw, size = SLABS[name]
    m = normfx.repbn(normfx.linear_attention(build(), **kw), total_steps=2)
    sched = normfx.RepBNScheduler(m)
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    for _ in range(3):
        loss = m.train()(torch.randn(4, 3, size, size)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    m.eval()
    d = normfx.deploy(m)
    x = torch.randn(2, 3, size, size)
    assert rel_err(d(x), m(x)) < 1e-4
    left = [type(k).__name__ for k in d.modules() if isinstance(k, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm,
                                                                    nn.MultiheadAttention))
            or "WindowAttention" in type(k).__name__]
    assert not left, left


@settings(max_examples=30, deadline=None)
@given(heads=st.integers(1, 4), head_dim=st.sampled_from([2, 4, 8]), gh=st.integers(1, 6), gw=st.integers(1, 6),
       prefix=st.integers(0, 2), kernel=st.sampled_from([1, 3, 5]), batch=st.integers(1, 3),
       qkv_bias=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_any_shape_matches_the_formula(heads, head_dim, gh, gw, prefix, kernel, batch, qkv_bias, seed):
    """Whatever the grid (square or not, smaller than the kernel), prefix and widths: the module equals the
    float64 formula in both association orders."""
    torch.manual_seed(seed)
    dim = heads * head_dim
    m = SimplifiedLinearAttention(dim, heads, (gh, gw), num_prefix_tokens=prefix, kernel_size=kernel,
                                  qkv_bias=qkv_bias)
    with torch.no_grad():
        m.positional_encoding.normal_(0, 0.5)
    x = torch.randn(batch, prefix + gh * gw, dim)
    out = m(x).double()
    for order in ("qk_v", "q_kv"):
        assert rel_err(out, sla_reference(x, m, order)) < 1e-4, order
