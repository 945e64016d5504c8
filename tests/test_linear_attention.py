"""normfx.linear_attention and normfx.nn.SimplifiedLinearAttention (SLAB): the formula in float64 in both
association orders, prefix tokens, autocast, and the pass on timm and torchvision ViTs."""
from __future__ import annotations

import pytest
import timm
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


def test_swin_and_cross_attention_are_skipped_with_their_reason():
    s = normfx.last_report(normfx.linear_attention(torchvision.models.swin_t()))
    assert not s.changes and len(s.skips) == 12 and all("Swin window attention" in k.detail for k in s.skips)
    dec = nn.TransformerDecoderLayer(16, 2, batch_first=True)
    r = normfx.last_report(normfx.linear_attention(dec))
    assert not r.changes and {k.detail for k in r.skips} == {
        "no token grid: the model has no patch embedding normfx reads (cross-attention or text?)"}


@pytest.mark.slow
def test_slab_composes_with_repbn_and_deploy():
    """SLAB = SLA + PRepBN: after training to λ = 0 the deployed model has no normalization and no
    softmax attention."""
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(32, 8, 2, 2, 32, 64, num_classes=10)
    m = normfx.repbn(normfx.linear_attention(vit), total_steps=2)
    sched = normfx.RepBNScheduler(m)
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    for _ in range(3):
        loss = m.train()(torch.randn(8, 3, 32, 32)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    m.eval()
    d = normfx.deploy(m)
    x = torch.randn(4, 3, 32, 32)
    assert rel_err(d(x), m(x)) < 1e-4
    assert not any(isinstance(k, (nn.LayerNorm, nn.BatchNorm1d, nn.MultiheadAttention)) for k in d.modules())
