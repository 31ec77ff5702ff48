"""``AttentionMonitor``: per-layer, per-head attention entropy (and pruning stats) over a run."""
from __future__ import annotations

import torch
from torch import nn

from .modules import EntropyAttention, recomputing

_STATS = ("entry_sparsity", "tile_sparsity", "pruned_mass")


class AttentionMonitor:
    """Record the attention entropy of every ``EntropyAttention`` in ``model`` while active.

    Inside ``with AttentionMonitor(model) as mon:`` each layer computes its entropy in eval mode too
    (``last_entropy``; normalized if the layer has ``normalize=True``), and, in eval with
    ``tau > 0``, ``pruned_attention``'s per-head stats (an extra dense pass per call measures the
    entropy of the unpruned attention). Values are averaged over calls, weighted by each call's
    number of valid query rows per head. Calls on the ``need_weights`` / dropout path record the
    entropy only.

    ``summary()`` -> ``{layer name: {"entropy": [H], "entry_sparsity": [H], ...}}`` (float32 CPU
    tensors; the sparsity keys only for layers that pruned); ``table()`` -> text;
    ``plot(path)`` -> a heat map per metric (needs matplotlib).
    """

    def __init__(self, model: nn.Module):
        self.layers = {name or type(model).__name__: m for name, m in model.named_modules()
                       if isinstance(m, EntropyAttention)}
        if not self.layers:
            raise ValueError("AttentionMonitor: the model has no EntropyAttention layer "
                             "(swap its attention with entropy_attn.replace_attention first)")
        self._sums: dict[str, dict[str, torch.Tensor]] = {}
        self._weights: dict[str, dict[str, torch.Tensor]] = {}
        self._handles = []

    def __enter__(self) -> "AttentionMonitor":
        if self._handles:
            raise RuntimeError("AttentionMonitor is already active; nest a new AttentionMonitor instead")
        for name, layer in self.layers.items():
            layer._monitors += 1
            self._handles.append(layer.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for layer in self.layers.values():
            layer._monitors -= 1

    def _hook(self, name: str):
        def hook(layer: EntropyAttention, args, output):
            if layer.last_entropy is None or recomputing():
                return
            # sums stay on the layer's device (no host sync per call); summary() moves them
            rows = layer._last_rows.detach()
            values = {"entropy": layer.last_entropy}
            values.update({k: v for k, v in (layer.last_prune_stats or {}).items() if k in _STATS})
            sums, weights = self._sums.setdefault(name, {}), self._weights.setdefault(name, {})
            for key, v in values.items():
                v = v.detach().float()
                sums[key] = sums.get(key, 0) + v * rows
                weights[key] = weights.get(key, 0) + rows
        hook.attention_monitor = True  # EntropyAttention.__getstate__ leaves it out of copies
        return hook

    def summary(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per layer (in the order the layers were first called; layers never called are left out),
        per metric, ``[H]``."""
        return {name: {k: (s / self._weights[name][k].clamp_min(1.0)).cpu() for k, s in sums.items()}
                for name, sums in self._sums.items()}

    def table(self) -> str:
        """One line per layer and metric: mean, min and max over heads."""
        lines = [f"{'layer':<40} {'metric':<16} {'mean':>8} {'min':>8} {'max':>8}"]
        for name, metrics in self.summary().items():
            for key, v in metrics.items():
                lines.append(f"{name:<40} {key:<16} {v.mean():8.4f} {v.min():8.4f} {v.max():8.4f}")
        return "\n".join(lines)

    def plot(self, path) -> None:
        """Save heat maps (layers x heads) of each recorded metric to ``path`` (any format
        matplotlib writes). Raises ImportError if matplotlib is missing."""
        try:
            from matplotlib.figure import Figure
        except ImportError as err:
            raise ImportError("AttentionMonitor.plot needs matplotlib: pip install 'entropy-attn[plot]'") from err
        summary = self.summary()
        if not summary:
            raise RuntimeError("AttentionMonitor.plot: nothing recorded; run the model inside the monitor first")
        metrics = [k for k in ("entropy", *_STATS) if any(k in m for m in summary.values())]
        names = list(summary)
        fig = Figure(figsize=(4 + 4 * len(metrics), 1 + 0.35 * len(names)), layout="constrained")
        for ax, key in zip(fig.subplots(1, len(metrics), squeeze=False)[0], metrics):
            grid = torch.stack([summary[n].get(key, torch.full_like(summary[n]["entropy"], float("nan")))
                                for n in names])
            im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis")
            ax.set(title=key, xlabel="head", yticks=range(len(names)), yticklabels=names)
            fig.colorbar(im, ax=ax)
        fig.savefig(path)
