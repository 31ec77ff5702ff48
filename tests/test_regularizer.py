"""The regularizer API: last_entropy / last_regularizer against a float64 evaluation of the
definitions (MATH.md section 1), their gradients, entropy_loss, and a training run that lowers the
entropy."""
import math

import pytest
import torch
from torch import nn

import entropy_attn.reference as reference
import entropy_attn.regularizer as reg
from entropy_attn import AttentionMonitor, EntropyAttention, entropy_loss, replace_attention

E, H, L, N = 16, 4, 6, 3


def _setup(**options):
    """A float64 self-attention layer, an input, masks with an empty row (row 1) and padded
    queries (batch 0, positions 4 and 5)."""
    layer = EntropyAttention(E, H, batch_first=True, dtype=torch.float64, **options)
    x = torch.randn(N, L, E, dtype=torch.float64)
    blocked = torch.rand(L, L) < 0.3
    blocked[:, 0] = False
    blocked[1] = True
    pad = torch.zeros(N, L, dtype=torch.bool)
    pad[0, 4:] = True
    return layer, x, blocked, pad


def _definition(layer, x, blocked, pad):
    """Per-row P ([N, H, L, L]), key counts and valid-row weights, float64, written from MATH.md."""
    q, k, _ = (x @ layer.in_proj_weight.T + layer.in_proj_bias).chunk(3, dim=-1)
    q, k = (t.view(N, L, H, -1).transpose(1, 2) for t in (q, k))
    allowed = ~blocked[None, None] & ~pad[:, None, None, :]
    s = (q @ k.transpose(-1, -2)) / math.sqrt(E // H)
    P = torch.softmax(s.masked_fill(~allowed, -math.inf), dim=-1).nan_to_num(0.0)
    counts = allowed.sum(-1).double()
    valid = (counts > 0) & ~pad[:, None, :]
    return P, counts, valid


def _head_mean(values, valid):
    v = valid.expand_as(values).double()
    return (values * v).sum((0, 2)) / v.sum((0, 2))


@pytest.mark.parametrize("normalize", [False, True])
def test_last_entropy_matches_definition(normalize):
    layer, x, blocked, pad = _setup(normalize=normalize)
    layer(x, x, x, attn_mask=blocked, key_padding_mask=pad, need_weights=False)
    P, counts, valid = _definition(layer, x, blocked, pad)
    ent = -(P * torch.log(P.clamp_min(1e-300))).sum(-1)
    if normalize:
        ent = torch.where(counts > 1, ent / torch.log(counts.clamp_min(2)), 0.0)
        assert (ent <= 1 + 1e-12).all()
    expected = _head_mean(ent, valid)
    torch.testing.assert_close(layer.last_entropy, expected, rtol=1e-10, atol=1e-12)
    assert layer.last_regularizer is layer.last_entropy
    assert torch.equal(layer._last_rows, valid.expand(N, H, L).sum((0, 2)).double().float())


def test_a_finfo_min_padding_mask_drops_padded_queries():
    """A float key_padding_mask of finfo.min pads as True and -inf do: the padded queries are left
    out of last_entropy and of the monitor's row counts (they were counted as queries)."""
    layer, x, blocked, pad = _setup()
    recorded = []
    for kpm in (pad, torch.zeros(N, L, dtype=torch.float64).masked_fill(pad, -math.inf),
                torch.zeros(N, L, dtype=torch.float64).masked_fill(pad, torch.finfo(torch.float64).min)):
        layer(x, x, x, attn_mask=blocked, key_padding_mask=kpm, need_weights=False)
        recorded.append((layer.last_entropy, layer._last_rows))
    for entropy, rows in recorded[1:]:
        torch.testing.assert_close(entropy, recorded[0][0], rtol=1e-12, atol=1e-12)
        assert torch.equal(rows, recorded[0][1])


@pytest.mark.parametrize("bias_kv", [False, True], ids=["cells_k", "cells_k_plus_1"])
def test_normalized_range_regularizer(bias_kv):
    """normalize=True divides the range regularizer by the log of its number of cells (k anchors,
    and one more for the add_bias_kv key, which has no position), as it divides Shannon's by
    log n_i; it was left in nats, so one gamma weighed range about 3x Shannon in the examples."""
    from entropy_attn import EntropyAttention

    torch.manual_seed(0)
    plain = EntropyAttention(E, H, regularizer="range", num_anchors=5, add_bias_kv=bias_kv, dtype=torch.float64)
    normed = EntropyAttention.from_mha(plain, regularizer="range", num_anchors=5, normalize=True)
    with torch.no_grad():
        normed.anchors.copy_(plain.anchors)
    x = torch.randn(L, N, E, dtype=torch.float64)
    plain(x, x, x, need_weights=False)
    normed(x, x, x, need_weights=False)
    n_cells = 5 + bias_kv
    torch.testing.assert_close(normed.last_regularizer, plain.last_regularizer / math.log(n_cells))
    assert (normed.last_regularizer <= 1 + 1e-12).all()


def test_l2_regularizer_value_and_gradient(monkeypatch):
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", N * H * L * 2)  # 2 rows per chunk: checkpointed chunks
    layer, x, blocked, pad = _setup(regularizer="l2")
    layer(x, x, x, attn_mask=blocked, key_padding_mask=pad, need_weights=False)
    P, _, valid = _definition(layer, x, blocked, pad)
    expected = _head_mean((P * P).sum(-1), valid)
    torch.testing.assert_close(layer.last_regularizer, expected, rtol=1e-10, atol=1e-12)
    g = torch.autograd.grad(entropy_loss(layer), layer.in_proj_weight)[0]
    g_ref = torch.autograd.grad(expected.mean(), layer.in_proj_weight)[0]
    torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-12)
    assert g.abs().max() > 0


def test_entropy_loss_sums_layers_and_is_differentiable():
    model = nn.Sequential(*[nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True, dtype=torch.float64)
                            for _ in range(3)])
    replace_attention(model)
    x = torch.randn(N, L, E, dtype=torch.float64)
    last = model[-1].self_attn
    seen = []
    last.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    model(x)
    layers = [m.self_attn for m in model]
    loss = entropy_loss(model)
    torch.testing.assert_close(loss, sum(m.last_entropy.mean() for m in layers))
    # the last layer's weights enter only its own term: check that gradient against float64
    # autograd of the definition on the layer's input
    no_mask = torch.zeros(L, L, dtype=torch.bool), torch.zeros(N, L, dtype=torch.bool)
    P, _, valid = _definition(last, seen[0].detach(), *no_mask)
    manual = _head_mean(-(P * torch.log(P)).sum(-1), valid).mean()
    g = torch.autograd.grad(loss, last.in_proj_weight)[0]
    torch.testing.assert_close(g, torch.autograd.grad(manual, last.in_proj_weight)[0], rtol=1e-7, atol=1e-10)
    assert g[:2 * E].abs().max() > 0  # q and k rows get a gradient


def test_none_regularizer_and_entropy_loss_errors():
    layer, x, _, _ = _setup(regularizer="none")
    model = nn.Sequential(nn.Linear(E, E), layer)
    with pytest.raises(RuntimeError, match="training mode"):
        entropy_loss(model)
    layer(x, x, x)
    assert torch.equal(entropy_loss(model), torch.zeros((), dtype=torch.float64))
    assert layer.last_entropy is not None  # the entropy is still measured
    with pytest.raises(ValueError, match="no EntropyAttention"):
        entropy_loss(nn.Linear(2, 2))
    layer.eval()
    layer(x, x, x)
    assert layer.last_entropy is None and layer.last_regularizer is None  # eval, unmonitored: nothing stale


def test_regularizer_registry_is_one_entry_per_kind():
    assert set(reg.REGULARIZERS) >= {"shannon", "l2", "none"}
    layer, x, _, _ = _setup()
    reg.REGULARIZERS["max_row"] = lambda inp, ent: reg.map_rows(inp, lambda p, _: p.amax(-1))
    try:
        layer.regularizer = "max_row"
        layer(x, x, x, need_weights=False)
        assert layer.last_regularizer.shape == (H,) and (layer.last_regularizer <= 1).all()
    finally:
        del reg.REGULARIZERS["max_row"]


def _eval_entropy(model, data):
    model.eval()
    with torch.no_grad(), AttentionMonitor(model) as mon:
        model(data)
    model.train()
    return torch.stack([v["entropy"].mean() for v in mon.summary().values()]).mean().item()


def test_training_with_gamma_lowers_entropy():
    def train(gamma):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.TransformerEncoder(
            nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2, enable_nested_tensor=False),
            nn.Linear(32, 1))
        replace_attention(model)
        x, y = torch.randn(16, 12, 8), torch.randn(16, 12, 1)
        before = _eval_entropy(model, x)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(25):
            loss = nn.functional.mse_loss(model(x), y) + gamma * entropy_loss(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return before, _eval_entropy(model, x)

    before, plain = train(0.0)
    _, regularized = train(0.5)
    assert before > 0.8 * math.log(12)  # near-uniform at initialization
    assert regularized < 0.6 * before, (before, regularized)
    assert regularized < plain - 0.3, (plain, regularized)


@pytest.mark.parametrize("nq,nk", [(5, 7), (7, 5), (6, 6)])
@pytest.mark.parametrize("causal", [False, True])
def test_key_counts_closed_form_matches_the_masked_count(nq, nk, causal):
    from entropy_attn._inputs import check_inputs

    q, k = torch.randn(2, 3, nq, 4), torch.randn(2, 3, nk, 4)
    closed = reg.key_counts(check_inputs(q, k, k, causal=causal))
    counted = reg.key_counts(check_inputs(q, k, k, causal=causal, attn_mask=torch.ones(nq, nk, dtype=torch.bool)))
    torch.testing.assert_close(closed.expand(2, 3, nq), counted.expand(2, 3, nq))
    expected = torch.ones(nq, nk).tril(nk - nq).sum(-1) if causal else torch.full((nq,), float(nk))
    torch.testing.assert_close(closed.flatten(), expected)


def test_range_regularizer_layer_matches_functional_and_trains_anchors():
    """regularizer='range': last_regularizer is the fused range entropy of the layer's own
    anchors, the anchors get gradients, and from_mha keeps them off the meta device."""
    from entropy_attn import EntropyAttention, entropy_attention
    from entropy_attn.range_entropy import ball_cells, sequence_positions

    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    layer = EntropyAttention.from_mha(mha, regularizer="range", num_anchors=5, range_alpha=30.0)
    assert layer.anchors.device.type == "cpu" and layer.anchors.shape == (5, 1)
    x = torch.randn(2, 11, 32)
    out, _ = layer(x, x, x, need_weights=False, is_causal=True, attn_mask=torch.ones(11, 11, dtype=torch.bool).triu(1))
    ref_out, _ = mha(x, x, x, need_weights=False, attn_mask=torch.ones(11, 11, dtype=torch.bool).triu(1))
    assert torch.allclose(out, ref_out, atol=1e-5)
    q, k, v = (t.reshape(2, 11, 4, 8).transpose(1, 2) for t in torch.nn.functional.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1))
    cells = ball_cells(sequence_positions(11), layer.anchors, 30.0)
    _, hr = entropy_attention(q, k, v, causal=True, entropy="range", cells=cells)
    assert torch.allclose(layer.last_regularizer, hr.mean(dim=(0, 2)), atol=1e-5)
    layer.last_regularizer.sum().backward()
    assert layer.anchors.grad is not None and layer.anchors.grad.abs().sum() > 0
    # the materialized path (need_weights=True) gives the same value
    layer(x, x, x, need_weights=True, attn_mask=torch.ones(11, 11, dtype=torch.bool).triu(1))
    assert torch.allclose(layer.last_regularizer, hr.mean(dim=(0, 2)), atol=1e-5)
