"""EntropyAttention against torch.nn.MultiheadAttention: construction, state_dict, forward,
gradients, masks, layouts, errors, dropout, the Triton path, pruning, and model patching."""
import copy
import io

import pytest
import torch
import torchvision  # CI installs it: a missing torchvision must fail, not skip
from torch import nn

from entropy_attn import AttentionMonitor, EntropyAttention, entropy_loss, replace_attention
from entropy_attn.modules import _top_k_inputs

pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")  # MHA's own

E, H, L, S, N = 16, 4, 5, 7, 3
ATOL = 2e-5


def _pair(config, dtype=torch.float32):
    mha = nn.MultiheadAttention(E, H, dtype=dtype, **config)
    if config.get("bias", True):  # MHA initializes biases to 0: make them count
        with torch.no_grad():
            mha.in_proj_bias.normal_()
            mha.out_proj.bias.normal_()
    return mha, EntropyAttention.from_mha(copy.deepcopy(mha))


def _inputs(config, layout):
    """(query, key, value) for `layout` in {'seq_first', 'batch_first', 'unbatched'}; self-attention
    (one tensor) unless kdim/vdim differ (then L != S)."""
    cross = "kdim" in config
    Lq, Sk = (L, S) if cross else (L, L)
    shape = {"seq_first": lambda n: (n, N), "batch_first": lambda n: (N, n), "unbatched": lambda n: (n,)}[layout]
    x = torch.randn(*shape(Lq), E, requires_grad=True)
    if not cross:
        return x, x, x
    k = torch.randn(*shape(Sk), config["kdim"], requires_grad=True)
    v = torch.randn(*shape(Sk), config["vdim"], requires_grad=True)
    return x, k, v


def _masks(kind, Lq, Sk, batched):
    """Masks in nn.MultiheadAttention's convention with key 0 always visible (no empty rows)."""
    kw = {}
    nb = N if batched else 1
    if "attn" in kind:
        shape = (nb * H, Lq, Sk) if "3d" in kind else (Lq, Sk)
        blocked = torch.rand(shape) < 0.4
        blocked[..., 0] = False
        if "bool" in kind:
            kw["attn_mask"] = blocked
        else:
            kw["attn_mask"] = torch.randn(shape).masked_fill(blocked, float("-inf"))
    if "kpm" in kind:
        pad = torch.rand(nb, Sk) < 0.4
        pad[:, 0] = False
        pad = pad if batched else pad[0]
        kw["key_padding_mask"] = pad if "kpm_bool" in kind else torch.randn(pad.shape).masked_fill(pad, float("-inf"))
    if "causal" in kind:
        kw["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(Lq)
        kw["is_causal"] = True
    return kw


CONFIGS = {
    "default": {},
    "no_bias": {"bias": False},
    "bias_kv": {"add_bias_kv": True},
    "zero_attn": {"add_zero_attn": True},
    "bias_kv_zero_attn": {"add_bias_kv": True, "add_zero_attn": True},
    "kdim_vdim": {"kdim": 6, "vdim": 10},
}
MASKS = ["none", "attn_bool", "attn_float", "attn_3d_bool", "attn_3d_float", "kpm_bool", "kpm_float",
         "attn_bool+kpm_bool", "attn_float+kpm_float", "causal", "causal+kpm_bool"]


def _compare(config, layout, mask, need_weights, average=True):
    mha, ent = _pair({**config, "batch_first": layout == "batch_first"})
    q, k, v = _inputs(config, layout)
    Lq, Sk = (L, S) if "kdim" in config else (L, L)
    kw = _masks(mask, Lq, Sk, layout != "unbatched")
    kw.update(need_weights=need_weights, average_attn_weights=average)
    outs = []
    for layer in (mha, ent):
        # nn.MultiheadAttention's SDPA path applies the is_causal hint to the key columns that
        # add_bias_kv / add_zero_attn append (hiding them), its need_weights path does not: compare
        # with the latter, the mask's meaning
        hint_bug = layer is mha and (ent.bias_k is not None or ent.add_zero_attn) and not need_weights
        out, w = layer(q, k, v, **{**kw, "is_causal": kw.get("is_causal", False) and not hint_bug})
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(),
                                    [*{id(t): t for t in (q, k, v)}.values(), *layer.parameters()])
        outs.append((out, w, grads))
    (o1, w1, g1), (o2, w2, g2) = outs
    torch.testing.assert_close(o2, o1, atol=ATOL, rtol=1e-4)
    if need_weights:
        torch.testing.assert_close(w2, w1, atol=ATOL, rtol=1e-4)
    else:
        assert w1 is None and w2 is None
    assert len(g1) == len(g2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    assert ent.last_entropy.shape == (H,) and torch.isfinite(ent.last_entropy).all()


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("config,mask", [(c, m) for c in CONFIGS for m in MASKS
                                         if not ("causal" in m and "kdim" in CONFIGS[c])])  # causal needs L == S
def test_matches_mha(config, mask, need_weights):
    _compare(CONFIGS[config], "seq_first", mask, need_weights)


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("mask", ["none", "attn_3d_bool", "attn_float+kpm_float", "causal+kpm_bool"])
@pytest.mark.parametrize("layout", ["batch_first", "unbatched"])
def test_layouts_match_mha(layout, mask, average):
    _compare({}, layout, mask, need_weights=True, average=average)
    _compare({"kdim": 6, "vdim": 10} if "causal" not in mask else {}, layout, mask, need_weights=False)


def test_parameter_names_and_state_dict_both_ways():
    for config in CONFIGS.values():
        mha, ent = _pair(config)
        assert [n for n, _ in ent.named_parameters()] == [n for n, _ in mha.named_parameters()]
        assert type(ent.out_proj) is type(mha.out_proj)
        fresh_ent = EntropyAttention(E, H, **config)
        fresh_ent.load_state_dict(mha.state_dict())  # MHA -> EntropyAttention
        fresh_mha = nn.MultiheadAttention(E, H, **config)
        fresh_mha.load_state_dict(fresh_ent.state_dict())  # EntropyAttention -> MHA
        q, k, v = _inputs(config, "seq_first")
        torch.testing.assert_close(fresh_ent(q, k, v)[0], mha(q, k, v)[0], atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(fresh_mha(q, k, v)[0], mha(q, k, v)[0], atol=ATOL, rtol=1e-4)


def test_constructor_defaults_and_options():
    layer = EntropyAttention(E, H)
    mha = nn.MultiheadAttention(E, H)
    for attr in ("embed_dim", "num_heads", "head_dim", "dropout", "batch_first", "kdim", "vdim",
                 "_qkv_same_embed_dim", "add_zero_attn", "bias_k", "bias_v"):
        assert getattr(layer, attr) == getattr(mha, attr), attr
    assert isinstance(layer, nn.MultiheadAttention)
    assert (layer.regularizer, layer.normalize, layer.tau, layer.top_k, layer.backend) == ("shannon", False, 0.0, None, "auto")
    assert "regularizer='shannon'" in repr(layer)


def test_fully_masked_row_gives_zero_not_nan():
    mha, ent = _pair({})
    x = torch.randn(L, N, E)
    blocked = torch.zeros(L, L, dtype=torch.bool)
    blocked[2] = True  # row 2 sees no key
    out_mha = mha(x, x, x, attn_mask=blocked, need_weights=False)[0]  # SDPA: attention output 0
    out = ent(x, x, x, attn_mask=blocked, need_weights=False)[0]
    torch.testing.assert_close(out, out_mha, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(out[2], ent.out_proj.bias.expand(N, E))
    out_w, w = ent(x, x, x, attn_mask=blocked)  # nn.MultiheadAttention's weights path gives NaN here
    torch.testing.assert_close(out_w, out, atol=ATOL, rtol=1e-4)
    assert (w[:, 2] == 0).all() and torch.isfinite(ent.last_entropy).all()


BAD = [
    ("query 4-D", lambda x: dict(query=x[None], key=x[None], value=x[None]), ValueError, "2-D"),
    ("key dim", lambda x: dict(key=x[..., :8]), ValueError, "key must have 16 features"),
    ("batch", lambda x: dict(key=x[:, :2], value=x[:, :2]), ValueError, "batch size"),
    ("kv length", lambda x: dict(value=x[:3]), ValueError, "must agree"),
    ("attn_mask shape", lambda x: dict(attn_mask=torch.zeros(L, L + 1, dtype=torch.bool)), ValueError, r"\(L, S\)"),
    ("attn_mask 3d", lambda x: dict(attn_mask=torch.zeros(H, L, L, dtype=torch.bool)), ValueError, "num_heads"),
    ("attn_mask dtype", lambda x: dict(attn_mask=torch.zeros(L, L, dtype=torch.int64)), TypeError, "boolean or floating"),
    ("kpm shape", lambda x: dict(key_padding_mask=torch.zeros(L, N, dtype=torch.bool)), ValueError, "key_padding_mask"),
    ("kpm dtype", lambda x: dict(key_padding_mask=torch.zeros(N, L, dtype=torch.int32)), TypeError, "boolean or floating"),
    ("non tensor", lambda x: dict(attn_mask=[[True]]), TypeError, "attn_mask"),
]


@pytest.mark.parametrize("name,change,error,match", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_raise_like_mha(name, change, error, match):
    mha, ent = _pair({})
    x = torch.randn(L, N, E)
    kw = dict(query=x, key=x, value=x)
    kw.update(change(x))
    with pytest.raises(Exception):
        mha(**kw)
    with pytest.raises(error, match=match):
        ent(**kw)


@pytest.mark.parametrize("kwargs,match", [
    (dict(embed_dim=10, num_heads=3), "divisible"), (dict(embed_dim=0, num_heads=1), "positive"),
    (dict(regularizer="bogus"), "regularizer"), (dict(tau=-0.1), "tau"), (dict(tau=float("inf")), "tau"), (dict(top_k=0), "top_k"),
    (dict(backend="cuda"), "backend"), (dict(dropout=2.0), "dropout"), (dict(prune_mode="Fast"), "prune_mode"),
])
def test_bad_constructor_arguments(kwargs, match):
    args = {"embed_dim": E, "num_heads": H, **kwargs}
    with pytest.raises(ValueError, match=match):
        EntropyAttention(**args)


def test_is_causal_without_mask_and_errors():
    _, ent = _pair({})
    x = torch.randn(L, N, E)
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    torch.testing.assert_close(ent(x, x, x, is_causal=True, need_weights=False)[0],
                               ent(x, x, x, attn_mask=causal, need_weights=False)[0], atol=ATOL, rtol=1e-4)
    with pytest.raises(ValueError, match="L == S"):
        ent(x, x[:3], x[:3], is_causal=True)


def test_dropout_matches_mha_with_the_same_seed_and_entropy_is_undropped():
    mha, ent = _pair({"dropout": 0.5})
    x = torch.randn(L, N, E)
    torch.manual_seed(1)
    o1, w1 = mha(x, x, x)
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match="dropout"):
        o2, w2 = ent(x, x, x)
    torch.testing.assert_close(o2, o1, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(w2, w1, atol=ATOL, rtol=1e-4)
    dropped = ent.last_entropy
    ent.dropout = 0.0
    ent(x, x, x, need_weights=False)
    torch.testing.assert_close(dropped, ent.last_entropy)


def test_triton_path_matches_reference(device):
    """backend='triton': CUDA, or the CPU under TRITON_INTERPRET=1 (set by conftest without CUDA)."""
    mha, tri = _pair({})
    mha.to(device), tri.to(device)
    tri.backend = "triton"
    ref = EntropyAttention.from_mha(copy.deepcopy(mha), backend="reference")
    x = torch.randn(N, 20, E, device=device, requires_grad=True)
    xs = x.transpose(0, 1)
    pad = torch.zeros(N, 20, dtype=torch.bool, device=device)
    pad[:, 15:] = True
    mask = nn.Transformer.generate_square_subsequent_mask(20, device=device)
    grads, outs = [], []
    for layer in (mha, tri, ref):
        out = layer(xs, xs, xs, key_padding_mask=pad, attn_mask=mask, need_weights=False)[0]
        loss = out.square().mean() + (0.3 * layer.last_entropy.mean() if layer is not mha else 0)
        grads.append(torch.autograd.grad(loss, [x, *layer.parameters()]))
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tri.last_entropy, ref.last_entropy, atol=1e-4, rtol=1e-4)
    for a, b in zip(grads[1], grads[2]):  # entropy term included: fused backward vs autograd
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


@pytest.mark.gpu
def test_vit_b_16_bf16_on_gpu():
    model = torchvision.models.vit_b_16(weights=None).to("cuda", torch.bfloat16)
    swapped = replace_attention(copy.deepcopy(model))
    images = torch.randn(4, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    outs = [m(images).float() for m in (model, swapped)]
    assert (outs[1] - outs[0]).abs().max() <= 3e-2 * outs[0].abs().max()
    (outs[1].square().mean() + 0.1 * entropy_loss(swapped)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in swapped.parameters())


@pytest.mark.parametrize("config", [{}, {"add_bias_kv": True}], ids=["plain", "bias_kv"])
def test_empty_batch_like_mha(config):
    """A batch of 0 sequences: empty outputs and weights, as nn.MultiheadAttention returns."""
    mha, ent = _pair(config)
    x = torch.randn(L, 0, E)  # [L, N, E]: MHA's default layout
    for kw in (dict(need_weights=False), dict(need_weights=True)):
        out_mha, w_mha = mha(x, x, x, **kw)
        out, w = ent(x, x, x, **kw)
        assert out.shape == out_mha.shape == (L, 0, E)
        assert (w is None) == (w_mha is None) and (w is None or w.shape == w_mha.shape)


def test_deepcopy_and_pickle_after_a_training_step():
    """EMA / SWA copies (``copy.deepcopy``) and ``torch.save(model)`` work mid-training: the layers'
    records of their last forward, which hold its autograd graph, are copied detached."""
    model = replace_attention(nn.TransformerEncoder(
        nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True), 2, enable_nested_tensor=False))
    x = torch.randn(N, L, E)
    (model(x).square().mean() + 0.1 * entropy_loss(model)).backward()
    ema = torch.optim.swa_utils.AveragedModel(model)
    twin = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert model.layers[0].self_attn.last_entropy.requires_grad  # the original keeps its graph
    for copied in (ema.module, twin, loaded):
        for a, b in zip(model.modules(), copied.modules()):
            if isinstance(a, EntropyAttention):
                assert not b.last_entropy.requires_grad and b.last_regularizer is b.last_entropy
                torch.testing.assert_close(b.last_entropy, a.last_entropy.detach())
    for copied in (ema.module, twin, loaded):
        torch.testing.assert_close(copied.eval()(x), model.eval()(x))


def test_from_mha_shares_parameters_and_mode():
    mha = nn.MultiheadAttention(E, H, add_bias_kv=True, dtype=torch.float64).eval()
    ent = EntropyAttention.from_mha(mha, tau=0.1, regularizer="l2", dropout=0.0)
    assert all(a is b for a, b in zip(ent.parameters(), mha.parameters()))
    assert ent.out_proj is mha.out_proj and not ent.training and ent.in_proj_weight.dtype == torch.float64
    assert (ent.tau, ent.regularizer) == (0.1, "l2")
    assert not any(p.is_meta for p in ent.parameters())


def test_top_k_baseline():
    mha, ent = _pair({})
    x = torch.randn(L, N, E)
    dense = ent(x, x, x)[0]
    ent.top_k = L
    torch.testing.assert_close(ent(x, x, x)[0], dense)
    ent.top_k = 1
    out, w = ent(x, x, x, average_attn_weights=False)
    assert ((w > 0).sum(-1) == 1).all()  # one key per row, weight 1
    torch.testing.assert_close(w.sum(-1), torch.ones(N, H, L))
    torch.testing.assert_close(ent.last_entropy, torch.zeros(H))
    q, k, v = ent._project(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), True)
    s = torch.einsum("bihd,bjhd->bhij", q.view(N, L, H, -1), k.view(N, L, H, -1))
    assert torch.equal(w.argmax(-1), s.argmax(-1))
    # the mask helper composes with masks: a blocked key never enters the top k
    inp, _ = ent._inputs(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), True, None,
                         torch.eye(L, dtype=torch.bool), False)
    assert not _top_k_inputs(inp, 2).attn_mask.diagonal(dim1=-2, dim2=-1).any()


def test_tau_pruning_in_eval_uses_pruned_attention():
    from entropy_attn.pruned import pruned_attention

    _, ent = _pair({})
    ent.tau = 0.2
    ent.eval()
    x = torch.randn(N, 9, E)
    xs = x.transpose(0, 1)
    pad = torch.zeros(N, 9, dtype=torch.bool)
    pad[0, 6:] = True
    out = ent(xs, xs, xs, key_padding_mask=pad, need_weights=False)[0]
    inp, _ = ent._inputs(x, x, x, True, pad, None, False)
    expected = pruned_attention(inp.q, inp.k, inp.v, tau=0.2, key_padding_mask=pad)
    expected = ent.out_proj(expected.transpose(1, 2).reshape(N, 9, E)).transpose(0, 1)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-4)
    # the need_weights path prunes the same way, and its weights are the pruned ones
    out_w, w = ent(xs, xs, xs, key_padding_mask=pad, average_attn_weights=False)
    torch.testing.assert_close(out_w, out, atol=ATOL, rtol=1e-4)
    assert ((w == 0) | (w >= 0.2)).all() and (w == 0).any()
    torch.testing.assert_close(w.sum(-1), torch.ones(N, H, 9))
    ent.train()  # training is dense whatever tau
    torch.testing.assert_close(ent(xs, xs, xs, need_weights=False)[0],
                               EntropyAttention.from_mha(ent, tau=0.0)(xs, xs, xs, need_weights=False)[0])


def test_eval_pruning_has_no_gradient_and_says_so():
    """In eval with tau > 0 the pruned kernels run, which have no gradient: a backward through them
    raises (it used to leave x and the input projection silently without one). The need_weights
    path (materialized) prunes alike and is differentiable; serving under no_grad builds no graph."""
    _, ent = _pair({})
    ent.tau = 0.2
    ent.eval()
    x = torch.randn(L, N, E, requires_grad=True)
    out = ent(x, x, x, need_weights=False)[0]
    with pytest.raises(RuntimeError, match="no gradient"):
        out.sum().backward()
    out_w = ent(x, x, x)[0]
    torch.testing.assert_close(out_w, out.detach(), atol=ATOL, rtol=1e-4)
    (g,) = torch.autograd.grad(out_w.sum(), x)
    assert g.abs().max() > 0
    with torch.no_grad():
        assert not ent(x, x, x, need_weights=False)[0].requires_grad


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_eval_pruning_on_the_triton_path(mode, dtype):
    """The layer in eval with tau > 0, in half precision on the Triton path, against the same layer
    in float64 on the reference path. tau = 1e-4 prunes little, so both modes stay within the
    dtype's rounding of it (float16's fast mode once returned zeros here)."""
    _, ent = _pair({"batch_first": True, "dropout": 0.0})
    ent.tau, ent.prune_mode = 1e-4, mode
    ent.eval()
    ref = copy.deepcopy(ent).double()
    ref.backend = "reference"
    x = torch.randn(2, 40, E, dtype=torch.float64)
    expected = ref(x, x, x, need_weights=False)[0]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ent.backend = "triton"
    ent.to(dev, dtype)
    xh = x.to(dev, dtype)
    out = ent(xh, xh, xh, need_weights=False)[0]
    assert out.dtype == dtype and torch.isfinite(out).all()
    err = (out.double().cpu() - expected).norm() / expected.norm()
    assert err < (1e-2 if dtype == torch.float16 else 3e-2), err


# -- replace_attention on real models ---------------------------------------------------------

def _swap_and_compare(model, run, *, train=True, atol=ATOL):
    """Swap a deep copy of `model`; outputs (and in training, gradients) equal the original's.
    Returns the swapped model."""
    swapped = replace_attention(copy.deepcopy(model))
    assert not any(type(m) is nn.MultiheadAttention for m in swapped.modules())
    n_layers = sum(isinstance(m, EntropyAttention) for m in swapped.modules())
    assert n_layers == sum(type(m) is nn.MultiheadAttention for m in model.modules()) > 0
    model.train(train), swapped.train(train)
    outs, grads = [], []
    for m in (model, swapped):
        out = run(m)
        outs.append(out)
        if train:
            grads.append(torch.autograd.grad(out.square().sum(), list(m.parameters())))
    torch.testing.assert_close(outs[1], outs[0], atol=atol, rtol=1e-4)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=10 * atol, rtol=1e-3)
    return swapped


def _all_recorded(model):
    layers = [m for m in model.modules() if isinstance(m, EntropyAttention)]
    return all(m.last_entropy is not None and torch.isfinite(m.last_entropy).all() for m in layers)


@pytest.mark.parametrize("norm_first", [False, True])
def test_replace_attention_transformer_encoder(norm_first):
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=True, norm_first=norm_first)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=not norm_first)
    x = torch.randn(N, 8, E)
    pad = torch.zeros(N, 8, dtype=torch.bool)
    pad[1, 5:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(8)
    swapped = _swap_and_compare(model, lambda m: m(x, mask=causal, is_causal=True), train=True)
    assert _all_recorded(swapped)
    # eval + no_grad: the original takes torch's fused encoder fast path (nested tensors with a
    # padding mask); the swapped model must still run EntropyAttention (the monitor sees it)
    with torch.no_grad():
        model.eval(), swapped.eval()
        with AttentionMonitor(swapped) as mon:
            out = swapped(x, src_key_padding_mask=pad)
        ref = model(x, src_key_padding_mask=pad)
    keep = ~pad[:, :, None].expand_as(out)  # the fast path zero-fills padded positions
    torch.testing.assert_close(out[keep], ref[keep], atol=ATOL, rtol=1e-4)
    assert len(mon.summary()) == 2 and all(v["entropy"].shape == (H,) for v in mon.summary().values())


def test_replace_attention_transformer_decoder():
    layer = nn.TransformerDecoderLayer(E, H, dim_feedforward=32, dropout=0.0)
    model = nn.TransformerDecoder(layer, num_layers=2)
    tgt, memory = torch.randn(6, N, E), torch.randn(9, N, E)
    mem_pad = torch.zeros(N, 9, dtype=torch.bool)
    mem_pad[0, 7:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    swapped = _swap_and_compare(model, lambda m: m(tgt, memory, tgt_mask=causal, tgt_is_causal=True,
                                                   memory_key_padding_mask=mem_pad))
    assert sum(isinstance(m, EntropyAttention) for m in swapped.modules()) == 4 and _all_recorded(swapped)


def test_replace_attention_small_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                              num_classes=10)
    images = torch.randn(2, 3, 32, 32)
    swapped = _swap_and_compare(model, lambda m: m(images))
    assert _all_recorded(swapped)


def test_replace_attention_vit_b_16():
    model = torchvision.models.vit_b_16(weights=None, image_size=32).eval()
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        swapped = _swap_and_compare(model, lambda m: m(image), train=False, atol=1e-4)
        with AttentionMonitor(swapped) as mon:
            swapped(image)
    assert len(mon.summary()) == 12


class _ClipTextEncoder(nn.Module):
    """A CLIP-style text transformer: pre-norm residual blocks, sequence-first, causal float mask."""

    def __init__(self, vocab=50, width=E, heads=H, layers=2, context=8):
        super().__init__()
        self.token = nn.Embedding(vocab, width)
        self.position = nn.Parameter(0.02 * torch.randn(context, width))
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            ln_1=nn.LayerNorm(width), attn=nn.MultiheadAttention(width, heads), ln_2=nn.LayerNorm(width),
            mlp=nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)),
        )) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.register_buffer("attn_mask", torch.full((context, context), float("-inf")).triu_(1))

    def forward(self, text):
        x = (self.token(text) + self.position).transpose(0, 1)  # [L, N, D]
        for b in self.blocks:
            h = b["ln_1"](x)
            x = x + b["attn"](h, h, h, need_weights=False, attn_mask=self.attn_mask)[0]
            x = x + b["mlp"](b["ln_2"](x))
        x = self.ln_final(x.transpose(0, 1))
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)]


def test_replace_attention_clip_text_encoder():
    model = _ClipTextEncoder()
    text = torch.randint(0, 50, (N, 8))
    swapped = _swap_and_compare(model, lambda m: m(text))
    # causal: the first query sees one key, so entropy <= log of the mean visible keys
    layer = swapped.blocks[0]["attn"]
    assert _all_recorded(swapped) and (layer.last_entropy < torch.log(torch.tensor(4.5))).all()


def test_replace_attention_keeps_device_dtype_mode_and_is_idempotent():
    model = nn.Sequential(nn.Linear(E, E), nn.TransformerEncoderLayer(E, H, 32, dtype=torch.float64)).eval()
    params = list(model.parameters())
    assert replace_attention(model) is model
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    attn = model[1].self_attn
    assert isinstance(attn, EntropyAttention) and not attn.training and attn.in_proj_weight.dtype == torch.float64
    replace_attention(model, tau=0.1)  # already swapped: a no-op
    assert model[1].self_attn is attn and attn.tau == 0.0
    with pytest.raises(ValueError, match="no nn.MultiheadAttention"):
        replace_attention(nn.Linear(2, 2))


def test_shared_attention_stays_shared():
    mha = nn.MultiheadAttention(E, H)
    model = nn.ModuleDict(dict(a=nn.ModuleList([mha]), b=nn.ModuleList([mha])))
    replace_attention(model, regularizer="none")
    assert model["a"][0] is model["b"][0] and model["a"][0].regularizer == "none"


class _Blocks(nn.Module):
    """Two residual attention blocks, each optionally under activation checkpointing."""

    def __init__(self, regularizer):
        super().__init__()
        self.attn = nn.ModuleList(EntropyAttention(E, H, batch_first=True, regularizer=regularizer) for _ in range(2))
        self.reentrant = None  # None: no checkpointing

    def forward(self, x):
        for layer in self.attn:
            block = lambda y, layer=layer: y + layer(y, y, y, need_weights=False)[0]  # noqa: E731
            x = block(x) if self.reentrant is None else torch.utils.checkpoint.checkpoint(
                block, x, use_reentrant=self.reentrant)
        return x


@pytest.mark.parametrize("regularizer", ["shannon", "l2", "range"])
def test_activation_checkpointing(regularizer):
    """Non-reentrant checkpointing trains as without it: the same gradients of task + penalty over
    two micro-batches, the layers' records after the backward those of the last forward (the
    recomputation used to overwrite them with its own, graph and all), and a monitor counts each
    call once. The reentrant form runs the forward under no_grad, so the penalty carries no
    gradient: ``entropy_loss`` warns."""
    torch.manual_seed(0)
    plain = _Blocks(regularizer)
    xs = [torch.randn(N, L, E), 3 * torch.randn(N, L, E)]

    def train(model):
        losses = []
        with AttentionMonitor(model) as monitor:
            for x in xs:
                losses.append(model(x).square().mean() + 0.5 * entropy_loss(model))
                last = [layer.last_regularizer.detach().clone() for layer in model.attn]
            sum(losses).backward()
        assert all(torch.equal(layer.last_regularizer, r) for layer, r in zip(model.attn, last))
        return [p.grad for p in model.parameters()], monitor.summary()

    grads, summary = train(plain)
    checkpointed = copy.deepcopy(plain)
    checkpointed.zero_grad()
    checkpointed.reentrant = False
    grads_ck, summary_ck = train(checkpointed)
    for g, g_ck in zip(grads, grads_ck):
        torch.testing.assert_close(g_ck, g, rtol=1e-5, atol=1e-6)
    for name in summary:
        torch.testing.assert_close(summary_ck[name]["entropy"], summary[name]["entropy"])
    checkpointed.reentrant = True
    checkpointed(xs[0])
    with pytest.warns(UserWarning, match="use_reentrant=False"):
        entropy_loss(checkpointed)


def test_autocast_keeps_the_reference_path_in_float32():
    """Under CPU bfloat16 autocast the reference path's matmuls ran in bfloat16 again, and with them
    the softmax: entropies 0.04 nats off at 256 keys, and bfloat16 records."""
    torch.manual_seed(0)
    layer = EntropyAttention(32, 2, batch_first=True)
    x = torch.randn(2, 256, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = layer(x, x, x, need_weights=False)
        q, k, v = (t.reshape(2, 256, 2, 16).transpose(1, 2) for t in _projections(layer, x))
    assert out.dtype == torch.bfloat16 and layer.last_entropy.dtype == torch.float32
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 4.0, dim=-1)
    entropy = -(p * p.log()).sum(-1).mean(dim=(0, 2))
    torch.testing.assert_close(layer.last_entropy.double(), entropy, rtol=0, atol=1e-4)


def _projections(layer, x):
    """The layer's q, k, v projections of ``x`` (``[N, L, E]``), as its forward computes them."""
    return torch.nn.functional.linear(x, layer.in_proj_weight, layer.in_proj_bias).chunk(3, dim=-1)
