"""What the example training scripts share: command-line flags, regularizer wiring, the training
loop (loss = task + gamma * entropy_loss), torchrun/DDP setup, checkpoints, the tau sweep and the
trade-off plot."""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn

from entropy_attn import AttentionMonitor, EntropyAttention, entropy_loss
from entropy_attn._inputs import AttentionInputs
from entropy_attn.functional import BACKENDS

try:  # optional: progress bars
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - depends on the environment
    tqdm = None

REGULARIZERS = ("none", "l2", "topk", "shannon", "range")
#: Sign of each kind's penalty in the loss. ``l2`` (sum_j P_ij^2) is large for concentrated rows, so
#: the L2 baseline *rewards* it (loss = task - gamma * sum P^2, i.e. penalizes 1 - sum P^2, the
#: Tsallis-2 entropy); adding it would push attention towards uniform.
REG_SIGN = {"l2": -1.0}
DEFAULT_TAUS = (0.0, 0.001, 0.003, 0.01, 0.03, 0.1)


# ---------------------------------------------------------------------------- flags


def in_range(kind: type, low: float, high: float = math.inf, *, low_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: ``kind(text)``, refused with argparse's usage error unless finite and
    in ``[low, high]`` (``(low, high]`` with ``low_open``). A bad value stops the script at parse
    time instead of running with a silently clamped or meaningless setting."""
    bound = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high < math.inf else "")

    def parse(text: str):
        value = kind(text)  # a ValueError becomes argparse's "invalid <kind> value"
        if not (math.isfinite(value) and (low < value if low_open else low <= value) and value <= high):
            raise argparse.ArgumentTypeError(f"{text!r}: must be finite and {bound}")
        return value
    parse.__name__ = kind.__name__
    return parse


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by ``train_vit.py`` and ``train_lm.py``."""
    p.add_argument("--reg", choices=REGULARIZERS, default="shannon",
                   help="attention regularizer: none; l2 (rewards the sum of squared weights: loss = task - "
                        "gamma * sum P^2); topk (hard top-k attention, no penalty); shannon (row entropy); "
                        "range (range-partition entropy)")
    p.add_argument("--gamma", type=float, default=0.05, help="regularizer weight: loss = task + gamma * reg")
    p.add_argument("--normalize", action="store_true",
                   help="regularize entropy / log(n) (range: / log of its cells) instead of nats")
    p.add_argument("--topk-keep", type=in_range(float, 0, 1, low_open=True), default=0.2,
                   help="--reg topk: fraction in (0, 1] of the keys each query keeps "
                        "(top_k = round(fraction * tokens), at least 1)")
    p.add_argument("--taus", type=in_range(float, 0), nargs="+", default=list(DEFAULT_TAUS),
                   help="inference thresholds to sweep (finite, >= 0)")
    p.add_argument("--prune-mode", choices=("exact", "fast"), default="exact", help="tau-pruning kernel mode")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="attention backend")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (GPU only)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0: torch's default); 1 is fastest for the tiny configs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--time-limit", type=float, default=0.0, help="stop training after this many seconds (0: none)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--out", type=Path, default=None, help="directory for the checkpoint, metrics and plots")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def check_range_supported() -> None:
    """Fail clearly when the installed entropy_attn has no range-partition regularizer."""
    try:
        # fork_rng: the throwaway layer's initialization must not draw from the global RNG, or at one
        # seed range models would start from other weights than the other regularizers' (study.py pairs
        # its runs by seed). It is built on the CPU, so only the CPU generator needs forking.
        with torch.random.fork_rng(devices=[]):
            EntropyAttention(8, 2, regularizer="range")
    except (ValueError, TypeError, NotImplementedError, KeyError) as e:
        raise SystemExit(f"--reg range needs entropy_attn's range-partition regularizer "
                         f"(regularizer='range'), which this installation does not support: {e}") from e


def attention_options(args: argparse.Namespace, n_tokens: int, key_positions: torch.Tensor | None = None) -> dict:
    """``EntropyAttention`` keyword options for ``args.reg``; ``n_tokens`` (keys per row) sizes
    top-k's ``top_k = round(topk_keep * n_tokens)``; ``key_positions`` (``[n_tokens, c]``, NaN rows
    for keys without a position) are the range regularizer's key coordinates (default: 1-D
    sequence positions)."""
    kind = {"topk": "none"}.get(args.reg, args.reg)
    if kind == "range":
        check_range_supported()
    opts = dict(regularizer=kind, normalize=args.normalize, prune_mode=args.prune_mode, backend=args.backend)
    if args.reg == "topk":
        opts["top_k"] = max(1, round(args.topk_keep * n_tokens))
    if kind == "range" and key_positions is not None:
        opts["key_positions"] = key_positions
    return opts


# ---------------------------------------------------------------------------- devices, DDP, seeds


@dataclass
class DistInfo:
    """Process placement: ``world_size > 1`` under torchrun."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> DistInfo:
    """Initialise torch.distributed when launched by torchrun (``WORLD_SIZE`` > 1): NCCL on CUDA
    with one GPU per ``LOCAL_RANK``, gloo on the CPU. Otherwise a single process on ``device``."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo(0, 1, torch.device(device))
    local = int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        torch.cuda.set_device(local)
    torch_dist.init_process_group("nccl" if device == "cuda" else "gloo")
    dev = torch.device("cuda", local) if device == "cuda" else torch.device("cpu")
    return DistInfo(torch_dist.get_rank(), world, dev)


def teardown_distributed(info: DistInfo) -> None:
    """Wait for every rank, then leave the process group (no-op for one process)."""
    if info.world_size > 1:
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """``DistributedDataParallel(model)`` under torchrun, else ``model`` itself."""
    if info.world_size == 1:
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def seed_everything(seed: int, threads: int = 0) -> None:
    """Seed Python, NumPy and torch; set torch's CPU thread count when ``threads`` > 0."""
    if threads > 0:
        torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(device: torch.device, amp: bool):
    """bfloat16 autocast on CUDA when ``amp``; a no-op context otherwise."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def progress(iterable, *, enabled: bool = True, **kwargs):
    """``tqdm(iterable)`` when tqdm is installed and ``enabled``, else the iterable itself."""
    return tqdm(iterable, **kwargs) if (tqdm is not None and enabled) else iterable


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------- training


def attention_layers(model: nn.Module) -> list[EntropyAttention]:
    return [m for m in model.modules() if isinstance(m, EntropyAttention)]


def mean_train_entropy(model: nn.Module) -> float:
    """Mean over layers and heads of ``layer.last_entropy`` from the last training forward (nats, or
    see ``entropy_unit``)."""
    return float(torch.stack([m.last_entropy.detach().float().mean() for m in attention_layers(model)]).mean())


def lr_scale(step: int, steps: int, warmup: int, time_frac: float = 0.0) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to 10% over the
    remaining steps or the elapsed fraction ``time_frac`` of a time limit, whichever is further."""
    if step < warmup:
        return (step + 1) / warmup
    t = max((step - warmup) / max(1, steps - warmup), time_frac)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _time_is_up(start: float, limit: float, device: torch.device) -> bool:
    """Whether ``limit`` seconds have passed since ``start`` (0: never); under torchrun rank 0
    decides for every rank, so all ranks stop after the same step."""
    if not limit:
        return False
    up = time.perf_counter() - start > limit
    if not torch_dist.is_initialized():
        return up  # no device tensor, so no wait for the GPU on every step
    flag = torch.tensor(float(up), device=device)
    torch_dist.broadcast(flag, src=0)
    return bool(flag)


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether AdamW's weight decay applies to parameter ``name``: to weight matrices only, not to
    biases and norms (1-D), position embeddings, or the range regularizer's ``anchors`` (cell
    centres: coordinates, which decay would pull towards 0 whatever the loss)."""
    return param.ndim >= 2 and "pos" not in name and not name.endswith("anchors")


def fit(model: nn.Module, batches: Iterator, task_loss: Callable, args: argparse.Namespace, steps: int,
        device: torch.device, show: bool = True) -> dict:
    """Train ``model`` (plain or DDP-wrapped) for ``steps`` AdamW steps on
    ``loss = task_loss(model, batch) + args.gamma * entropy_loss(model)`` (sign per ``REG_SIGN``).

    ``task_loss(model, batch)`` returns ``(loss scalar, items in the batch)``; items (images or
    tokens) give the throughput. With ``args.time_limit`` (seconds) training stops when it is
    reached and the LR schedule runs on the elapsed time too, so a time-limited run still anneals. Returns
    ``{"history": [{step, loss, reg, entropy, lr, time_s}], "steps", "train_time_s", "items_per_s"}``.
    """
    params = list(model.named_parameters())
    decay = [p for n, p in params if decays(n, p)]
    no_decay = [p for n, p in params if not decays(n, p)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, min(100, steps // 10))
    model.train()
    history, items, done = [], 0, 0
    bar = progress(range(steps), enabled=show and not args.no_progress, desc="train", leave=False)
    synchronize(device)
    start = time.perf_counter()
    for step in bar:
        elapsed = time.perf_counter() - start
        lr = args.lr * lr_scale(step, steps, warmup, elapsed / args.time_limit if args.time_limit else 0.0)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = next(batches)
        with autocast(device, args.amp):
            loss, n = task_loss(model, batch)
            reg = entropy_loss(model)
            total = loss + REG_SIGN.get(args.reg, 1.0) * args.gamma * reg
        opt.zero_grad(set_to_none=True)
        total.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        items, done = items + n, step + 1
        last = done == steps or _time_is_up(start, args.time_limit, device)
        if step % args.log_every == 0 or last:
            rec = dict(step=done, loss=loss.item(), reg=reg.item(), entropy=mean_train_entropy(model),
                       lr=lr, time_s=time.perf_counter() - start)
            history.append(rec)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{rec['loss']:.3f}", H=f"{rec['entropy']:.3f}")
        if last:
            break
    synchronize(device)
    elapsed = time.perf_counter() - start
    return dict(history=history, steps=done, train_time_s=elapsed, items_per_s=items / max(elapsed, 1e-9))


# ---------------------------------------------------------------------------- evaluation


def entropy_unit(normalize: bool) -> str:
    """The unit of the entropies the layers record (``last_entropy``, the monitor's): nats, or
    entropy / log n when built with ``normalize=True``; for labelling printed values."""
    return "entropy / log n" if normalize else "nats"


def set_tau(model: nn.Module, tau: float) -> None:
    """Set the inference pruning threshold of every ``EntropyAttention`` layer."""
    for m in attention_layers(model):
        m.tau = tau


def topk_keep_fraction(n_keys: int, top_k: int | None, causal: bool) -> float:
    """Fraction of the (causally) visible attention entries that top-k attention keeps: 1 without
    top-k; ``sum_i min(k, n_i) / sum_i n_i`` with ``n_i = i + 1`` keys per row when causal."""
    if top_k is None:
        return 1.0
    n = torch.arange(1, n_keys + 1, dtype=torch.float64) if causal else torch.full((1,), float(n_keys))
    return float(n.clamp(max=top_k).sum() / n.sum())


def tau_sweep(model: nn.Module, taus, evaluate: Callable[[nn.Module], dict], base_keep: float = 1.0,
              show: bool = True) -> list[dict]:
    """Evaluate ``model`` in eval mode at each tau, under an ``AttentionMonitor``.

    ``evaluate(model)`` returns a dict of metrics (accuracy, loss...). Each result adds ``tau``,
    ``entry_sparsity`` (the monitor's pruned / unmasked entries, mean over layers and heads),
    ``sparsity`` (pruned entries over all visible ones: ``1 - base_keep * (1 - entry_sparsity)``,
    where ``base_keep`` is the fraction a top-k model keeps before pruning, see
    ``topk_keep_fraction``) and ``entropy`` (mean row entropy as the layers record it: nats, or
    normalized for ``normalize=True``). The layers' tau is restored to 0 afterwards.
    """
    model.eval()
    results = []
    for tau in progress(taus, enabled=show, desc="tau sweep", leave=False):
        set_tau(model, tau)
        with AttentionMonitor(model) as monitor:
            metrics = evaluate(model)
        stats = monitor_means(monitor)
        results.append(dict(tau=tau, **metrics, **stats, sparsity=1 - base_keep * (1 - stats["entry_sparsity"])))
    set_tau(model, 0.0)
    return results


def monitor_means(monitor: AttentionMonitor) -> dict:
    """``{"entropy", "entry_sparsity"}``: means over layers and heads of the monitor's summary."""
    summary = monitor.summary()
    out = {}
    for key in ("entropy", "entry_sparsity"):
        vals = [float(torch.as_tensor(layer[key]).float().mean()) for layer in summary.values() if key in layer]
        out[key] = sum(vals) / len(vals) if vals else 0.0
    return out


@torch.no_grad()
def capture_attention_inputs(model: nn.Module, *inputs, **kwargs) -> list[AttentionInputs]:
    """Run ``model(*inputs, **kwargs)`` once and return the ``AttentionInputs`` each
    ``EntropyAttention`` layer built in that forward (``layer._inputs``: q ``[B, H, L, D]``, k and v
    ``[B, H, S, D]`` after the in-projection, in the dtype the forward computed them, plus
    ``causal``, ``scale`` and the masks in ``entropy_attention``'s conventions), in the order the
    layers first ran (a layer called twice keeps its last call; one never called is left out)."""
    captured: dict[EntropyAttention, AttentionInputs] = {}

    def recording(layer: EntropyAttention):
        build = layer._inputs

        def _inputs(*args, **kw):
            inp, n_extra = build(*args, **kw)
            captured[layer] = inp
            return inp, n_extra
        return _inputs

    layers = attention_layers(model)
    for layer in layers:
        layer._inputs = recording(layer)  # an instance attribute shadows the method
    try:
        model(*inputs, **kwargs)
    finally:
        for layer in layers:
            del layer._inputs
    return list(captured.values())


# ---------------------------------------------------------------------------- outputs


def save_checkpoint(out: Path, model: nn.Module, args: argparse.Namespace, **extra) -> Path:
    """Write ``out/checkpoint.pt`` (``{"model": state_dict, "args": dict, **extra}``) and
    ``out/args.json``; returns the checkpoint path."""
    out.mkdir(parents=True, exist_ok=True)
    arg_dict = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    path = out / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "args": arg_dict, **extra}, path)
    write_json(out / "args.json", arg_dict)
    return path


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str))


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None (with a note) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping plots")
        return None
    return plt


def plot_tradeoff(curves: dict, path: Path, ylabel: str, title: str = "") -> Path | None:
    """One figure of metric-vs-sparsity curves.

    ``curves``: label -> ``{"sparsity": [...], "value": [...], "err": [...] or None}`` (the same
    length; ``err`` draws error bars, e.g. the std over seeds). Returns the path, or None without
    matplotlib.
    """
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, c in curves.items():
        ax.errorbar(c["sparsity"], c["value"], yerr=c.get("err"), marker="o", ms=4, capsize=2, label=label)
    ax.set_xlabel("attention entry sparsity (pruned / unmasked)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
