"""A user's data file and model spec, as the CLI (`--data FILE --model SPEC`) and `Run` take them.

Data files hold tensors under the names x_train, y_train and, optionally, x_test, y_test:

- `.npz` (numpy.savez; read with allow_pickle=False),
- `.pt` / `.pth` (torch.save of a dict of tensors; read with torch.load(weights_only=True)),
- `.safetensors` (safetensors.torch.save_file).

Integer labels make a classification task, floating-point targets a regression task.

A model spec names a callable that returns an nn.Module: `package.module:callable` (imported as
Python would, with the current directory on the path) or `path/to/file.py:callable`. The callable is
called with the keyword arguments input_shape= (one input's shape, a tuple) and num_classes= (the
number of outputs: classes, or 1 for regression) for each of the two that its signature names, plus
any model_kwargs; with neither named, it is called with no arguments. Its random initialisation is
drawn from `seed`, so the same spec gives the same initial weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .data import TensorData, from_tensors
from .errors import DistdmError

log = logging.getLogger(__name__)

DATA_SUFFIXES = (".npz", ".pt", ".pth", ".safetensors")
DATA_KEYS = ("x_train", "y_train", "x_test", "y_test")


def is_data_path(data: object) -> bool:
    """Whether `data` (as Run takes it) names a data file rather than a built-in dataset."""
    if isinstance(data, os.PathLike):
        return True
    if not isinstance(data, str) or not data:
        return False
    return data.lower().endswith(DATA_SUFFIXES) or os.sep in data or "/" in data or Path(data).is_file()


def _read_npz(path: Path) -> dict[str, Any]:
    import zipfile

    if not zipfile.is_zipfile(path):  # else np.load would try to read it as one pickled array
        raise DistdmError(
            f"{path} cannot be read as a .npz file (not a zip archive of arrays): use numpy.savez"
        )
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except ValueError as e:  # object arrays need pickle
        raise DistdmError(
            f"{path} holds arrays of Python objects ({e}): save numeric arrays only (numpy.savez)"
        ) from e
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise DistdmError(f"{path} cannot be read as a .npz file ({e})") from e


def _read_pt(path: Path) -> dict[str, Any]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling refusals and bad files raise many types
        raise DistdmError(
            f"{path} cannot be loaded as tensors with torch.load(weights_only=True) ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}): save a dict of tensors, e.g. "
            f"torch.save({{'x_train': x, 'y_train': y}}, path)"
        ) from e
    if not isinstance(obj, dict):
        raise DistdmError(
            f"{path} holds a {type(obj).__name__}, not a dict of tensors: save "
            f"{{'x_train': x, 'y_train': y[, 'x_test': ..., 'y_test': ...]}}"
        )
    return obj


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001 - safetensors raises several types on bad files
        raise DistdmError(f"{path} cannot be read as a .safetensors file ({e})") from e


def _as_tensor(v: Any, key: str, path: Path) -> torch.Tensor:
    if torch.is_tensor(v):
        return v
    if isinstance(v, np.ndarray):
        if v.dtype.kind not in "biuf":
            raise DistdmError(f"{path}: {key} has dtype {v.dtype}; it must hold numbers")
        return torch.from_numpy(np.ascontiguousarray(v))
    raise DistdmError(f"{path}: {key} is a {type(v).__name__}, not a tensor or array")


def load_data_file(path: str | os.PathLike, *, name: str | None = None) -> TensorData:
    """A TensorData from a .npz, .pt or .safetensors file holding x_train, y_train[, x_test, y_test]
    (integer labels: classification; floating-point targets: regression). Without x_test/y_test the
    data has no test set. name: the dataset's name (default the file's stem)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DistdmError(f"data file {p} does not exist")
    if p.is_dir():
        raise DistdmError(f"data file {p} is a directory: give a .npz, .pt or .safetensors file")
    suffix = p.suffix.lower()
    readers = {".npz": _read_npz, ".pt": _read_pt, ".pth": _read_pt, ".safetensors": _read_safetensors}
    if suffix not in readers:
        raise DistdmError(
            f"data file {p} has an unknown type {suffix or '(no suffix)'!r}: use .npz, .pt or .safetensors "
            f"holding x_train, y_train[, x_test, y_test]"
        )
    raw = readers[suffix](p)
    keys = sorted(str(k) for k in raw)
    missing = [k for k in ("x_train", "y_train") if k not in raw]
    if missing:
        raise DistdmError(
            f"data file {p} lacks {', '.join(missing)} (it has: {', '.join(keys) or 'nothing'}): save the "
            f"arrays under the names x_train, y_train[, x_test, y_test]"
        )
    if ("x_test" in raw) != ("y_test" in raw):
        have, lack = ("x_test", "y_test") if "x_test" in raw else ("y_test", "x_test")
        raise DistdmError(f"data file {p} has {have} but no {lack}: save both or neither")
    extra = [k for k in keys if k not in DATA_KEYS]
    if extra:
        log.info("data file %s: ignoring %s (only %s are read)", p, extra, list(DATA_KEYS))
    t = {k: _as_tensor(raw[k], k, p) for k in DATA_KEYS if k in raw}
    y = t["y_train"]
    if y.dtype == torch.bool:
        raise DistdmError(f"data file {p}: y_train is boolean; save class ids as integers (0, 1)")
    regression = y.dtype.is_floating_point
    if regression and "y_test" in t and not t["y_test"].dtype.is_floating_point:
        t["y_test"] = t["y_test"].float()
    if not regression and "y_test" in t and t["y_test"].dtype.is_floating_point:
        raise DistdmError(
            f"data file {p}: y_train holds integer class ids but y_test is {t['y_test'].dtype}: save both as "
            f"integers (classification) or both as floats (regression)"
        )
    test = (t["x_test"], t["y_test"]) if "x_test" in t else None
    try:
        return from_tensors(t["x_train"], y, test=test, regression=regression, name=name or p.stem)
    except DistdmError as e:
        raise DistdmError(f"data file {p}: {e}") from e


# model specs ------------------------------------------------------------------------------------


def _split_spec(spec: str) -> tuple[str, str]:
    if not isinstance(spec, str) or ":" not in spec:
        raise DistdmError(
            f"model spec {spec!r} has no ':': write package.module:callable (e.g. mymodels:make_net) or "
            f"path/to/file.py:callable"
        )
    where, attr = spec.rsplit(":", 1)
    if not where or not attr:
        raise DistdmError(f"model spec {spec!r} needs a module or file before ':' and a callable after it")
    return where, attr


def _is_file_spec(where: str) -> bool:
    return where.endswith(".py") or "/" in where or os.sep in where


@contextlib.contextmanager
def _on_path(directory: str) -> Iterator[None]:
    """`directory` first on sys.path while importing, as `python file.py` / `python -m` would put it."""
    added = directory not in sys.path
    if added:
        sys.path.insert(0, directory)
    try:
        yield
    finally:
        if added and directory in sys.path:
            sys.path.remove(directory)


def _import_file(path: Path, spec: str) -> Any:
    if not path.is_file():
        raise DistdmError(f"model file {path} (from model spec {spec!r}) does not exist")
    # one module name per file, so that a file imported again replaces its earlier version
    name = f"_distdm_user_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    mod_spec = importlib.util.spec_from_file_location(name, path)
    if mod_spec is None or mod_spec.loader is None:
        raise DistdmError(f"model file {path} cannot be imported as Python")
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = module
    try:
        with _on_path(str(path.parent)):
            mod_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - any error in the user's file is theirs to fix
        sys.modules.pop(name, None)
        raise DistdmError(f"importing model file {path} failed: {type(e).__name__}: {e}") from e
    return module


def _import_module(where: str, spec: str) -> Any:
    try:
        with _on_path(os.getcwd()):
            return importlib.import_module(where)
    except ModuleNotFoundError as e:
        raise DistdmError(
            f"cannot import module {where!r} of model spec {spec!r} ({e}): install it, run from the "
            f"directory that holds it, add that directory to PYTHONPATH, or give a file: "
            f"path/to/file.py:callable"
        ) from e
    except Exception as e:  # noqa: BLE001 - errors while importing the user's module are theirs
        raise DistdmError(
            f"importing module {where!r} of model spec {spec!r} failed: {type(e).__name__}: {e}"
        ) from e


def normalise_spec(spec: str) -> str:
    """The spec as a run records it: a file spec with its absolute path, a module spec as written."""
    where, attr = _split_spec(spec)
    if _is_file_spec(where):
        return f"{Path(where).expanduser().resolve()}:{attr}"
    return spec


def _call_kwargs(fn: Any, data: TensorData | None, extra: dict[str, Any], spec: str) -> dict[str, Any]:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins and some C extensions have no signature
        return dict(extra)
    by_name = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    kwargs: dict[str, Any] = {}
    for key in ("input_shape", "num_classes"):
        if key in params and params[key].kind in by_name:
            if data is None:
                raise DistdmError(f"{spec} takes {key}=, which needs the data: pass data to load_model_spec")
            kwargs[key] = data.input_shape if key == "input_shape" else (data.num_classes or 1)
    kwargs.update(extra)
    needed = [
        n
        for n, p in params.items()
        if p.default is inspect.Parameter.empty
        and p.kind in (*by_name, inspect.Parameter.POSITIONAL_ONLY)
        and n not in kwargs
    ]
    if needed:
        raise DistdmError(
            f"{spec} needs the arguments {needed}, which distdm cannot give (it passes input_shape= and "
            f"num_classes= when named, plus model_kwargs): give them defaults or wrap the call in a function"
        )
    return kwargs


def load_model_spec(
    spec: str,
    data: TensorData | None = None,
    *,
    seed: int | None = 0,
    model_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """The nn.Module returned by the callable that `spec` names ('package.module:callable' or
    'path/to/file.py:callable'), called with input_shape=/num_classes= from `data` where its signature
    names them, plus model_kwargs; its random initialisation is drawn from `seed` (None: unseeded)."""
    where, attr = _split_spec(spec)
    if _is_file_spec(where):
        module = _import_file(Path(where).expanduser().resolve(), spec)
    else:
        module = _import_module(where, spec)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            raise DistdmError(
                f"{where} has no {attr!r} (model spec {spec!r}); its callables: "
                f"{', '.join(names[:12]) or 'none'}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise DistdmError(f"{spec} is a {type(obj).__name__}, not a callable that returns an nn.Module")
    if isinstance(obj, nn.Module):
        raise DistdmError(
            f"{spec} is an nn.Module instance, not a callable that makes one: name a class or a function, "
            f"so that each run gets a model of its own"
        )
    kwargs = _call_kwargs(obj, data, dict(model_kwargs or {}), spec)
    try:
        with torch.random.fork_rng():
            if seed is not None:
                torch.manual_seed(seed)
            model = obj(**kwargs)
    except Exception as e:  # noqa: BLE001 - a failure inside the user's callable is theirs to fix
        raise DistdmError(f"calling {spec}({', '.join(kwargs)}) failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise DistdmError(f"{spec} returned a {type(model).__name__}, not an nn.Module")
    return model


__all__ = ["DATA_SUFFIXES", "is_data_path", "load_data_file", "load_model_spec", "normalise_spec"]
