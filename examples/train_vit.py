"""Train a small ViT built from ``EntropyAttention`` with an attention regularizer, then sweep
the inference pruning threshold tau and measure accuracy against attention sparsity.

    python -m examples.train_vit --dataset shapes --reg shannon --gamma 0.05 --epochs 10 --out runs/vit
    torchrun --nproc-per-node 2 -m examples.train_vit --device cuda --amp ...   # DDP, same code

Outputs under ``--out``: ``checkpoint.pt`` (model + args), ``args.json``, ``metrics.json``
(training log, dense accuracy, the tau sweep, attention-object IoU on shapes), ``tradeoff.png``
and ``attention.png``.

Attention-object IoU (shapes data, dense attention, tau = 0): take the class token's attention
over the patches in the last block, averaged over heads; keep the m patches it weights most, with
m = round(object area / patch area) (at least 1), so the selection has the object's area at
patch resolution; IoU of those patches' pixels with the object's pixel mask, averaged over images.
Reported beside it: the same IoU for m random patches (chance) and for the m patches that the
object covers most (the best this protocol can reach).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make ``examples`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from examples.common import (add_common_args, attention_options, entropy_unit, fit, in_range, plot_tradeoff, pyplot,
                             save_checkpoint, seed_everything, setup_distributed, tau_sweep, teardown_distributed,
                             autocast, topk_keep_fraction, wrap_ddp, write_json)
from entropy_attn.range_entropy import patch_positions
from examples.data import SHAPE_CLASSES, image_data
from examples.models import ViT


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=("shapes", "digits", "cifar10", "cifar100"), default="shapes")
    p.add_argument("--n-train", type=int, default=8000, help="shapes: generated training images")
    p.add_argument("--data-root", default="data", help="cifar: where the files are (or go with --download)")
    p.add_argument("--download", action="store_true", help="cifar: download the data set")
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--stem", choices=("conv", "linear"), default="conv",
                   help="patch embedding: strided 3x3 convs (trains faster on small data) or the plain patchify")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp-ratio", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=128, help="per process")
    p.add_argument("--epochs", type=in_range(int, 1), default=10,
                   help="passes over the training set, when --steps is 0")
    p.add_argument("--steps", type=in_range(int, 0), default=0, help="optimizer steps (0: --epochs passes)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--eval-batch-size", type=int, default=500)
    p.add_argument("--iou-images", type=int, default=500, help="shapes: validation images for the IoU")
    add_common_args(p)
    return p


def train_loader(data, args: argparse.Namespace, sampler: DistributedSampler | None) -> DataLoader:
    """The shuffled training batches of ``args.batch_size``, whole batches only. Stops with a clear
    message when one batch needs more examples than a process has: the loader would yield nothing,
    and ``cycle`` would wait on it forever."""
    n = len(data.train) if sampler is None else len(sampler)
    if args.batch_size > n:
        per = "" if sampler is None else f" per process ({len(data.train)} in all)"
        raise SystemExit(f"--batch-size {args.batch_size} exceeds the {n} training examples{per}; lower it")
    return DataLoader(data.train, batch_size=args.batch_size, shuffle=sampler is None, sampler=sampler,
                      drop_last=True, num_workers=args.workers, generator=torch.Generator().manual_seed(args.seed))


def cycle(loader: DataLoader, sampler: DistributedSampler | None):
    """Endless batches, reshuffled every epoch (``sampler.set_epoch`` under DDP)."""
    epoch = 0
    while True:
        if sampler is not None:
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


@torch.no_grad()
def evaluate(model, loader: DataLoader, device: torch.device, amp: bool) -> dict:
    """``{"accuracy", "loss"}`` of ``model`` over ``loader`` (the caller sets eval mode)."""
    correct = total = loss = 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with autocast(device, amp):
            logits = model(x)
        loss += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        correct += float((logits.argmax(-1) == y).sum())
        total += len(y)
    return dict(accuracy=correct / total, loss=loss / total)


@torch.no_grad()
def class_token_maps(model: ViT, x: torch.Tensor) -> torch.Tensor:
    """Last block's class-token attention over the patches, mean over heads: ``[B, grid, grid]``."""
    model.eval()
    _, weights = model(x, return_attention=True)
    return weights[:, 0, 1:].float().reshape(len(x), model.grid, model.grid)


def patch_iou(scores: torch.Tensor, masks: torch.Tensor, generator: torch.Generator) -> dict:
    """The IoU protocol of the module docstring. ``scores`` ``[B, g, g]`` per-patch weights,
    ``masks`` ``[B, S, S]`` bool object masks. Returns mean ``iou``, ``iou_random``, ``iou_best``."""
    B, g, _ = scores.shape
    patch = masks.shape[-1] // g
    cover = F.avg_pool2d(masks[:, None].float(), patch).flatten(1)  # [B, g*g] object fraction per patch
    m = (masks.flatten(1).sum(1).float() / patch**2).round().clamp(1, g * g).long()  # [B]

    def iou_of(ranking: torch.Tensor) -> float:
        rank = ranking.argsort(dim=1, descending=True).argsort(dim=1)  # rank of each patch
        chosen = (rank < m[:, None]).float().reshape(B, 1, g, g)
        pix = F.interpolate(chosen, scale_factor=patch, mode="nearest")[:, 0].bool()
        inter = (pix & masks).flatten(1).sum(1).float()
        union = (pix | masks).flatten(1).sum(1).float()
        return float((inter / union).mean())

    return dict(iou=iou_of(scores.flatten(1)),
                iou_random=iou_of(torch.rand(B, g * g, generator=generator)),
                iou_best=iou_of(cover))


def attention_iou(model: ViT, data, n: int, device: torch.device) -> dict:
    """Attention-object IoU over the first ``n`` validation images of the shapes data."""
    x = torch.stack([data.val[i][0] for i in range(min(n, len(data.val)))]).to(device)
    scores = torch.cat([class_token_maps(model, xb) for xb in x.split(250)]).cpu()
    return patch_iou(scores, data.val_masks[: len(x)], torch.Generator().manual_seed(0))


def plot_attention(model: ViT, data, path: Path, device: torch.device, n: int = 6) -> Path | None:
    """Images (top) and the class token's last-block attention (bottom, object outline in white)."""
    plt = pyplot()
    if plt is None:
        return None
    x, y = zip(*(data.val[i] for i in range(n)))
    x = torch.stack(x)
    maps = class_token_maps(model, x.to(device)).cpu()
    fig, axes = plt.subplots(2, n, figsize=(2 * n, 4.2))
    for i in range(n):
        img = x[i].permute(1, 2, 0) * 0.25 + 0.5
        axes[0, i].imshow(img.clamp(0, 1).squeeze(-1).numpy(), cmap="gray" if img.shape[-1] == 1 else None)
        name = SHAPE_CLASSES[y[i]] if data.val_masks is not None else str(int(y[i]))
        axes[0, i].set_title(name, fontsize=9)
        axes[1, i].imshow(maps[i].numpy(), cmap="magma", extent=(0, x.shape[-1], x.shape[-1], 0))
        if data.val_masks is not None:
            axes[1, i].contour(data.val_masks[i].float().numpy(), levels=[0.5], colors="white", linewidths=0.8,
                               extent=(0, x.shape[-1], 0, x.shape[-1]), origin="upper")
        for ax in axes[:, i]:
            ax.set_axis_off()
    fig.suptitle("class-token attention, last block (mean over heads)")
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
    data = image_data(args.dataset, seed=0, root=args.data_root, download=args.download, n_train=args.n_train)
    n_tokens = 1 + (data.image_size // args.patch) ** 2
    grid = data.image_size // args.patch
    attn = attention_options(args, n_tokens, patch_positions(grid, grid, class_token=True))
    model = ViT(image_size=data.image_size, patch=args.patch, channels=data.channels, num_classes=data.num_classes,
                dim=args.dim, depth=args.depth, heads=args.heads, mlp_ratio=args.mlp_ratio, stem=args.stem, **attn).to(info.device)

    sampler = DistributedSampler(data.train, seed=args.seed, drop_last=True) if info.world_size > 1 else None
    loader = train_loader(data, args, sampler)
    steps = args.steps or args.epochs * len(loader)

    def task_loss(m, batch):
        x, y = (t.to(info.device, non_blocking=True) for t in batch)
        return F.cross_entropy(m(x).float(), y), len(y)

    train = fit(wrap_ddp(model, info), cycle(loader, sampler), task_loss, args, steps, info.device, show=info.is_main)
    teardown_distributed(info)
    if not info.is_main:
        return {}

    val_loader = DataLoader(data.val, batch_size=args.eval_batch_size)
    run_eval = lambda m: evaluate(m, val_loader, info.device, args.amp)
    keep = topk_keep_fraction(n_tokens, attn.get("top_k"), causal=False)
    sweep = tau_sweep(model, args.taus, run_eval, base_keep=keep, show=not args.no_progress)
    metrics = dict(task="vit", dataset=args.dataset, reg=args.reg, gamma=args.gamma, normalize=args.normalize,
                   seed=args.seed, primary="accuracy", params=sum(p.numel() for p in model.parameters()),
                   world_size=info.world_size, images_per_s=train["items_per_s"] * info.world_size, **train,
                   dense=next(r for r in sweep if r["tau"] == 0) if 0 in args.taus else None, sweep=sweep)
    if data.val_masks is not None:
        metrics["iou"] = attention_iou(model, data, args.iou_images, info.device)
    print_summary(metrics)
    if args.out is not None:
        save_checkpoint(args.out, model, args, step=train["steps"])
        write_json(args.out / "metrics.json", metrics)
        if not args.no_plots:
            curve = {args.reg: dict(sparsity=[r["sparsity"] for r in sweep], value=[r["accuracy"] for r in sweep])}
            plot_tradeoff(curve, args.out / "tradeoff.png", "validation accuracy", f"ViT on {args.dataset}")
            plot_attention(model, data, args.out / "attention.png", info.device)
    return metrics


def print_summary(metrics: dict) -> None:
    """Print training speed, the tau sweep table and the IoU."""
    last = metrics["history"][-1]
    print(f"trained {metrics['steps']} steps in {metrics['train_time_s']:.1f}s ({metrics['images_per_s']:.0f} img/s); "
          f"reg={metrics['reg']} gamma={metrics['gamma']} final train entropy {last['entropy']:.3f} "
          f"({entropy_unit(metrics['normalize'])})")
    print(f"{'tau':>7} {'accuracy':>9} {'sparsity':>9} {'entropy':>8}")
    for r in metrics["sweep"]:
        print(f"{r['tau']:>7g} {r['accuracy']:>9.4f} {r['sparsity']:>9.3f} {r['entropy']:>8.3f}")
    if "iou" in metrics:
        i = metrics["iou"]
        print(f"attention-object IoU {i['iou']:.3f} (random {i['iou_random']:.3f}, best possible {i['iou_best']:.3f})")


if __name__ == "__main__":
    main()
