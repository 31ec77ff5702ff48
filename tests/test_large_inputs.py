"""Large inputs. A batch of more (batch, head) rows than a grid's second axis holds (CUDA: 65535)
runs in slices (``_launch.batch_slices``): under the interpreter the limit is lowered, and every
launch is checked against it; the ``gpu`` tests run past the real limit, and on tensors of more
than 2^31 elements, which the kernels address with 64-bit offsets.
"""
import pytest
import torch

from entropy_attn import KeySummary, entropy_attention, pruned_attention
from entropy_attn import _launch, _plan
from entropy_attn._inputs import check_inputs
from entropy_attn._launch import batch_slices
from entropy_attn.pruned import pruned_triton
from oracle import TOL, fresh_generator, rel_err
from oracle import definition as dense_definition
from test_attention import check_against_definition
from test_pruned import DEV, check_close, definition, random_qkv, run

ROWS = 8  # the lowered limit: B = 5 batch entries of H = 4 heads run as 3 slices


@pytest.fixture
def grid_rows(monkeypatch):
    """Lower ``GRID_ROWS`` to ``ROWS`` and fail any launch whose grid has more rows than
    ``GRID_ROWS`` on an axis after its first (the launches of ``_launch`` and of the pruned path's
    ``Workspace``); returns the grids launched."""
    launches = []

    def checked(launch):
        def run_checked(kernel, grid, *args, **kwargs):
            assert max(grid[1:], default=1) <= _launch.GRID_ROWS, (kernel.fn.__name__, grid)
            launches.append(grid)
            return launch(kernel, grid, *args, **kwargs)
        return run_checked

    monkeypatch.setattr(_launch, "GRID_ROWS", ROWS)
    for module in (_launch, _plan):
        monkeypatch.setattr(module, "launch", checked(module.launch))
    return launches


def test_batch_slices(monkeypatch):
    assert batch_slices(4095, 16) == (slice(None),)
    assert batch_slices(4096, 16) == (slice(0, 4095), slice(4095, 4096))
    monkeypatch.setattr(_launch, "GRID_ROWS", ROWS)
    assert batch_slices(2, 4) == (slice(None),)
    assert batch_slices(5, 4) == (slice(0, 2), slice(2, 4), slice(4, 5))
    assert batch_slices(3, 8) == (slice(0, 1), slice(1, 2), slice(2, 3))
    assert batch_slices(2, 9) == (slice(0, 1), slice(1, 2))  # more heads than rows: refused before launch


def masks(B, Nq, Nk, gen):
    """A bool attention mask that differs per batch entry and a float padding mask with padded keys."""
    attn_mask = torch.rand(B, 1, Nq, Nk, generator=gen) > 0.3
    kpm = torch.zeros(B, Nk)
    kpm[:, -3:] = float("-inf")
    kpm[1:, :2] = -1.5
    return attn_mask.to(DEV), kpm.to(DEV)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_entropy_attention_in_slices(grid_rows, causal):
    """Forward and backward (output and entropy gradients) against the float64 definition, GQA, with
    masks that differ per batch entry."""
    g = fresh_generator()
    q, k, v = (torch.randn(5, h, n, 16, generator=g).to(DEV) for h, n in ((4, 19), (2, 21), (2, 21)))
    attn_mask, kpm = masks(5, 19, 21, g)
    check_against_definition(q, k, v, causal=causal, attn_mask=attn_mask, key_padding_mask=kpm)
    assert len(grid_rows) == 3 * 3  # forward, backward preprocess and backward per slice


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("nq", [1, 40], ids=["decode", "prefill"])
def test_pruned_attention_in_slices(grid_rows, mode, nq):
    """Output and stats against the definition (exact mode) and against the same call launched as
    one batch (both modes)."""
    q, k, v = random_qkv(5, 4, 2, nq, 50, 16, seed=1)
    _, kpm = masks(5, nq, 50, fresh_generator(2))
    kw = dict(tau=0.05, key_padding_mask=kpm, return_stats=True)
    out, st = run(q, k, v, mode, **kw)
    assert grid_rows, "no launch"
    if mode == "exact":
        ref, ref_st, amb = definition(q, k, v, 0.05, key_padding_mask=kpm.cpu())
        check_close(out, ref, amb, torch.float32)
        for name in ("entry_sparsity", "pruned_mass"):  # (decoding packs a kv group's heads in one tile)
            torch.testing.assert_close(st[name].double().cpu(), ref_st[name], rtol=0, atol=2e-3)
    with pytest.MonkeyPatch.context() as undo:
        undo.setattr(_launch, "GRID_ROWS", 65535)
        whole, whole_st = run(q, k, v, mode, **kw)
    torch.testing.assert_close(out, whole)
    for name in st:
        torch.testing.assert_close(st[name], whole_st[name])


@pytest.mark.parametrize("padded", [False, True])
def test_key_summary_pools_in_slices(grid_rows, padded):
    """A ``KeySummary`` pooled in slices holds what one pooling launch gives, and a decoding call
    with it gives the call's output without it."""
    q, k, v = random_qkv(5, 4, 2, 1, 70, 16, seed=3)
    for b in range(5):  # each batch entry's query matches one key, in another key block per entry
        k[b, :, 15 * b + 3] = 3 * q[b, 0, 0]
        q[b, :, 0] = q[b, 0, 0]
    q, k, v = q.to(DEV), k.to(DEV), v.to(DEV)
    kpm = masks(5, 1, 70, fresh_generator(4))[1] if padded else None
    summary = KeySummary(k[:, :, :40], kpm if kpm is None else kpm[:, :40])
    summary.update(k, kpm)  # the blocks from key 40 on again
    with pytest.MonkeyPatch.context() as undo:
        undo.setattr(_launch, "GRID_ROWS", 65535)
        whole = KeySummary(k, kpm)
    for sliced, one in zip(summary.pooled(k, kpm, 16), whole.pooled(k, kpm, 16)):
        assert torch.equal(sliced, one)
    kw = dict(tau=0.05, key_padding_mask=kpm, mode="fast", backend="triton")
    torch.testing.assert_close(pruned_attention(q, k, v, key_summary=summary, **kw), pruned_attention(q, k, v, **kw))


def test_more_heads_than_grid_rows_are_refused(monkeypatch):
    monkeypatch.setattr(_launch, "GRID_ROWS", ROWS)
    q, k, v = random_qkv(1, 9, 9, 4, 4, 16)
    for fn in (entropy_attention, pruned_attention):
        with pytest.raises(ValueError, match="up to 8 heads"):
            fn(q.to(DEV), k.to(DEV), v.to(DEV), backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_past_the_grid_limit(dtype):
    """B x H = 4100 x 16 > 65535 (two slices) on the GPU: dense forward and backward against the
    definition, both pruned modes against one launch per slice's batch entries."""
    q, k, v = random_qkv(4100, 16, 8, 9, 12, 32, dtype=dtype, seed=5)
    check_against_definition(q.to(DEV), k.to(DEV), v.to(DEV), causal=True)
    for mode in ("exact", "fast"):
        out = run(q, k, v, mode, tau=0.05)
        ref, _, amb = definition(q, k, v, 0.05)
        if mode == "exact":
            check_close(out, ref, amb, dtype)
        parts = [run(q[b:b + 100], k[b:b + 100], v[b:b + 100], mode, tau=0.05) for b in range(0, 4100, 100)]
        torch.testing.assert_close(out, torch.cat(parts), rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_past_2_31_elements():
    """q, k, v, out and the gradients of ``[8193, 16, 256, 64]`` (2^31 + 2^18 elements each; three
    batch slices): the last batch entries, whose offsets pass 2^31, against the float64 definition
    (dense forward, entropy and backward; the exact pruned mode) and against a call on them alone
    (the fast mode, without split programs in either)."""
    B, H, N, D = 8193, 16, 256, 64
    gen = torch.Generator(device="cuda").manual_seed(torch.initial_seed())
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
               for _ in range(3))
    tail = slice(B - 2, B)
    out, ent = entropy_attention(q, k, v, causal=True)
    g_out = torch.zeros_like(out)
    g_out[tail] = torch.randn_like(out[tail])
    torch.autograd.backward(out, g_out)
    ref = [t[tail].detach().double().cpu().requires_grad_() for t in (q, k, v)]
    ref_out, ref_ent, _, _ = dense_definition(*ref, causal=True)
    ref_grads = torch.autograd.grad(ref_out, ref, g_out[tail].double().cpu())
    tol = TOL[torch.bfloat16]
    assert rel_err(out[tail], ref_out) < tol and rel_err(ent[tail], ref_ent) < tol
    for name, t, rg in zip("qkv", (q, k, v), ref_grads):
        assert rel_err(t.grad[tail], rg) < 2 * tol, f"d{name}"
    q, k, v = q.detach(), k.detach(), v.detach()
    exact = pruned_attention(q, k, v, tau=0.05, causal=True)
    ref, _, amb = definition(q[tail].cpu(), k[tail].cpu(), v[tail].cpu(), 0.05, causal=True)
    check_close(exact[tail], ref, amb, torch.bfloat16)
    fast = pruned_attention(q, k, v, tau=0.05, causal=True, mode="fast")
    alone = pruned_triton(check_inputs(q[tail], k[tail], v[tail], causal=True), 0.05, "fast", splits=1)
    torch.testing.assert_close(fast[tail], alone, rtol=0, atol=tol)
