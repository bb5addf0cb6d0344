"""The run directory: manifest.json plus safetensors files, written atomically, checked on read.

Layout: ROOT/manifest.json records the format, library versions, data fingerprint, the settings of
each stage, which stages (and units of work) are complete, and a SHA-256 for every artifact.
Artifacts are ROOT/<name>.safetensors (tensors) or ROOT/<name>.json. Nothing is ever pickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import DistdmError

FORMAT = "distdm-run/1"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write bytes to path via a temporary file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _is_temp(path: Path) -> bool:
    """A temporary file left by an interrupted atomic write (never trusted, safe to ignore)."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


def _check_manifest(m: dict[str, Any], path: Path) -> None:
    """Refuse a manifest whose structure was damaged (hand-edited, or written by something else)."""
    for key in ("configs", "stages", "artifacts"):
        if not isinstance(m.get(key), dict):
            raise DistdmError(f"{path} has no valid {key!r} section: it was edited or damaged")
    for name, entry in m["stages"].items():
        if not isinstance(entry, dict):
            raise DistdmError(f"{path} records stage {name!r} as {entry!r}: it was edited or damaged")
    for name, entry in m["artifacts"].items():
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)):
            raise DistdmError(f"{path} lists artifact {name!r} without a checksum: it was edited or damaged")
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise DistdmError(f"{path} lists artifact {name!r} outside the run directory")


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    if old != new:
        return [f"{prefix.rstrip('.')}: stored {old!r}, now {new!r}"]
    return []


class RunStore:
    """A run directory on disk; creating one writes an empty manifest, opening one validates it."""

    def __init__(self, root: str | os.PathLike, *, fingerprint: str | None = None, create: bool = True):
        self.root = Path(root)
        self._manifest_path = self.root / "manifest.json"
        if self.root.exists() and not self.root.is_dir():
            raise DistdmError(f"{self.root} is a file, not a run directory: choose another path")
        if self._manifest_path.exists():
            try:
                self.manifest = json.loads(self._manifest_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DistdmError(f"{self._manifest_path} is corrupt ({e}); delete the run directory") from e
            fmt = self.manifest.get("format") if isinstance(self.manifest, dict) else None
            if fmt != FORMAT:
                raise DistdmError(f"{self.root} is not a distdm run directory (format {fmt!r})")
            _check_manifest(self.manifest, self._manifest_path)
            stored = self.manifest.get("fingerprint")
            if fingerprint is not None and stored is not None and stored != fingerprint:
                raise DistdmError(
                    f"{self.root} was made from other data (fingerprint {stored}, this data {fingerprint}): "
                    f"use a new run directory"
                )
            if fingerprint is not None and stored is None:
                self.manifest["fingerprint"] = fingerprint
                self._write_manifest()
        elif create:
            if self.root.exists() and any(not _is_temp(p) for p in self.root.iterdir()):
                raise DistdmError(
                    f"{self.root} exists, is not empty and has no manifest.json: choose another path"
                )
            self.manifest = {
                "format": FORMAT,
                "versions": {"distdm": _version(), "torch": torch.__version__},
                "fingerprint": fingerprint,
                "configs": {},
                "stages": {},
                "artifacts": {},
            }
            self._write_manifest()
        else:
            raise DistdmError(f"no run directory at {self.root} (no manifest.json)")

    def _write_manifest(self) -> None:
        atomic_write_bytes(self._manifest_path, json.dumps(self.manifest, indent=2, sort_keys=True).encode())

    # settings ---------------------------------------------------------------------------------
    def check_config(self, stage: str, config: dict[str, Any]) -> None:
        """Record a stage's settings, or refuse if the stored ones differ (saying what differs)."""
        config = json.loads(json.dumps(config))  # normalise tuples and numbers as JSON would
        stored = self.manifest["configs"].get(stage)
        if stored is None:
            self.manifest["configs"][stage] = config
            self._write_manifest()
            return
        diffs = _diff(stored, config)
        if diffs:
            raise DistdmError(
                f"run {self.root} stage '{stage}' was made with other settings ({'; '.join(diffs)}): "
                f"use a new run directory or reset the stage"
            )

    def config(self, stage: str) -> dict[str, Any] | None:
        """The stored settings of a stage, if any."""
        return self.manifest["configs"].get(stage)

    def reset(self, stage: str) -> None:
        """Forget a stage's settings, completion and artifacts (prefix match on artifact names)."""
        self.manifest["configs"].pop(stage, None)
        for done in [s for s in self.manifest["stages"] if s == stage or s.startswith(stage + "/")]:
            del self.manifest["stages"][done]
        for name in [a for a in self.manifest["artifacts"] if a == stage or a.startswith(stage + "/")]:
            (self.root / name).unlink(missing_ok=True)
            del self.manifest["artifacts"][name]
        self._write_manifest()

    # completion -------------------------------------------------------------------------------
    def is_done(self, stage: str) -> bool:
        """Whether a stage (or unit of work, e.g. 'retrain/seed0/chunk3') completed."""
        return bool(self.manifest["stages"].get(stage, {}).get("done"))

    def mark_done(self, stage: str, **info: Any) -> None:
        """Record that a stage completed, with optional info (e.g. seconds)."""
        self.manifest["stages"][stage] = {"done": True, **info}
        self._write_manifest()

    def stage_info(self, stage: str) -> dict[str, Any]:
        """What was recorded when the stage completed ({} if it did not)."""
        return dict(self.manifest["stages"].get(stage, {}))

    # artifacts --------------------------------------------------------------------------------
    def _record(self, name: str, path: Path) -> None:
        self.manifest["artifacts"][name] = {"sha256": _sha256(path), "bytes": path.stat().st_size}
        self._write_manifest()

    def _verified(self, name: str) -> Path:
        entry = self.manifest["artifacts"].get(name)
        path = self.root / name
        if entry is None:
            raise DistdmError(f"{self.root} has no artifact {name!r}: run the stage that makes it")
        if not path.is_file():
            raise DistdmError(f"artifact {path} is missing although the manifest lists it")
        if _sha256(path) != entry["sha256"]:
            raise DistdmError(
                f"artifact {path} does not match its recorded checksum: it was changed or truncated"
            )
        return path

    def has(self, name: str) -> bool:
        """Whether an artifact is recorded (and its file present)."""
        return name in self.manifest["artifacts"] and (self.root / name).is_file()

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Save named tensors as ROOT/name (a .safetensors file), atomically, with a checksum."""
        if not name.endswith(".safetensors"):
            name += ".safetensors"
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._record(name, path)

    def load_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Load a tensors artifact after checking its checksum."""
        if not name.endswith(".safetensors"):
            name += ".safetensors"
        path = self._verified(name)
        try:
            return load_file(path)
        except Exception as e:  # noqa: BLE001 - safetensors raises several types on bad files
            raise DistdmError(f"artifact {path} cannot be read ({e})") from e

    def save_json(self, name: str, obj: Any) -> None:
        """Save a JSON artifact atomically, with a checksum."""
        if not name.endswith(".json"):
            name += ".json"
        path = self.root / name
        atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode())
        self._record(name, path)

    def load_json(self, name: str) -> Any:
        """Load a JSON artifact after checking its checksum."""
        if not name.endswith(".json"):
            name += ".json"
        return json.loads(self._verified(name).read_text())

    def load_bytes(self, name: str) -> bytes:
        """The bytes of any recorded artifact (a figure, a table) after checking its checksum."""
        return self._verified(name).read_bytes()

    def save_file(self, name: str, data: bytes) -> Path:
        """Save any other file (a figure, a report) atomically, with a checksum; returns its path."""
        path = self.root / name
        atomic_write_bytes(path, data)
        self._record(name, path)
        return path


def _version() -> str:
    from . import __version__

    return __version__
