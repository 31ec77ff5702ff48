"""Train a GPT-style byte-level language model built from causal ``EntropyAttention`` on the source
files of Python's standard library, then sweep the inference pruning threshold tau and measure
validation perplexity against attention sparsity.

    python -m examples.train_lm --reg shannon --gamma 0.01 --steps 2000 --out runs/lm
    python -m examples.train_lm --device cuda --amp --block-size 4096 --n-layer 6 --n-embd 384 ...
    torchrun --nproc-per-node 2 -m examples.train_lm --device cuda --amp ...   # DDP, same code

Outputs under ``--out``: ``checkpoint.pt`` (model + args), ``args.json``, ``metrics.json``
(training log, tokens/s, validation loss / perplexity / bits per byte, the tau sweep),
``tradeoff.png`` and ``attention.png`` (last block's attention on a validation window, dense and
pruned).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make ``examples`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from examples.common import (add_common_args, attention_options, autocast, entropy_unit, fit, in_range, plot_tradeoff,
                             pyplot, save_checkpoint, seed_everything, set_tau, setup_distributed, tau_sweep,
                             teardown_distributed, topk_keep_fraction, wrap_ddp, write_json)
from examples.data import lm_batch, stdlib_text
from examples.models import GPT


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--block-size", type=int, default=256, help="context length (up to 4096 on the GPU)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step and process")
    p.add_argument("--max-bytes", type=int, default=16_000_000, help="stdlib source bytes to read")
    p.add_argument("--eval-batches", type=int, default=16, help="validation batches (fixed windows)")
    p.add_argument("--steps", type=in_range(int, 1), default=1000, help="optimizer steps")
    add_common_args(p)
    p.set_defaults(gamma=0.01)
    return p


def check_text_fits(train_data: torch.Tensor, val_data: torch.Tensor, args: argparse.Namespace) -> None:
    """Stop with a clear message unless each split is longer than ``args.block_size + 1`` bytes,
    the least ``lm_batch`` draws a window from; otherwise a short training split fails at the first
    step and a short validation split only after all of training."""
    need = args.block_size + 1
    if min(len(train_data), len(val_data)) <= need:
        raise SystemExit(f"--max-bytes {args.max_bytes} gives {len(train_data)} training and {len(val_data)} "
                         f"validation bytes; each needs more than --block-size + 1 = {need}: raise --max-bytes "
                         "or lower --block-size")


def validation_windows(val_data: torch.Tensor, args: argparse.Namespace) -> list:
    """The fixed validation batches: ``args.eval_batches`` pairs ``(x, y)``, both
    ``[args.batch_size, args.block_size]`` int64, drawn from ``val_data`` ``[V]`` uint8 with a fixed seed."""
    gen = torch.Generator().manual_seed(1234)
    return [lm_batch(val_data, args.batch_size, args.block_size, gen) for _ in range(args.eval_batches)]


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[GPT, argparse.Namespace]:
    """The ``GPT`` of a ``checkpoint.pt`` written by ``main`` (built from the run's arguments, in
    ``eval()`` on ``device``, tau = 0) and those arguments."""
    ckpt = torch.load(path, map_location=device, weights_only=False)
    args = argparse.Namespace(**ckpt["args"])
    model = GPT(block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                **attention_options(args, args.block_size))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), args


@torch.no_grad()
def evaluate(model: GPT, windows: list, device: torch.device, amp: bool) -> dict:
    """``{"loss" (nats/byte), "ppl", "bpb"}`` over fixed validation ``windows`` of ``(x, y)``."""
    total, n = 0.0, 0
    for x, y in windows:
        x, y = x.to(device), y.to(device)
        with autocast(device, amp):
            logits = model(x)
        total += float(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum"))
        n += y.numel()
    loss = total / n
    return dict(loss=loss, ppl=math.exp(loss), bpb=loss / math.log(2))


@torch.no_grad()
def plot_attention(model: GPT, x: torch.Tensor, tau: float, path: Path, n: int = 96) -> Path | None:
    """Last block's head-averaged attention on the first ``n`` bytes of ``x`` ``[T]``: dense, and
    pruned at ``tau`` (the weights the layer applies in eval)."""
    plt = pyplot()
    if plt is None:
        return None
    model.eval()
    x = x[None, :n]
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    for ax, t in zip(axes, (0.0, tau)):
        set_tau(model, t)
        _, weights = model(x, return_attention=True)
        ax.imshow(weights[0].float().cpu().numpy() ** 0.5, cmap="magma")  # sqrt: small weights stay visible
        ax.set(title=f"tau = {t:g}", xlabel="key byte", ylabel="query byte")
    set_tau(model, 0.0)
    text = bytes(x[0].tolist()).decode("utf-8", "replace").replace("\n", "\\n")[:80]
    fig.suptitle(f"last block attention (mean over heads, sqrt scale)\n{text}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    """Train, evaluate and sweep tau. Returns the metrics dict written to ``metrics.json`` (empty
    on ranks other than 0 under torchrun)."""
    args = build_parser().parse_args(argv)
    info = setup_distributed(args.device)
    seed_everything(args.seed, args.threads)
    train_data, val_data = stdlib_text(args.max_bytes)
    check_text_fits(train_data, val_data, args)
    attn = attention_options(args, args.block_size)
    model = GPT(block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                **attn).to(info.device)

    gen = torch.Generator().manual_seed(args.seed * 1000 + info.rank)
    batches = iter(lambda: lm_batch(train_data, args.batch_size, args.block_size, gen), None)

    def task_loss(m, batch):
        x, y = (t.to(info.device, non_blocking=True) for t in batch)
        return F.cross_entropy(m(x).float().flatten(0, 1), y.flatten()), y.numel()

    train = fit(wrap_ddp(model, info), batches, task_loss, args, args.steps, info.device, show=info.is_main)
    teardown_distributed(info)
    if not info.is_main:
        return {}

    windows = validation_windows(val_data, args)
    keep = topk_keep_fraction(args.block_size, attn.get("top_k"), causal=True)
    sweep = tau_sweep(model, args.taus, lambda m: evaluate(m, windows, info.device, args.amp), base_keep=keep,
                      show=not args.no_progress)
    metrics = dict(task="lm", dataset="stdlib", reg=args.reg, gamma=args.gamma, normalize=args.normalize,
                   seed=args.seed, primary="ppl", params=sum(p.numel() for p in model.parameters()),
                   world_size=info.world_size,
                   tokens_per_s=train["items_per_s"] * info.world_size, train_bytes=len(train_data),
                   val_bytes=len(val_data), **train,
                   dense=next(r for r in sweep if r["tau"] == 0) if 0 in args.taus else None, sweep=sweep)
    print_summary(metrics)
    if args.out is not None:
        save_checkpoint(args.out, model, args, step=train["steps"])
        write_json(args.out / "metrics.json", metrics)
        if not args.no_plots:
            curve = {args.reg: dict(sparsity=[r["sparsity"] for r in sweep], value=[r["ppl"] for r in sweep])}
            plot_tradeoff(curve, args.out / "tradeoff.png", "validation perplexity (bytes)", "byte-level LM on stdlib")
            pruned_tau = max([t for t in args.taus if t > 0], default=0.01)
            plot_attention(model, windows[0][0][0].to(info.device), pruned_tau, args.out / "attention.png")
    return metrics


def print_summary(metrics: dict) -> None:
    """Print training speed and the tau sweep table."""
    last = metrics["history"][-1]
    print(f"trained {metrics['steps']} steps in {metrics['train_time_s']:.1f}s ({metrics['tokens_per_s']:.0f} tokens/s); "
          f"reg={metrics['reg']} gamma={metrics['gamma']} final train entropy {last['entropy']:.3f} "
          f"({entropy_unit(metrics['normalize'])})")
    print(f"{'tau':>7} {'val ppl':>8} {'bpb':>6} {'sparsity':>9} {'entropy':>8}")
    for r in metrics["sweep"]:
        print(f"{r['tau']:>7g} {r['ppl']:>8.3f} {r['bpb']:>6.3f} {r['sparsity']:>9.3f} {r['entropy']:>8.3f}")


if __name__ == "__main__":
    main()
