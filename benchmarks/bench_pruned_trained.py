"""Tau-pruned attention on the attention of a model trained by the examples, N = 8192: pruned (exact
and fast, tau = 0.01) vs our dense kernel vs SDPA flash vs cuDNN, side by side in one run.

A module-scoped fixture trains the byte-level GPT of ``examples/train_lm.py`` in-process (its
``main``: 4 layers, 4 heads of D = 64, width 256, context 8192, batch 4, bf16 autocast, Shannon
entropy regularizer) once with gamma = 0.01 and once with gamma = 0 (the baseline: what the
regularizer buys in tile sparsity), each for half of ``$BENCH_TRAIN_S`` seconds (default 100),
checkpoint in a pytest tmp dir (never under the script's $OUT). The run's own tau sweep (tau = 0 and
0.01, exact mode, on one validation batch of 4 x 8192 bytes) gives the validation perplexity at both
(``ppl``, ``ppl_tau``). The model is reloaded from its checkpoint and one forward on that same batch
captures every layer's q, k, v ``[4, 4, 8192, 64]`` (bf16, made contiguous). Each input is timed
causal: per layer (B = 4; a dense call of ~0.4 ms on an H100, where launch and the pruned modes'
fixed passes weigh), and all layers concatenated along the batch (``layer = all``, B = 16, ~1.5 ms
dense: the size at which the pruned modes' speed is meaningful); the stacked layers also with the
fast mode's ``fast_slack`` lowered to each of ``SLACKS`` (more tiles visited, smaller error).
Labels as in ``bench_pruned.py``: the exact mode's measured tile sparsity ``s`` and ideal speed-up
``1/(1-s)``, the fast mode's ``fast_s``, ``fast_err`` (max |fast - exact|) and ``fast_rel``
(relative Frobenius error), both modes' mean pruned mass, and the model's ``gamma``, training ``steps``, ``ppl`` and ``ppl_tau``. FLOPs: the
causal dense count of ``entropy_attn.flops.attention_flops``.

    pytest benchmarks/bench_pruned_trained.py --benchmark-enable --benchmark-json=out.json  # ~4 min, H100
    BENCH_TRAIN_S=600 pytest benchmarks/bench_pruned_trained.py ...                         # longer training
    python benchmarks/report.py out.json
"""
import os
import sys
from pathlib import Path

import pytest
import torch

from bench_pruned import dense_impls, prune_labels
from entropy_attn.flops import attention_flops
from entropy_attn.pruned import pruned_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples import train_lm  # noqa: E402
from examples.common import autocast, capture_attention_inputs  # noqa: E402
from examples.data import stdlib_text  # noqa: E402

pytestmark = pytest.mark.gpu
DEVICE = "cuda"
TAU = 0.01
GAMMAS = (0.01, 0.0)
N_LAYER, N_HEAD, N_EMBD, BLOCK = 4, 4, 256, 8192
#: train_lm's flags but the device, gamma, time limit and output dir; --steps only bounds the time-limited run
TRAIN = ["--block-size", str(BLOCK), "--batch-size", "4", "--n-layer", str(N_LAYER), "--n-head", str(N_HEAD),
         "--n-embd", str(N_EMBD), "--reg", "shannon", "--amp", "--max-bytes", "8000000", "--eval-batches", "1",
         "--taus", "0", str(TAU), "--steps", "1000000", "--no-plots", "--no-progress"]
DENSE = dense_impls(causal=True)
#: Smaller ``fast_slack`` values timed on the stacked layers (the fast mode visits more tiles).
SLACKS = (0.1, 0.01)
CASES = [(layer, impl) for layer in (*range(N_LAYER), "all") for impl in (*DENSE, "pruned_exact", "pruned_fast")]
CASES += [("all", f"pruned_fast_slack{slack}") for slack in SLACKS]
GROUP = (f"pruned attention of a trained byte-level GPT (bf16, causal, N = {BLOCK}, H = {N_HEAD}, "
         f"D = {N_EMBD // N_HEAD})")


def model_labels(metrics: dict) -> dict:
    """``gamma``, training ``steps`` and validation perplexity at tau = 0 (``ppl``) and at TAU
    (``ppl_tau``, exact mode) from ``train_lm.main``'s metrics."""
    ppl = {r["tau"]: r["ppl"] for r in metrics["sweep"]}
    return dict(gamma=metrics["gamma"], steps=metrics["steps"], ppl=round(ppl[0.0], 3), ppl_tau=round(ppl[TAU], 3))


def layer_inputs(model, x: torch.Tensor) -> dict:
    """``{layer index: (q, k, v)}`` of one forward of ``model`` on bytes ``x`` ``[B, N]`` (bf16
    autocast, as the training and the sweep ran), bf16 contiguous ``[B, H, N, D]``, plus ``"all"``:
    the layers concatenated along the batch ``[n_layer * B, H, N, D]``."""
    with autocast(x.device, True):
        inputs = capture_attention_inputs(model, x)
    assert all(inp.causal and inp.attn_mask is None and inp.key_padding_mask is None for inp in inputs)
    qkv = {i: tuple(t.to(torch.bfloat16).contiguous() for t in (inp.q, inp.k, inp.v)) for i, inp in enumerate(inputs)}
    qkv["all"] = tuple(torch.cat(ts) for ts in zip(*qkv.values()))
    return qkv


@pytest.fixture(scope="module", params=GAMMAS, ids=lambda g: f"gamma={g}")
def trained(request, tmp_path_factory):
    """``(model labels, {layer: (q, k, v)}, {layer: prune_labels})`` of a GPT trained with
    gamma = ``request.param`` for ``BENCH_TRAIN_S / len(GAMMAS)`` seconds."""
    out = tmp_path_factory.mktemp("lm")
    seconds = float(os.environ.get("BENCH_TRAIN_S", "100")) / len(GAMMAS)
    metrics = train_lm.main([*TRAIN, "--device", DEVICE, "--gamma", str(request.param), "--time-limit", str(seconds),
                             "--out", str(out)])
    model, args = train_lm.load_model(out / "checkpoint.pt", DEVICE)
    x, _ = train_lm.validation_windows(stdlib_text(args.max_bytes)[1], args)[0]
    qkv = layer_inputs(model, x.to(DEVICE))
    del model
    return model_labels(metrics), qkv, {layer: prune_labels(*t, TAU, causal=True) for layer, t in qkv.items()}


@pytest.mark.parametrize("layer,impl", CASES, ids=str)
def test_trained(measure, trained, layer, impl):
    labels, qkv, pruned = trained
    q, k, v = qkv[layer]
    b, h, n, d = q.shape
    labels = dict(group=GROUP, impl=impl, layer=layer, B=b, **labels)
    if impl in DENSE:
        def fn():
            return DENSE[impl](q, k, v)
    else:
        mode, _, slack = impl.removeprefix("pruned_").partition("_slack")
        slack = float(slack or 1.0)
        labels.update(pruned[layer] if slack == 1.0 else prune_labels(q, k, v, TAU, causal=True, slack=slack))

        def fn():
            return pruned_attention(q, k, v, tau=TAU, causal=True, mode=mode, fast_slack=slack)
    with torch.no_grad():
        measure(fn, flops=attention_flops(b, h, n, n, d, causal=True), **labels)
