import gzip
import struct

import numpy as np
import pytest
import torch

from distdm.data import FASHION_MNIST_FILES, from_dataset, from_tensors, load_dataset, load_fashion_mnist
from distdm.errors import DistdmError


def test_digits_split_and_standardisation(digits):
    assert digits.x_train.shape == (1437, 64) and digits.x_test.shape == (360, 64)
    assert torch.allclose(digits.x_train.mean(0), torch.zeros(64), atol=1e-5)
    # stratified: every class in both splits in its proportion
    assert torch.bincount(digits.y_test).min() >= 34
    assert digits.fingerprint() == load_dataset("digits").fingerprint()


def _write_idx(path, arr):
    header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_files_from_a_user_path(tmp_path):
    rng = np.random.default_rng(0)
    ytr = np.repeat(np.arange(10), 3)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (30, 28, 28)))
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", ytr)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (5, 28, 28)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(5))
    d = load_fashion_mnist(tmp_path, per_class=2)
    assert d.x_train.shape == (20, 1, 28, 28) and d.x_test.shape == (5, 1, 28, 28)
    assert torch.bincount(d.y_train).tolist() == [2] * 10
    assert abs(float(d.x_train.mean())) < 1e-5


def test_fashion_mnist_missing_files_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr("distdm.data.FASHION_MNIST_DIRS", ())
    with pytest.raises(DistdmError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "nowhere")
    assert len(FASHION_MNIST_FILES) == 4


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        (torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), torch.tensor([0, 1]), "NaN or inf"),
        (torch.zeros(3, 2), torch.tensor([0, 1]), "3 inputs but labels"),
        (torch.zeros(2, 2), torch.tensor([0.5, 1.0]), "floats"),
        (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), "empty"),
    ],
)
def test_bad_tensors_get_clear_errors(x, y, match):
    with pytest.raises(DistdmError, match=match):
        from_tensors(x, y, test=(x, y))


def test_labels_out_of_range_are_named():
    with pytest.raises(DistdmError, match=r"0\.\.2"):
        test = (torch.zeros(1, 2), torch.tensor([0]))
        from_tensors(torch.zeros(4, 2), torch.tensor([0, 1, 2, 3]), test=test, num_classes=3)


def test_torch_dataset_is_materialised():
    ds = torch.utils.data.TensorDataset(torch.randn(40, 3), torch.arange(40) % 4)
    d = from_dataset(ds, test_fraction=0.25)
    assert d.n_train == 30 and d.num_classes == 4 and d.x_test.shape == (10, 3)


def test_without_test_nothing_is_moved_out_of_training():
    x, y = torch.randn(40, 3), torch.arange(40) % 4
    d = from_tensors(x, y)
    assert d.n_train == 40 and not d.has_test and d.x_test.shape == (0, 3)
    torch.testing.assert_close(d.x_train, x)
    assert from_dataset(torch.utils.data.TensorDataset(x, y)).n_train == 40
    split = from_tensors(x, y, test_fraction=0.25)
    assert split.n_train == 30 and split.has_test and torch.bincount(split.y_test).tolist() == [3, 3, 2, 2]
    with pytest.raises(DistdmError, match="no test set, which evaluation needs: pass test="):
        d.require_test("evaluation")
    for bad in (0.0, 1.0, True, "0.2"):
        with pytest.raises(DistdmError, match="test_fraction must be in"):
            from_tensors(x, y, test_fraction=bad)
