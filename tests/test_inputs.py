"""Bad input gets a clear error naming the argument."""
import pytest
import torch

from entropy_attn import entropy_attention


DEV = "cuda" if torch.cuda.is_available() else "cpu"


def qkv(B=1, H=2, Hkv=2, N=8, D=16, dtype=torch.float32, device="cpu"):
    return tuple(torch.randn(B, h, N, D, dtype=dtype, device=device) for h in (H, Hkv, Hkv))


@pytest.mark.parametrize(
    "make,err,match",
    [
        (lambda: (torch.randn(2, 8, 16), *qkv()[1:]), ValueError, "q must have 4 dimensions"),
        (lambda: (qkv()[0], torch.randn(2, 2, 8, 16), qkv()[2]), ValueError, "batch"),
        (lambda: (qkv()[0], torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 16)), ValueError, "head dim mismatch"),
        (lambda: qkv(H=3, Hkv=2), ValueError, "multiple of k/v heads"),
        (lambda: (qkv()[0], torch.randn(1, 2, 9, 16), qkv()[2]), ValueError, "k .* and v .* must agree"),
        (lambda: (qkv()[0].half(), *qkv()[1:]), TypeError, "k has dtype"),
        (lambda: tuple(t.int() for t in qkv()), TypeError, "q must be float16"),
        (lambda: ("q", *qkv()[1:]), TypeError, "q must be a torch.Tensor"),
    ],
)
def test_bad_tensors(make, err, match):
    with pytest.raises(err, match=match):
        entropy_attention(*make())


def test_bad_masks():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="attn_mask of shape"):
        entropy_attention(q, k, v, attn_mask=torch.ones(7, 8, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask must be boolean or floating"):
        entropy_attention(q, k, v, attn_mask=torch.ones(8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        entropy_attention(q, k, v, key_padding_mask=torch.zeros(1, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="scale"):
        entropy_attention(q, k, v, scale=-1.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        entropy_attention(q, k, v, backend="cuda")
    for causal in (1, None, "yes", torch.tensor(True)):  # SDPA's is_causal takes a bool only
        with pytest.raises(TypeError, match="causal must be a bool"):
            entropy_attention(q, k, v, causal=causal)


def test_triton_backend_limits():
    q, k, v = qkv(dtype=torch.float64, device=DEV)
    with pytest.raises(TypeError, match="use backend='reference' for float64"):
        entropy_attention(q, k, v, backend="triton")
    q, k, v = qkv(D=320, device=DEV)
    with pytest.raises(ValueError, match="head dims up to 256"):
        entropy_attention(q, k, v, backend="triton")
    m = torch.randn(8, 8, requires_grad=True, device=DEV)
    with pytest.raises(ValueError, match="does not differentiate masks"):
        entropy_attention(*qkv(device=DEV), attn_mask=m, backend="triton")


def test_triton_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        entropy_attention(*qkv(), backend="triton")
