"""A user's data files (.npz, .pt, .safetensors) and model specs (module:callable, file.py:callable):
what loads, and a DistdmError that says what to change for everything that does not."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from distdm.errors import DistdmError
from distdm.userdata import is_data_path, load_data_file, load_model_spec, normalise_spec

RNG = np.random.default_rng(0)
X = RNG.standard_normal((30, 4)).astype(np.float32)
Y = np.arange(30) % 3
XT = RNG.standard_normal((9, 4)).astype(np.float32)
YT = np.arange(9) % 3


def _save(path, arrays):
    if path.suffix == ".npz":
        np.savez(path, **arrays)
    elif path.suffix == ".pt":
        torch.save({k: torch.as_tensor(v) for k, v in arrays.items()}, path)
    else:
        save_file({k: torch.as_tensor(v).contiguous() for k, v in arrays.items()}, str(path))
    return path


@pytest.mark.parametrize("suffix", [".npz", ".pt", ".safetensors"])
def test_each_format_loads_train_and_test(tmp_path, suffix):
    d = load_data_file(
        _save(tmp_path / f"mine{suffix}", {"x_train": X, "y_train": Y, "x_test": XT, "y_test": YT})
    )
    assert d.name == "mine" and d.num_classes == 3 and not d.is_regression
    torch.testing.assert_close(d.x_train, torch.from_numpy(X))
    assert d.y_train.tolist() == Y.tolist() and d.y_test.tolist() == YT.tolist()
    assert d.x_test.shape == (9, 4) and d.has_test


def test_without_test_arrays_every_sample_is_training_data(tmp_path):
    d = load_data_file(_save(tmp_path / "a.npz", {"x_train": X, "y_train": Y}))
    assert d.n_train == 30 and not d.has_test
    with pytest.raises(DistdmError, match="no test set"):
        d.require_test("drawing test queries")


def test_float_targets_make_a_regression_task(tmp_path):
    y = RNG.standard_normal(30)
    d = load_data_file(_save(tmp_path / "r.npz", {"x_train": X, "y_train": y, "x_test": XT, "y_test": y[:9]}))
    assert d.is_regression and d.num_classes == 0 and d.y_train.dtype == torch.float32


def test_the_same_file_gives_the_same_fingerprint_and_other_contents_another(tmp_path):
    path = _save(tmp_path / "a.npz", {"x_train": X, "y_train": Y})
    fp = load_data_file(path).fingerprint()
    assert load_data_file(path).fingerprint() == fp
    _save(path, {"x_train": X * 2, "y_train": Y})
    assert load_data_file(path).fingerprint() != fp


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"x": X, "y": Y}, r"lacks x_train, y_train \(it has: x, y\)"),
        ({"x_train": X, "labels": Y}, r"lacks y_train \(it has: labels, x_train\)"),
        ({"x_train": X, "y_train": Y, "x_test": XT}, "has x_test but no y_test"),
        ({"x_train": X, "y_train": Y[:20]}, "30 inputs but labels of shape"),
        ({"x_train": X[:, 0], "y_train": Y}, r"shape \(n, ...features\)"),
        ({"x_train": X, "y_train": Y > 0}, "boolean"),
        ({"x_train": X, "y_train": Y, "x_test": XT[:, :2], "y_test": YT}, r"test inputs have shape \(2,\)"),
        ({"x_train": X, "y_train": Y, "x_test": XT, "y_test": YT + 0.5}, "y_test is torch.float64"),
        ({"x_train": np.full_like(X, np.nan), "y_train": Y}, "NaN or inf"),
    ],
)
def test_bad_contents_are_refused_naming_the_file(tmp_path, arrays, match):
    path = _save(tmp_path / "bad.npz", arrays)
    with pytest.raises(DistdmError, match=match) as e:
        load_data_file(path)
    assert "bad.npz" in str(e.value)


def test_unreadable_files_are_refused(tmp_path):
    with pytest.raises(DistdmError, match="does not exist"):
        load_data_file(tmp_path / "absent.npz")
    (tmp_path / "a.csv").write_text("1,2\n")
    with pytest.raises(DistdmError, match=r"unknown type '\.csv'.*\.npz, \.pt or \.safetensors"):
        load_data_file(tmp_path / "a.csv")
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(DistdmError, match="cannot be read as a .npz"):
        load_data_file(tmp_path / "broken.npz")
    (tmp_path / "broken.safetensors").write_bytes(b"nope")
    with pytest.raises(DistdmError, match="cannot be read as a .safetensors"):
        load_data_file(tmp_path / "broken.safetensors")
    np.savez(tmp_path / "objects.npz", x_train=np.array([{"a": 1}], dtype=object), y_train=Y)
    with pytest.raises(DistdmError, match="objects"):
        load_data_file(tmp_path / "objects.npz")
    with pytest.raises(DistdmError, match="is a directory"):
        load_data_file(tmp_path)


def test_pt_files_are_read_without_unpickling_objects(tmp_path):
    import pathlib

    # any object other than tensors and plain containers needs unpickling code to come back
    obj = {"x_train": torch.from_numpy(X), "y_train": torch.from_numpy(Y), "note": pathlib.PurePosixPath("x")}
    torch.save(obj, tmp_path / "e.pt")
    with pytest.raises(DistdmError, match=r"weights_only=True"):
        load_data_file(tmp_path / "e.pt")
    torch.save([torch.from_numpy(X)], tmp_path / "list.pt")
    with pytest.raises(DistdmError, match="holds a list, not a dict of tensors"):
        load_data_file(tmp_path / "list.pt")


def test_what_counts_as_a_data_path(tmp_path):
    assert is_data_path("data/mine.npz") and is_data_path("x.PT") and is_data_path(tmp_path / "x")
    assert not is_data_path("digits") and not is_data_path("fashion-mnist") and not is_data_path("")


# model specs -------------------------------------------------------------------------------------

MODELS_PY = """
import torch
from torch import nn

def make_net(input_shape, num_classes, hidden=8):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))

def no_args():
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3))

class Net(nn.Module):
    def __init__(self, num_classes=3):
        super().__init__()
        self.head = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.head(x)

def not_a_model():
    return 42

def needs_more(depth):
    return nn.Linear(4, 3)

def broken():
    raise RuntimeError("out of ideas")

instance = nn.Linear(4, 3)
"""


@pytest.fixture
def models_file(tmp_path):
    path = tmp_path / "user_models_h2.py"
    path.write_text(textwrap.dedent(MODELS_PY))
    return path


@pytest.fixture
def data():
    from distdm.data import from_tensors

    return from_tensors(X, Y, test=(XT, YT))


def test_file_spec_is_called_with_the_arguments_it_names(models_file, data):
    m = load_model_spec(f"{models_file}:make_net", data)
    assert m(torch.zeros(2, 4)).shape == (2, 3) and m[1].out_features == 8
    wide = load_model_spec(f"{models_file}:make_net", data, model_kwargs={"hidden": 5})
    assert wide[1].out_features == 5
    assert isinstance(load_model_spec(f"{models_file}:no_args", data), nn.Sequential)
    assert load_model_spec(f"{models_file}:Net", data).head.out_features == 3  # a class is a callable


def test_module_spec_imports_from_the_current_directory(models_file, data, monkeypatch):
    monkeypatch.chdir(models_file.parent)
    m = load_model_spec("user_models_h2:make_net", data)
    assert m(torch.zeros(1, 4)).shape == (1, 3)
    assert normalise_spec("user_models_h2:make_net") == "user_models_h2:make_net"
    assert normalise_spec("./user_models_h2.py:make_net") == f"{models_file}:make_net"  # absolute


def test_the_seed_fixes_the_initialisation(models_file, data):
    a = load_model_spec(f"{models_file}:make_net", data, seed=3)
    b = load_model_spec(f"{models_file}:make_net", data, seed=3)
    c = load_model_spec(f"{models_file}:make_net", data, seed=4)
    assert torch.equal(a[1].weight, b[1].weight) and not torch.equal(a[1].weight, c[1].weight)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("mymodels.make_net", "has no ':'"),
        (":make_net", "needs a module or file before ':'"),
        ("FILE:", "needs a module or file before ':' and a callable after it"),
        ("definitely_not_a_module_h2:make", r"cannot import module 'definitely_not_a_module_h2'.*PYTHONPATH"),
        ("/nowhere/models.py:make", "does not exist"),
        ("FILE:missing", r"has no 'missing'.*its callables: .*make_net"),
        ("FILE:not_a_model", "returned a int, not an nn.Module"),
        ("FILE:needs_more", r"needs the arguments \['depth'\]"),
        ("FILE:broken", r"calling .*broken\(\) failed: RuntimeError: out of ideas"),
        ("FILE:instance", "an nn.Module instance, not a callable"),
        ("distdm.models:MLP", r"needs the arguments \['num_outputs'\]"),
    ],
)
def test_bad_specs_say_what_to_change(models_file, data, spec, match):
    with pytest.raises(DistdmError, match=match):
        load_model_spec(spec.replace("FILE", str(models_file)), data)


def test_a_file_that_fails_to_import_is_reported(tmp_path, data):
    (tmp_path / "syntax.py").write_text("def f(:\n")
    with pytest.raises(DistdmError, match="importing model file .*syntax.py failed: SyntaxError"):
        load_model_spec(f"{tmp_path / 'syntax.py'}:f", data)
