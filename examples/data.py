"""Offline data for the examples: procedural shapes with object masks, scikit-learn's digits,
CIFAR-10/100 through torchvision, and byte-level text from Python's standard library.

Everything except CIFAR is generated or read from what is installed, deterministically: the same
seed gives the same tensors on every machine (the stdlib text depends on the Python version).
"""
from __future__ import annotations

import math
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

SHAPE_CLASSES = ("circle", "square", "triangle", "cross")


@dataclass
class ImageData:
    """A classification data set split into train and validation.

    ``train`` / ``val`` yield ``(image [C, S, S] float32, label int64)``. ``val_masks`` is the
    ``[N_val, S, S]`` bool object mask aligned with ``val`` (None when the data set has none).
    """

    train: Dataset
    val: Dataset
    num_classes: int
    channels: int
    image_size: int
    val_masks: torch.Tensor | None = None


def _shape_masks(kind: np.ndarray, cx, cy, r, theta, size: int) -> np.ndarray:
    """Binary masks ``[N, size, size]`` of the shapes ``SHAPE_CLASSES[kind]`` centred at
    ``(cx, cy)`` with radius ``r`` (pixels), rotated by ``theta`` (radians)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx = xx[None] - cx[:, None, None]
    dy = yy[None] - cy[:, None, None]
    c, s = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    u, w = c * dx + s * dy, -s * dx + c * dy  # rotated coordinates
    r = r[:, None, None]
    circle = dx**2 + dy**2 <= r**2
    square = np.maximum(np.abs(u), np.abs(w)) <= 0.8 * r
    triangle = (w <= 0.7 * r) & (np.abs(u) <= (w + r) / 1.7)
    cross = ((np.abs(u) <= r / 3) & (np.abs(w) <= r)) | ((np.abs(w) <= r / 3) & (np.abs(u) <= r))
    shapes = np.stack([circle, square, triangle, cross])  # [K, N, S, S]
    return shapes[kind, np.arange(len(kind))]


def _backgrounds(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Textured backgrounds ``[n, 3, size, size]`` in [0, 1]: smooth colour noise, stripes of
    random orientation and frequency, and pixel noise."""
    coarse = torch.from_numpy(rng.uniform(0.15, 0.85, (n, 3, 4, 4)).astype(np.float32))
    smooth = torch.nn.functional.interpolate(coarse, size=size, mode="bicubic", align_corners=False)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, math.pi, n).astype(np.float32)[:, None, None]
    freq = rng.uniform(0.3, 1.2, n).astype(np.float32)[:, None, None]
    phase = rng.uniform(0, 2 * math.pi, n).astype(np.float32)[:, None, None]
    stripes = np.float32(0.12) * np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
    noise = 0.06 * rng.standard_normal((n, 3, size, size), dtype=np.float32)
    return np.clip(smooth.numpy() + stripes[:, None] + noise, 0, 1)


def make_shapes(n: int, *, seed: int = 0, size: int = 32, num_classes: int = 4):
    """Procedural shapes: one object (circle, square, triangle or cross) of random colour,
    position, size and rotation on a textured background.

    Returns ``(images [n, 3, size, size] float32 in [0, 1], labels [n] int64,
    masks [n, size, size] bool)``; the mask is the object's exact pixel set.
    """
    if not 2 <= num_classes <= len(SHAPE_CLASSES):
        raise ValueError(f"num_classes must be in 2..{len(SHAPE_CLASSES)}, got {num_classes}")
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    r = rng.uniform(0.17, 0.32, n) * size
    cx = rng.uniform(r, size - r)
    cy = rng.uniform(r, size - r)
    theta = rng.uniform(-math.pi / 6, math.pi / 6, n)
    masks = _shape_masks(labels, cx, cy, r, theta, size)
    images = _backgrounds(rng, n, size)
    # object colour: far from the background's mean colour in at least one channel
    colour = rng.uniform(0, 1, (n, 3)).astype(np.float32)
    bg_mean = images.mean(axis=(2, 3))
    flip = np.abs(colour - bg_mean).max(axis=1) < 0.4
    colour[flip] = np.where(bg_mean[flip] > 0.5, 0.0, 1.0).astype(np.float32)
    texture = 0.05 * rng.standard_normal(images.shape, dtype=np.float32)
    obj = np.clip(colour[:, :, None, None] + texture, 0, 1)
    images = np.where(masks[:, None], obj, images)
    return torch.from_numpy(images), torch.from_numpy(labels), torch.from_numpy(masks)


def _standardize(x: torch.Tensor) -> torch.Tensor:
    """Map images in [0, 1] to roughly zero mean, unit variance."""
    return (x - 0.5) / 0.25


def shapes_data(n_train: int = 8000, n_val: int = 1000, *, seed: int = 0) -> ImageData:
    """The shapes data set (32x32 RGB, 4 classes) with validation object masks."""
    x, y, m = make_shapes(n_train + n_val, seed=seed)
    x = _standardize(x)
    return ImageData(
        TensorDataset(x[:n_train], y[:n_train]),
        TensorDataset(x[n_train:], y[n_train:]),
        num_classes=len(SHAPE_CLASSES),
        channels=3,
        image_size=32,
        val_masks=m[n_train:],
    )


def digits_data(*, seed: int = 0, val_fraction: float = 0.2) -> ImageData:
    """scikit-learn's handwritten digits (1797 images, 8x8 grey, 10 classes) upsampled to 16x16,
    split train/val by a seeded permutation."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # [N, 1, 8, 8]
    x = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    n_val = int(len(y) * val_fraction)
    val, train = perm[:n_val], perm[n_val:]
    x = _standardize(x)
    return ImageData(TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val]), 10, 1, 16)


def cifar_data(name: str = "cifar10", *, root: str = "data", download: bool = False) -> ImageData:
    """CIFAR-10 or CIFAR-100 through torchvision (random crop + flip on train). Needs the files
    under ``root`` or ``download=True`` with internet access; without either (a download fails with
    an ``OSError`` such as ``URLError`` offline) a ``RuntimeError`` says so."""
    import torchvision
    import torchvision.transforms as T

    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
    norm = T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    val_tf = T.Compose([T.ToTensor(), norm])
    try:
        train = cls(root, train=True, download=download, transform=train_tf)
        val = cls(root, train=False, download=download, transform=val_tf)
    except (RuntimeError, OSError) as e:  # torchvision's "Dataset not found or corrupted"; offline download: URLError
        raise RuntimeError(f"{name} not found under {root!r}; pass --download where internet is available") from e
    return ImageData(train, val, len(train.classes), 3, 32)


def image_data(name: str, *, seed: int = 0, root: str = "data", download: bool = False,
               n_train: int | None = None) -> ImageData:
    """Dispatch on ``name`` in shapes / digits / cifar10 / cifar100. ``n_train`` sets the
    size of the generated shapes training set (ignored by the others)."""
    if name == "shapes":
        return shapes_data(n_train or 8000, seed=seed)
    if name == "digits":
        return digits_data(seed=seed)
    if name in ("cifar10", "cifar100"):
        return cifar_data(name, root=root, download=download)
    raise ValueError(f"unknown dataset {name!r}")


def text_sources() -> tuple[Path, list[Path]]:
    """``(root, files)``: the ``.py`` files of Python's standard library (no site-packages) in a
    stable pseudo-random order (by ``crc32`` of the path under ``root``, the same on every machine).
    Where the interpreter ships without library sources (some container images keep only
    bytecode), the ``.py`` files of the installed packages instead."""
    paths = sysconfig.get_paths()
    for root in (Path(paths["stdlib"]), Path(paths["purelib"])):
        skip = set() if root == Path(paths["purelib"]) else {"site-packages", "dist-packages"}
        files = [p for p in root.rglob("*.py") if not skip & set(p.parts)]
        if files:
            return root, sorted(files, key=lambda p: zlib.crc32(p.relative_to(root).as_posix().encode()))
    raise RuntimeError(f"no .py sources under {paths['stdlib']} or {paths['purelib']} to train the LM on")


def stdlib_text(max_bytes: int = 16_000_000, val_fraction: float = 0.1):
    """Byte-level text of the standard library's sources (see ``text_sources``):
    ``(train [T] uint8, val [V] uint8)``.

    Files are read in ``text_sources``'s order, skipping those that would pass ``max_bytes``, so any
    budget samples the whole library; the last ``val_fraction`` of the bytes read is the validation
    split.
    """
    root, files = text_sources()
    chunks, total = [], 0
    for path in files:
        data = path.read_bytes()
        if total + len(data) > max_bytes:
            continue
        chunks.append(data)
        total += len(data)
    text = torch.frombuffer(bytearray(b"\n".join(chunks)), dtype=torch.uint8) if chunks else torch.zeros(0, dtype=torch.uint8)
    split = int(len(text) * (1 - val_fraction))
    if split < 2 or len(text) - split < 2:
        raise ValueError(f"max_bytes={max_bytes} reads too little text under {root} for a training and a "
                         "validation split; raise it")
    return text[:split], text[split:]


def lm_batch(data: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator):
    """Random windows of ``data``: ``(x, y)``, both ``[batch_size, block_size]`` int64, y = x
    shifted by one byte."""
    ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator)
    idx = ix[:, None] + torch.arange(block_size + 1)
    chunk = data[idx].long()
    return chunk[:, :-1], chunk[:, 1:]
