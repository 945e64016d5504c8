"""Hugging Face ``transformers`` models (small configs, random weights): every one-liner's result
runs the calls the original ran, with the same outputs where the transform is exact (issue 11.7),
and every site is reported once (11.5)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import normfx
from tests.conftest import rel_err

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
MASK = torch.ones(2, 10, dtype=torch.long).index_fill_(1, torch.tensor([8, 9]), 0)
PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _bert() -> nn.Module:
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


def _gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Model(cfg).eval()


def _vit() -> nn.Module:
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64)
    return transformers.ViTModel(cfg).eval()


def _calls(name: str, model: nn.Module) -> list:
    """The calls a user of each model makes: positional, keyword, masks, embeddings, flags."""
    if name == "vit":
        return [lambda m: m(PIXELS).last_hidden_state,
                lambda m: m(pixel_values=PIXELS, output_hidden_states=True).hidden_states[1],
                lambda m: m(PIXELS, return_dict=False)[0]]
    embeds = model.get_input_embeddings()(IDS).detach()
    return [lambda m: m(IDS).last_hidden_state,
            lambda m: m(input_ids=IDS, attention_mask=MASK).last_hidden_state,
            lambda m: m(inputs_embeds=embeds).last_hidden_state,
            lambda m: m(IDS, output_hidden_states=True).hidden_states[1],
            lambda m: m(IDS, return_dict=False)[0]]


MODELS = {"bert": _bert, "gpt2": _gpt2, "vit": _vit}
ONE_LINERS = {
    "convbn_tune": (lambda m: normfx.convbn(m, mode="tune"), True),
    "convbn_deploy": (lambda m: normfx.convbn(m, mode="deploy"), True),
    "repbn": (lambda m: normfx.repbn(m, total_steps=10), True),   # λ = 1: exactly the LayerNorms
    "freeze": (lambda m: normfx.freeze(m, keep=("norm",)), True),
    "fixed_point": (lambda m: normfx.fixed_point(m, bits=8), False),
    "deploy": (lambda m: normfx.deploy(m), True),
}


@pytest.mark.parametrize("one_liner", list(ONE_LINERS))
@pytest.mark.parametrize("name", list(MODELS))
def test_every_call_still_works(name, one_liner):
    torch.manual_seed(0)
    model = MODELS[name]()
    transform, exact = ONE_LINERS[one_liner]
    out = transform(model).eval()
    assert type(out) is type(model)      # the root's forward (and its branches) are the model's own
    report = normfx.last_report(out)
    for p in report.passes:
        sites = [c.site for c in p.changes] + [s.site for s in p.skips]
        assert len(sites) == len(set(sites)), f"{p.name} reports a site twice"
    with torch.no_grad():
        for call in _calls(name, model):
            got, ref = call(out), call(model)
            assert got.shape == ref.shape
            if exact:
                assert rel_err(got, ref) < 1e-6


@pytest.mark.parametrize("name,layernorms", [("bert", 5), ("gpt2", 5), ("vit", 5)])
def test_repbn_finds_every_layernorm(name, layernorms):
    model = MODELS[name]()
    assert sum(isinstance(m, nn.LayerNorm) for m in model.modules()) == layernorms
    out = normfx.repbn(model, total_steps=10)
    result = normfx.last_report(out).get("swap_layernorm")
    assert len(result.changes) == layernorms and result.sites == layernorms
    assert sum(isinstance(m, normfx.nn.ProgressiveRepBN) for m in out.modules()) == layernorms


def test_prepbn_bert_trains_and_deploys_outside_traced_regions():
    """LayerNorms whose parent forward cannot be traced are swapped in place; at deploy they become
    one multiply-add each (not folded: no graph shows the Linear they feed), reported as such."""
    model = _bert()
    m = normfx.repbn(model, total_steps=2).train()
    sched = normfx.RepBNScheduler(m)
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    for _ in range(2):
        m(IDS).last_hidden_state.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    d = normfx.deploy(m.eval())
    fold = normfx.last_report(d).get("fold_repbn")
    assert fold.sites == 5
    assert not any(isinstance(x, (nn.LayerNorm, normfx.nn.ProgressiveRepBN)) for x in d.modules())
    with torch.no_grad():
        assert rel_err(d(IDS).last_hidden_state, m(IDS).last_hidden_state) < 1e-5


def test_fixed_point_leaves_integer_inputs_alone():
    """BERT's input_ids are indices: no fixed-point cast is put on them (it would refuse them)."""
    out = normfx.fixed_point(_bert(), bits=8)
    normfx.calibrate(out, [IDS], progress=False)
    out(IDS)
