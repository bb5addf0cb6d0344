"""Datasets: built-in ones by name, a user's tensors or torch Datasets; splits and fingerprints."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import logging
import os
import urllib.request
from pathlib import Path

import numpy as np
import torch

from .errors import DistdmError
from .store import digest

log = logging.getLogger(__name__)

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# MD5 sums published with the dataset, checked on download only: Debian's package recompresses the
# same images, so its .gz files differ byte-wise from the official ones.
FASHION_MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}


@dataclasses.dataclass(frozen=True)
class TensorData:
    """A classification (or regression) dataset held as tensors: train and test splits."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int  # 0 for regression
    name: str = "custom"

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input (without the batch dimension)."""
        return tuple(self.x_train.shape[1:])

    @property
    def n_train(self) -> int:
        """Number of training samples."""
        return int(self.x_train.shape[0])

    @property
    def is_regression(self) -> bool:
        """True when targets are real values (num_classes == 0)."""
        return self.num_classes == 0

    @property
    def has_test(self) -> bool:
        """Whether the data has a test split (from_tensors without test= or test_fraction= has none)."""
        return int(self.y_test.shape[0]) > 0

    def require_test(self, what: str = "this") -> None:
        """Raise a DistdmError saying how to add a test set, if the data has none."""
        if not self.has_test:
            raise DistdmError(
                f"this data has no test set, which {what} needs: pass test=(x_test, y_test) or "
                f"test_fraction= to from_tensors (or save x_test and y_test in the data file)"
            )

    def fingerprint(self) -> str:
        """SHA-256 over shapes, dtypes and bytes of all four tensors: identifies the data of a run."""
        return digest(self.x_train, self.y_train, self.x_test, self.y_test)


def _check_xy(x: torch.Tensor, y: torch.Tensor, num_classes: int, split: str) -> None:
    if x.ndim < 2:
        raise DistdmError(f"{split} inputs must have shape (n, ...features), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise DistdmError(f"{split} set is empty: give at least one sample per class")
    if y.ndim == 0 or y.shape[0] != x.shape[0]:
        raise DistdmError(
            f"{split}: {x.shape[0]} inputs but labels of shape {tuple(y.shape)}; they must match"
        )
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).reshape(x.shape[0], -1).any(1).sum())
        raise DistdmError(f"{split} inputs contain NaN or inf in {bad} samples: clean or drop them")
    if num_classes > 0:
        if y.dtype.is_floating_point or y.dtype == torch.bool or y.ndim != 1:
            raise DistdmError(
                f"{split} labels must be a 1-D integer tensor of class ids, got dtype {y.dtype} "
                f"and shape {tuple(y.shape)}"
            )
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            raise DistdmError(
                f"{split} labels must lie in 0..{num_classes - 1}, found values from {lo} to {hi}"
            )
    elif not torch.isfinite(y.float()).all():
        raise DistdmError(f"{split} regression targets contain NaN or inf")


def _tensor(v: object, what: str) -> torch.Tensor:
    """A tensor from a tensor or array-like of numbers, or a DistdmError saying what is wrong."""
    if torch.is_tensor(v):
        t = v
    else:
        try:
            a = np.asarray(v)
        except ValueError as e:  # ragged nested lists
            raise DistdmError(f"{what} must be an array of one shape ({e})") from e
        if a.dtype.kind not in "biufc":
            raise DistdmError(f"{what} must be numbers, got an array of dtype {a.dtype}")
        t = torch.as_tensor(a)
    if t.is_complex():
        raise DistdmError(f"{what} must be real numbers, got dtype {t.dtype}")
    return t


def check_queries(x: object, y: object, data: TensorData) -> tuple[torch.Tensor, torch.Tensor]:
    """Query inputs and targets as tensors, checked against the training data (shape, labels, NaN)."""
    xq = _tensor(x, "query inputs").float()
    yq = _tensor(y, "query labels")
    if xq.shape[1:] != data.x_train.shape[1:]:
        raise DistdmError(
            f"queries have shape {tuple(xq.shape[1:])}, the training inputs {tuple(data.x_train.shape[1:])}"
        )
    _check_xy(xq, yq, data.num_classes, "query")
    return xq, (yq.float() if data.is_regression else yq.long())


def from_tensors(
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    *,
    test: tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray] | None = None,
    test_fraction: float | None = None,
    num_classes: int | None = None,
    regression: bool = False,
    standardize: bool = False,
    seed: int = 0,
    name: str = "custom",
) -> TensorData:
    """Wrap a user's inputs and labels as a dataset, validating them. The test split is `test`, or a
    stratified `test_fraction` of the samples (seed `seed`) if given; with neither, every sample is
    training data and the dataset has no test set."""
    x_t = _tensor(x, "train inputs").float()
    y_t = _tensor(y, "train labels")
    if regression:
        y_t = y_t.float()
        num_classes = 0
    elif num_classes is None:
        if y_t.dtype.is_floating_point:
            raise DistdmError("labels are floats: pass integer class ids, or regression=True")
        num_classes = int(y_t.max()) + 1 if y_t.numel() else 0
        if num_classes > max(2, y_t.numel()):
            raise DistdmError(
                f"labels go up to {num_classes - 1} but there are only {y_t.numel()} samples: "
                f"number the classes 0..L-1 (e.g. np.unique(y, return_inverse=True)) or pass num_classes"
            )
    elif not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool) or num_classes < 1:
        raise DistdmError(
            f"num_classes must be an integer >= 1 (or pass regression=True), got {num_classes!r}"
        )
    if test is not None and test_fraction is not None:
        raise DistdmError("pass test=(x, y) or test_fraction=, not both")
    if test_fraction is not None:
        if (
            isinstance(test_fraction, bool)
            or not isinstance(test_fraction, (int, float, np.floating))
            or not 0 < test_fraction < 1
        ):
            raise DistdmError(f"test_fraction must be in (0, 1), got {test_fraction}")
        _check_xy(x_t, y_t, num_classes, "train")
        tr, te = _split(y_t, float(test_fraction), seed, stratify=not regression)
        x_tr, y_tr, x_te, y_te = x_t[tr], y_t[tr], x_t[te], y_t[te]
    elif test is None:
        # no test set unless asked for: moving samples out of training silently changes the model
        x_tr, y_tr, x_te, y_te = x_t, y_t, x_t[:0], y_t[:0]
    else:
        x_tr, y_tr = x_t, y_t
        if not isinstance(test, (tuple, list)) or len(test) != 2:
            raise DistdmError("test must be a pair (test inputs, test labels)")
        x_te = _tensor(test[0], "test inputs").float()
        y_te = _tensor(test[1], "test labels")
        y_te = y_te.float() if regression else y_te
    _check_xy(x_tr, y_tr, num_classes, "train")
    if test is not None or test_fraction is not None:
        _check_xy(x_te, y_te, num_classes, "test")
    if x_te.shape[1:] != x_tr.shape[1:]:
        raise DistdmError(f"test inputs have shape {tuple(x_te.shape[1:])}, train {tuple(x_tr.shape[1:])}")
    if not regression:
        y_tr, y_te = y_tr.long(), y_te.long()
    if standardize:
        mean, std = x_tr.mean(0), x_tr.std(0)
        std = torch.where(std > 1e-8, std, torch.ones_like(std))
        x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    return TensorData(x_tr, y_tr, x_te, y_te, int(num_classes), name)


def from_dataset(
    train: torch.utils.data.Dataset,
    test: torch.utils.data.Dataset | None = None,
    **kwargs: object,
) -> TensorData:
    """Materialise a map-style torch Dataset of (input, label) pairs as a TensorData."""

    def stack(ds: torch.utils.data.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            n = len(ds)  # type: ignore[arg-type]
        except TypeError as e:
            raise DistdmError("the Dataset must define __len__ (a map-style Dataset)") from e
        if n == 0:
            raise DistdmError("the Dataset is empty")
        xs, ys = zip(*(ds[i] for i in range(n)), strict=True)
        return torch.stack([torch.as_tensor(v) for v in xs]), torch.as_tensor(np.asarray(ys))

    x, y = stack(train)
    return from_tensors(x, y, test=stack(test) if test is not None else None, **kwargs)  # type: ignore[arg-type]


def _split(y: torch.Tensor, fraction: float, seed: int, stratify: bool) -> tuple[np.ndarray, ...]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    strat = y.numpy() if stratify else None
    try:
        tr, te = train_test_split(idx, test_size=fraction, random_state=seed, stratify=strat)
    except ValueError as e:  # too few samples (per class) for the split
        raise DistdmError(
            f"cannot split {len(y)} samples into train and test with test_fraction={fraction} ({e}): "
            f"pass more samples per class, another test_fraction, or an explicit test=(x, y)"
        ) from e
    return np.sort(tr), np.sort(te)


def load_digits() -> TensorData:
    """scikit-learn's 8x8 digits: stratified 80/20 split (seed 0), standardised (BENCHMARKS.md)."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    return from_tensors(d.data, d.target, test_fraction=0.2, standardize=True, seed=0, name="digits")


def load_diabetes() -> TensorData:
    """scikit-learn's diabetes regression set (442 x 10): 80/20 split, inputs and target standardised."""
    from sklearn.datasets import load_diabetes as sk_diabetes

    d = sk_diabetes()
    y = (d.target - d.target.mean()) / d.target.std()
    return from_tensors(
        d.data, y, test_fraction=0.2, regression=True, standardize=True, seed=0, name="diabetes"
    )


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _fashion_dir(path: str | os.PathLike | None, download: bool) -> Path:
    candidates = [Path(path)] if path else []
    candidates += [Path(p) for p in FASHION_MNIST_DIRS]
    for c in candidates:
        if all((c / f).is_file() for f in FASHION_MNIST_FILES):
            return c
    if download:
        target = Path(path or Path.home() / ".cache" / "distdm" / "fashion-mnist")
        target.mkdir(parents=True, exist_ok=True)
        for fname, md5 in FASHION_MNIST_FILES.items():
            dest = target / fname
            if dest.is_file() and _md5(dest) == md5:
                continue
            tmp = dest.with_suffix(".part")
            try:
                urllib.request.urlretrieve(FASHION_MNIST_URL + fname, tmp)
            except OSError as e:
                raise DistdmError(_fashion_help(f"download of {fname} failed ({e})")) from e
            if _md5(tmp) != md5:
                tmp.unlink()
                raise DistdmError(_fashion_help(f"checksum mismatch for downloaded {fname}"))
            os.replace(tmp, dest)
        return target
    raise DistdmError(_fashion_help("no Fashion-MNIST files found"))


def _fashion_help(why: str) -> str:
    return (
        f"Fashion-MNIST: {why}. Install it with `apt-get install dataset-fashion-mnist`, pass "
        f"path=DIR holding the four *-ubyte.gz files, or download=True (official source, checked "
        f"by MD5)."
    )


def load_fashion_mnist(
    path: str | os.PathLike | None = None,
    *,
    per_class: int | None = 200,
    download: bool = False,
) -> TensorData:
    """Fashion-MNIST 28x28: the first `per_class` training images of each class (None: all),
    the official test set; pixels in [0, 1] standardised with the training subset's statistics."""
    root = _fashion_dir(path, download)
    xtr = _read_idx(root / "train-images-idx3-ubyte.gz")
    ytr = _read_idx(root / "train-labels-idx1-ubyte.gz").astype(np.int64)
    xte = _read_idx(root / "t10k-images-idx3-ubyte.gz")
    yte = _read_idx(root / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    if per_class is not None:
        keep = np.sort(np.concatenate([np.flatnonzero(ytr == c)[:per_class] for c in range(10)]))
        xtr, ytr = xtr[keep], ytr[keep]
    xtr_t = torch.from_numpy(xtr.astype(np.float32) / 255.0).unsqueeze(1)
    xte_t = torch.from_numpy(xte.astype(np.float32) / 255.0).unsqueeze(1)
    mean, std = xtr_t.mean(), xtr_t.std()
    name = "fashion-mnist" if per_class is None else f"fashion-mnist-{per_class}pc"
    return TensorData(
        (xtr_t - mean) / std,
        torch.from_numpy(ytr),
        (xte_t - mean) / std,
        torch.from_numpy(yte),
        10,
        name,
    )


DATASETS = {"digits": load_digits, "fashion-mnist": load_fashion_mnist, "diabetes": load_diabetes}


def load_dataset(name: str, **kwargs: object) -> TensorData:
    """A built-in dataset by name: 'digits' (embedded default), 'fashion-mnist', 'diabetes'."""
    if name not in DATASETS:
        raise DistdmError(f"unknown dataset {name!r}; built-in: {sorted(DATASETS)}")
    import inspect

    try:
        inspect.signature(DATASETS[name]).bind(**kwargs)
    except TypeError as e:
        raise DistdmError(f"dataset {name!r} does not take the settings {sorted(kwargs)} ({e})") from e
    return DATASETS[name](**kwargs)  # type: ignore[operator]
