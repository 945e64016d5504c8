"""Fashion-MNIST for the examples, loaded the standard way (``torchvision.datasets.FashionMNIST``).

The data is the four original idx files (``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``; 70,000 28×28 grey images, 10 classes,
MIT licence). On Debian and Ubuntu::

    apt-get install dataset-fashion-mnist        # puts them in /usr/share/datasets/fashion-mnist/

From anywhere else, put the four files in a folder and pass ``--data DIR`` (or set
``NORMFX_FASHION_MNIST=DIR``). torchvision reads decompressed files under ``ROOT/FashionMNIST/raw/``:
a folder already laid out so is used as it is; otherwise the files are decompressed once into
``~/.cache/normfx/fashion-mnist/<folder key>`` (``NORMFX_CACHE`` overrides) and read from there.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["DEFAULT_DATA", "add_data_argument", "load_fashion_mnist", "write_stand_in", "FILES", "CLASSES"]

DEFAULT_DATA = Path("/usr/share/datasets/fashion-mnist")
ENV = "NORMFX_FASHION_MNIST"
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CLASSES = 10
# the training set's pixel statistics (of x / 255)
MEAN, STD = 0.2860, 0.3530


def add_data_argument(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--data", type=Path, default=Path(os.environ.get(ENV, DEFAULT_DATA)),
                    help=f"folder with Fashion-MNIST's four idx files (default ${ENV} or {DEFAULT_DATA}; "
                         "`apt-get install dataset-fashion-mnist` puts them there)")


def _missing(data: Path) -> SystemExit:
    return SystemExit(
        f"Fashion-MNIST not found in {data}: install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu: "
        f"{DEFAULT_DATA}), or put its four idx files ({', '.join(f + '.gz' for f in FILES)}) in a folder and pass "
        f"--data DIR or set {ENV}=DIR")


def _root(data: Path) -> Path:
    """A torchvision root for ``data``: ``data`` itself when it is laid out as torchvision reads it,
    else a cache folder with the files decompressed (once)."""
    if all((data / "FashionMNIST" / "raw" / f).exists() for f in FILES):
        return data
    key = hashlib.sha1(str(data.resolve()).encode()).hexdigest()[:12]   # one cache per source folder
    cache = Path(os.environ.get("NORMFX_CACHE", Path.home() / ".cache" / "normfx")) / "fashion-mnist" / key
    raw = cache / "FashionMNIST" / "raw"
    for f in FILES:
        src = next((p for p in (data / f"{f}.gz", data / f) if p.exists()), None)
        if src is None:
            raise _missing(data)
        dst = raw / f
        if dst.exists() and dst.stat().st_mtime >= src.stat().st_mtime:
            continue
        raw.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_suffix(".part")
        with (gzip.open(src) if src.suffix == ".gz" else open(src, "rb")) as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        tmp.replace(dst)
    return cache


def load_fashion_mnist(data: Path = DEFAULT_DATA, *, train: int | None = None, test: int | None = None,
                       size: int = 28, channels: int = 1
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)``: images normalized with the training set's mean and
    std, resized to ``size`` (bilinear) and repeated to ``channels``; ``train``/``test``: the first
    that many of a fixed shuffle of each split (the same subset every run and seed)."""
    from torchvision.datasets import FashionMNIST

    root = _root(Path(data))
    out = []
    for split, n in ((True, train), (False, test)):
        ds = FashionMNIST(str(root), train=split, download=False)
        x, y = ds.data, ds.targets
        if n is not None and n < len(y):
            keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:n]
            x, y = x[keep], y[keep]
        x = (x.float().unsqueeze(1) / 255.0 - MEAN) / STD
        if size != x.shape[-1]:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        out += [x.repeat(1, channels, 1, 1) if channels > 1 else x, y.long()]
    return out[0], out[1], out[2], out[3]


def write_stand_in(folder: Path, train: int = 64, test: int = 32, seed: int = 0) -> Path:
    """Four idx files of random 28×28 images and labels in Fashion-MNIST's format (the examples'
    tests run on it: structure only, no accuracy)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % CLASSES
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(np.array([0x803, n, 28, 28], dtype=">i4").tobytes() + images.tobytes())
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(np.array([0x801, n], dtype=">i4").tobytes() + labels.tobytes())
    return folder


if __name__ == "__main__":   # python examples/_data.py [DIR]: check that the data loads
    d = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(os.environ.get(ENV, DEFAULT_DATA))
    xs = load_fashion_mnist(d)
    print(f"Fashion-MNIST from {d}: train {tuple(xs[0].shape)}, test {tuple(xs[2].shape)}")
