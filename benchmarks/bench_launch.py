"""Host overhead: every call below with Triton's plain launch path and with the direct one
(``entropy_attn._fastlaunch``), side by side in one run, each call synchronized as in
``bench_pruned.py``; the paths of a call run back to back (the GPU's speed drifts by several
percent over a run). Where the kernels are short the host's launches decide the time. The
host-bound calls also run through their ``torch.library`` ops (direct launches plus the ops'
dispatch, the path compiled code takes), and the pruned ones compiled with
``torch.compile(mode="reduce-overhead")``,
which replays them from a CUDA graph (inputs copied into its static buffers on each call, as
PyTorch does).

    pytest benchmarks/bench_launch.py --benchmark-enable --benchmark-json=out.json   # ~1 min, H100
"""
import pytest
import torch

from entropy_attn import _fastlaunch, entropy_attention
from entropy_attn.pruned import pruned_attention

from bench_pruned import stripes

pytestmark = pytest.mark.gpu


def _calls():
    """name -> (make inputs, call on them)."""
    def prefill(d, s):
        return lambda: stripes(1, 2048 // d, 2048 // d, 8192, 8192, d, s)

    def decode():
        return lambda: stripes(4, 32, 8, 1, 32768, 128, 0.9, seed=1)

    def train_step(x):
        q, k, v = x
        out, ent = entropy_attention(q, k, v)
        (out.float().sum() + ent.sum()).backward()

    def small_qkv():  # a ViT-S/16 layer on CIFAR-sized images: 65 tokens, batch 64
        return [torch.randn(64, 6, 65, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]

    return {
        "pruned fast, 8k D128 s0.95": (prefill(128, 0.95), lambda x: pruned_attention(*x[:3], tau=x[3], mode="fast")),
        "pruned exact, 8k D128 s0.95": (prefill(128, 0.95), lambda x: pruned_attention(*x[:3], tau=x[3], mode="exact")),
        "pruned fast, 8k D64 s0.8": (prefill(64, 0.8), lambda x: pruned_attention(*x[:3], tau=x[3], mode="fast")),
        "dense forward, 8k D128": (prefill(128, 0.95), lambda x: entropy_attention(*x[:3], return_entropy=False)),
        "pruned exact decoding, 1 x 32k": (decode(), lambda x: pruned_attention(*x[:3], tau=x[3], mode="exact")),
        "training step (fwd + bwd), B64 H6 N65 D64": (small_qkv, train_step),
    }


def _through_op(mode):
    """The pruned call through its ``torch.library`` op, as compiled code runs it (an eager
    ``pruned_attention`` launches the kernels without the op's dispatch)."""
    def call(x):
        q, k, v, tau = x
        return torch.ops.entropy_attn.pruned_fwd(q, k, v, None, None, False, q.shape[-1] ** -0.5, tau, mode, 1.0, False)
    return call


def _train_step_through_op(x):
    """The training step through the ``attention_fwd`` op and its registered autograd (the
    ``attention_bwd`` op), as compiled code runs it (eager calls take ``AttentionFunction``)."""
    q, k, v = x
    out, _, ent = torch.ops.entropy_attn.attention_fwd(q, k, v, None, None, False, q.shape[-1] ** -0.5, True)
    (out.float().sum() + ent.sum()).backward()


CALLS = _calls()
#: The host-bound calls are also timed through their ops (direct launches inside); the pruned ones
#: also compiled (reduce-overhead).
OP_CALLS = {"pruned fast, 8k D128 s0.95": _through_op("fast"), "pruned exact decoding, 1 x 32k": _through_op("exact"),
            "training step (fwd + bwd), B64 H6 N65 D64": _train_step_through_op}
COMPILED = ("pruned fast, 8k D128 s0.95", "pruned exact decoding, 1 x 32k")
#: (call, path): the paths of a call one after the other.
CASES = [(name, path) for name in CALLS for path in ("plain", "direct", "op", "compiled")
         if path in ("plain", "direct") or name in (OP_CALLS if path == "op" else COMPILED)]


@pytest.mark.parametrize(("name", "path"), CASES)
def test_launch_path(measure, monkeypatch, name, path):
    monkeypatch.setattr(_fastlaunch, "_ENABLED", path != "plain")
    if path != "plain" and not _fastlaunch.direct_enabled():
        pytest.fail("the direct launch path is off in this environment")
    make, call = CALLS[name]
    if path == "op":
        call = OP_CALLS[name]
    x = make()
    if path == "compiled":
        torch._dynamo.reset()
        call = torch.compile(call, mode="reduce-overhead", fullgraph=True)
    grad = name.startswith("training")
    with torch.set_grad_enabled(grad):
        measure(lambda: call(x), rounds=50, warmup=5, group="launch path (host overhead)", call=name, path=path)
