"""The run directory: manifest.json plus safetensors files, written atomically, checked on read.

Layout: ROOT/manifest.json records the format, library versions, data fingerprint, the settings of
each stage, which stages (and units of work) are complete, and a SHA-256 for every artifact.
Artifacts are ROOT/<name>.safetensors (tensors) or ROOT/<name>.json. Nothing is ever pickled.
The manifest's `results` index lists finished results by kind (a chunked job, a synset, ...) with
their artifacts, identity and recorded info, so readers look results up instead of parsing names.

Expensive work goes through two helpers that share one convention (the artifact NAME.safetensors
and its completion flag NAME, written after it, carrying the digest of what the result depends on):
`run_chunked` for jobs of many rows (exact retraining, further training), cached and resumed chunk
by chunk and run in-process or through an executor, and `cached_tensors` for one result.

Several processes may work on one run at once (say `distdm distill` and `distdm evaluate`). Every
change to the manifest takes the lock file ROOT/.distdm.lock, re-reads manifest.json, applies the
change and writes it atomically, so no process overwrites what another recorded. The lock is held
per change (milliseconds), not for a whole command: two commands run side by side, and a stage both
of them need may be computed twice, but nothing either of them recorded is lost. Reading needs no
lock (manifest.json is only ever replaced whole), so a read-only run directory can still be read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from filelock import FileLock, Timeout
from safetensors.torch import load_file, save_file

from .errors import DistdmError

if TYPE_CHECKING:
    from .progress import StageProgress

log = logging.getLogger(__name__)

Digestible = Any  # a tensor, an array, a {name: tensor} state, or JSON-able settings


def digest(*parts: Digestible, length: int = 16) -> str:
    """A short SHA-256 identifying content: tensors and arrays by shape, dtype and bytes, dicts of
    tensors by sorted name and value, anything else by its sorted JSON; the one content hash of
    every cache key and fingerprint in the library."""
    h = hashlib.sha256()
    for part in parts:
        _digest_into(h, part)
    return h.hexdigest()[:length]


def _digest_into(h: Any, part: Digestible) -> None:
    if torch.is_tensor(part) or isinstance(part, np.ndarray):
        arr = (
            part.detach().cpu().contiguous().numpy() if torch.is_tensor(part) else np.ascontiguousarray(part)
        )
        h.update(f"{arr.shape}{arr.dtype}".encode())
        h.update(arr.tobytes())
    elif isinstance(part, dict) and part and all(torch.is_tensor(v) for v in part.values()):
        for k in sorted(part):
            h.update(str(k).encode())
            _digest_into(h, part[k])
    else:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())


FORMAT = "distdm-run/1"
LOCK_NAME = ".distdm.lock"
LOCK_TIMEOUT_S = 120.0  # a manifest change takes milliseconds; this long means a stuck process
# stages that define the run itself: a changed one cannot be reset, only run in a new directory
_IDENTITY_STAGES = ("data", "model")


class ReadOnlyRunError(DistdmError):
    """A change to a run directory that cannot be written (read-only file system or permissions)."""


def _umask() -> int:
    """The process's file-creation mask (read without changing it where the OS allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no way to read it without setting it elsewhere: restore at once
    os.umask(mask)
    return mask


def _temp_file(path: Path, write: Callable[[str], None]) -> Path:
    """A temporary file next to `path` filled by write(tmp_path), with the permissions a plain
    open() would give it (mkstemp makes 0600 files; users share run directories)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _write_bytes(tmp: str, data: bytes) -> None:
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write bytes to path via a temporary file and rename, so readers never see half a file;
    the file gets the permissions of the umask (0o666 & ~umask)."""
    path = Path(path)
    tmp = _temp_file(path, lambda t: _write_bytes(t, data))
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
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


def _is_read_only(e: OSError) -> bool:
    return isinstance(e, PermissionError) or e.errno in (errno.EROFS, errno.EACCES, errno.EPERM)


def _check_manifest(m: dict[str, Any], path: Path) -> None:
    """Refuse a manifest whose structure was damaged (hand-edited, or written by something else)."""
    for key in ("configs", "stages", "artifacts"):
        if not isinstance(m.get(key), dict):
            raise DistdmError(f"{path} has no valid {key!r} section: it was edited or damaged")
    for name, entry in m["stages"].items():
        if not isinstance(entry, dict):
            raise DistdmError(f"{path} records stage {name!r} as {entry!r}: it was edited or damaged")
    results = m.get("results", {})  # absent in runs made before the index existed
    if not isinstance(results, dict) or not all(
        isinstance(e, dict) and isinstance(e.get("kind"), str) and isinstance(e.get("files"), list)
        for e in results.values()
    ):
        raise DistdmError(f"{path} has no valid 'results' index: it was edited or damaged")
    for name, entry in m["artifacts"].items():
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)):
            raise DistdmError(f"{path} lists artifact {name!r} without a checksum: it was edited or damaged")
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise DistdmError(f"{path} lists artifact {name!r} outside the run directory")


def settings_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """What differs between two (nested) settings dicts, one 'key: stored X, now Y' per leaf."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += settings_diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    if old != new:
        return [f"{prefix.rstrip('.')}: stored {old!r}, now {new!r}"]
    return []


# the kinds of result the library indexes (RunStore.record_result / index): one name each, so a
# reader finds a kind by the same constant its writer used
SYNSET = "synset"  # a distilled synset: SYNSET_KEY.json and .safetensors
DISTILLATION = "distillation"  # a DDM preset's (or custom settings') distillation stage and its synset
SCORES = "scores"  # a method's scores for test queries, with the method's settings as identity
APPLICATION = "application"  # an application's outputs (info: application, corruption)
COMPARE_VARIANT = "compare-variant"  # one trained model variant of the comparison study
CURVATURE = "curvature"  # eigenpairs a distillation in progress computed (dropped with its journal)


@dataclasses.dataclass(frozen=True)
class Result:
    """One entry of a run's results index: a named result, its kind, its artifacts (run-relative
    names), the settings it depends on and what was recorded when it was made."""

    name: str
    kind: str
    files: tuple[str, ...]
    identity: dict[str, Any]
    info: dict[str, Any]


class RunStore:
    """A run directory on disk; creating one writes an empty manifest, opening one validates it.

    `created` is True when this object made the directory's manifest (see `discard`)."""

    def __init__(self, root: str | os.PathLike, *, fingerprint: str | None = None, create: bool = True):
        self.root = Path(root)
        self._manifest_path = self.root / "manifest.json"
        self._lock = FileLock(str(self.root / LOCK_NAME), timeout=LOCK_TIMEOUT_S)
        self._cache: dict[str, Any] = {}
        self._cache_key: tuple[int, int, int] | None = None
        self._discarded = False
        self.created = False
        self._created_root = False
        if self.root.exists() and not self.root.is_dir():
            raise DistdmError(f"{self.root} is a file, not a run directory: choose another path")
        if self._manifest_path.exists():
            self._refresh()
        elif create:
            self._create()
        else:
            raise DistdmError(f"no such run at {self.root}: create it with `distdm train`")
        if fingerprint is not None:
            self.check_fingerprint(fingerprint)

    def __getstate__(self) -> dict[str, Any]:
        # a lock holds thread-local state and open descriptors: each copy makes its own
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = FileLock(str(self.root / LOCK_NAME), timeout=LOCK_TIMEOUT_S)

    # the manifest --------------------------------------------------------------------------------
    def _load(self) -> tuple[dict[str, Any], tuple[int, int, int]]:
        try:
            with open(self._manifest_path, "rb") as f:
                st = os.fstat(f.fileno())
                raw = f.read()
        except FileNotFoundError as e:
            raise DistdmError(f"{self._manifest_path} disappeared: was the run directory removed?") from e
        try:
            m = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DistdmError(f"{self._manifest_path} is corrupt ({e}); delete the run directory") from e
        fmt = m.get("format") if isinstance(m, dict) else None
        if fmt != FORMAT:
            raise DistdmError(f"{self.root} is not a distdm run directory (format {fmt!r})")
        _check_manifest(m, self._manifest_path)
        return m, (st.st_ino, st.st_mtime_ns, st.st_size)

    def _refresh(self) -> None:
        """Re-read manifest.json if another process replaced it since we last read it."""
        try:
            st = os.stat(self._manifest_path)
        except FileNotFoundError:
            if self._cache_key is None:
                raise DistdmError(f"no such run at {self.root}: create it with `distdm train`") from None
            return  # removed under us (discard): keep what we knew
        if (st.st_ino, st.st_mtime_ns, st.st_size) != self._cache_key:
            self._cache, self._cache_key = self._load()

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest as last written by any process (re-read when the file changed)."""
        self._refresh()
        return self._cache

    def _new_manifest(self, fingerprint: str | None = None) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "versions": {"distdm": _version(), "torch": torch.__version__},
            "fingerprint": fingerprint,
            "configs": {},
            "stages": {},
            "artifacts": {},
        }

    def _create(self) -> None:
        # manifest.json may have appeared since __init__ looked: another process making this run
        ours = (LOCK_NAME, self._manifest_path.name)
        if self.root.exists() and any(not _is_temp(p) and p.name not in ours for p in self.root.iterdir()):
            raise DistdmError(
                f"{self.root} exists, is not empty and has no manifest.json: choose another path"
            )
        self._created_root = not self.root.exists()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            if _is_read_only(e):
                raise ReadOnlyRunError(
                    f"cannot create the run directory {self.root}: its parent is read-only ({e.strerror})"
                ) from e
            raise
        with self._locked("create the run"):
            if self._manifest_path.exists():  # another process created it meanwhile: join it
                self._cache, self._cache_key = self._load()
                return
            self._write(self._new_manifest())
            self.created = True

    def _write(self, m: dict[str, Any]) -> None:
        atomic_write_bytes(self._manifest_path, json.dumps(m, indent=2, sort_keys=True).encode())
        self._cache, self._cache_key = self._load()

    @contextlib.contextmanager
    def _locked(self, what: str) -> Iterator[None]:
        """Hold the run's lock while changing it; a read-only directory raises ReadOnlyRunError."""
        if self._discarded:
            raise DistdmError(f"run {self.root} was removed after a failed command: create it again")
        try:
            self._lock.acquire()
        except Timeout as e:
            raise DistdmError(
                f"run {self.root} stayed locked for {LOCK_TIMEOUT_S:.0f} s by another process: wait for it, "
                f"or delete {self.root / LOCK_NAME} if no distdm command is running"
            ) from e
        except OSError as e:
            if _is_read_only(e):
                raise self._read_only(what, e) from e
            raise
        try:
            yield
        except OSError as e:
            if _is_read_only(e):
                raise self._read_only(what, e) from e
            raise
        finally:
            self._lock.release()

    def _read_only(self, what: str, e: OSError) -> ReadOnlyRunError:
        return ReadOnlyRunError(
            f"run directory {self.root} is read-only ({e.strerror or e}): cannot {what}; "
            f"make it writable or copy the run elsewhere"
        )

    @contextlib.contextmanager
    def _mutate(self, what: str) -> Iterator[dict[str, Any]]:
        """Under the lock: the manifest fresh from disk, written back atomically if the body returns."""
        with self._locked(what):
            m, _ = self._load()
            yield m
            self._write(m)

    # data ----------------------------------------------------------------------------------------
    def check_fingerprint(self, fingerprint: str, describe: str = "this data") -> None:
        """Refuse data other than the run's (by fingerprint), or record it if the run has none yet."""
        stored = self.manifest.get("fingerprint")
        if stored is None:
            with self._mutate("record the data fingerprint") as m:
                if m.get("fingerprint") is None:
                    m["fingerprint"] = fingerprint
                stored = m["fingerprint"]
        if stored != fingerprint:
            raise DistdmError(
                f"{self.root} was made from other data (fingerprint {stored}, {describe} {fingerprint}): "
                f"use a new run directory"
            )

    # settings ---------------------------------------------------------------------------------
    def check_config(self, stage: str, config: dict[str, Any]) -> None:
        """Record a stage's settings, or refuse if the stored ones differ (saying what differs)."""
        config = json.loads(json.dumps(config))  # normalise tuples and numbers as JSON would
        stored = self.manifest["configs"].get(stage)
        if stored is None:
            with self._mutate(f"record the settings of stage '{stage}'") as m:
                stored = m["configs"].setdefault(stage, config)
        diffs = settings_diff(stored, config)
        if diffs:
            if stage in _IDENTITY_STAGES:
                how = "use a new run directory"
            else:
                how = (
                    f"use a new run directory, or forget the stage with "
                    f"`distdm reset {shlex.quote(str(self.root))} {shlex.quote(stage)}`"
                )
            raise DistdmError(
                f"run {self.root} stage '{stage}' was made with other settings ({'; '.join(diffs)}): {how}"
            )

    def config(self, stage: str) -> dict[str, Any] | None:
        """The stored settings of a stage, if any."""
        return self.manifest["configs"].get(stage)

    def reset(self, stage: str) -> None:
        """Forget a stage's settings, completion and artifacts, and those of the jobs under it
        (prefix match: 'retrain' also forgets 'retrain/loo/seed0' and its chunks)."""

        def ours(name: str) -> bool:
            return name == stage or name.startswith(stage + "/")

        m = self.manifest
        if not any(
            any(map(ours, m.get(section, {}))) for section in ("configs", "stages", "artifacts", "results")
        ):
            return  # nothing to forget: writes nothing (and works on a read-only run)
        with self._locked(f"reset stage '{stage}'"):
            m, _ = self._load()
            for name in [c for c in m["configs"] if ours(c)]:
                del m["configs"][name]
            owned: set[str] = set()  # artifacts a stage names as its own (e.g. its synset)
            for done in [s for s in m["stages"] if ours(s)]:
                owned.update(m["stages"][done].get("artifacts", []))
                del m["stages"][done]
            gone = [a for a in m["artifacts"] if ours(a) or a in owned]
            for name in gone:
                del m["artifacts"][name]
            results = m.get("results", {})
            for name in [r for r, e in results.items() if ours(r) or set(e["files"]) & set(gone)]:
                del results[name]
            # unlisted first, removed second: a crash in between leaves files nobody trusts
            self._write(m)
            for name in gone:
                (self.root / name).unlink(missing_ok=True)
                for parent in (self.root / name).parents:  # the folders it leaves empty go too
                    if parent == self.root or not parent.is_relative_to(self.root):
                        break
                    try:
                        parent.rmdir()
                    except OSError:  # not empty (or gone): so are the folders above it
                        break

    # completion -------------------------------------------------------------------------------
    def is_done(self, stage: str) -> bool:
        """Whether a stage (or unit of work, e.g. 'retrain/seed0/chunk3') completed."""
        return bool(self.manifest["stages"].get(stage, {}).get("done"))

    def mark_done(self, stage: str, **info: Any) -> None:
        """Record that a stage completed, with optional info (e.g. seconds)."""
        entry = json.loads(json.dumps({"done": True, **info}))
        with self._mutate(f"record that stage '{stage}' finished") as m:
            m["stages"][stage] = entry

    def stage_info(self, stage: str) -> dict[str, Any]:
        """What was recorded when the stage completed ({} if it did not)."""
        return dict(self.manifest["stages"].get(stage, {}))

    # the results index --------------------------------------------------------------------------
    def record_result(
        self, name: str, kind: str, files: list[str], identity: Mapping[str, Any] | None = None, **info: Any
    ) -> None:
        """List a finished result in the manifest's index: its kind (e.g. 'synset', 'chunked-job'),
        the artifacts it consists of, what it depends on (identity) and what it recorded (info).
        Readers find results by kind here instead of by the shape of file names."""
        if not kind or not isinstance(kind, str):
            raise DistdmError(f"a result needs a kind, got {kind!r}")
        entry = json.loads(
            json.dumps({"kind": kind, "files": list(files), "identity": dict(identity or {}), "info": info})
        )
        with self._mutate(f"index result '{name}'") as m:
            missing = [f for f in entry["files"] if f not in m["artifacts"]]
            if missing:
                raise DistdmError(
                    f"result {name!r} lists {missing} that this run does not record: save them first"
                )
            m.setdefault("results", {})[name] = entry

    def index(self, kind: str | None = None) -> list[Result]:
        """The indexed results (of one kind, if given) whose files are all present, sorted by name."""
        out = []
        for name, e in sorted(self.manifest.get("results", {}).items()):
            if (kind is None or e["kind"] == kind) and all(self.has(f) for f in e["files"]):
                out.append(
                    Result(name, e["kind"], tuple(e["files"]), e.get("identity", {}), e.get("info", {}))
                )
        return out

    def result(self, name: str) -> Result | None:
        """One indexed result by name (None if it is not indexed or a file of it is missing)."""
        return next((r for r in self.index() if r.name == name), None)

    # artifacts --------------------------------------------------------------------------------
    def _put(self, name: str, write: Callable[[str], None]) -> Path:
        """Write an artifact through a temporary file; rename it into place and record its checksum
        under the lock, so the manifest always lists the checksum of the file that is there."""
        path = self.root / name
        what = f"write {name}"
        try:
            tmp = _temp_file(path, write)
        except OSError as e:
            if _is_read_only(e):
                raise self._read_only(what, e) from e
            raise
        try:
            entry = {"sha256": _sha256(tmp), "bytes": tmp.stat().st_size}
            with self._mutate(what) as m:
                os.replace(tmp, path)
                m["artifacts"][name] = entry
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def _verified(self, name: str) -> Path:
        entry = self.manifest["artifacts"].get(name)
        path = self.root / name
        if entry is None:
            raise DistdmError(f"{self.root} has no artifact {name!r}: run the stage that makes it")
        if not path.is_file():
            raise DistdmError(f"artifact {path} is missing although the manifest lists it")
        if _sha256(path) != entry["sha256"] and not self._matches_under_lock(name, path):
            raise DistdmError(
                f"artifact {path} does not match its recorded checksum: it was changed or truncated"
            )
        return path

    def _matches_under_lock(self, name: str, path: Path) -> bool:
        """Check again while no process writes: another one may have been between renaming a new
        version of the file into place and recording its checksum."""
        try:
            with self._locked(f"check {name}"):
                self._cache, self._cache_key = self._load()
                entry = self._cache["artifacts"].get(name)
                return entry is not None and path.is_file() and _sha256(path) == entry["sha256"]
        except DistdmError:  # read-only or stuck: the first check stands
            return False

    def has(self, name: str) -> bool:
        """Whether an artifact is recorded (and its file present)."""
        return name in self.manifest["artifacts"] and (self.root / name).is_file()

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Save named tensors as ROOT/name (a .safetensors file), atomically, with a checksum."""
        if not name.endswith(".safetensors"):
            name += ".safetensors"
        flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        self._put(name, lambda tmp: save_file(flat, tmp))

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
        data = json.dumps(obj, indent=2, sort_keys=True).encode()
        self._put(name, lambda tmp: _write_bytes(tmp, data))

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
        return self._put(name, lambda tmp: _write_bytes(tmp, data))

    # removal ----------------------------------------------------------------------------------
    def discard(self) -> bool:
        """Remove a run this object created, if no stage of it completed (a command that failed
        before finishing anything leaves no directory behind). Returns whether it removed it."""
        if not self.created or self._discarded:
            return False
        with self._locked("remove the failed run"):
            m, _ = self._load()
            if any(e.get("done") for e in m["stages"].values()):
                return False  # another process finished something in it meanwhile: keep it
            for name in m["artifacts"]:
                (self.root / name).unlink(missing_ok=True)
            self._manifest_path.unlink(missing_ok=True)
            for p in self.root.iterdir():
                if _is_temp(p):
                    p.unlink(missing_ok=True)
            self._discarded = True
        (self.root / LOCK_NAME).unlink(missing_ok=True)
        # empty folders made for artifacts (e.g. distill/), then the root if this object made it
        for d in sorted((p for p in self.root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                d.rmdir()
        if self._created_root and not any(self.root.iterdir()):
            shutil.rmtree(self.root, ignore_errors=True)
        return True


def check_store(store: object) -> None:
    """Refuse a `store` argument that is neither None nor a RunStore."""
    if store is not None and not isinstance(store, RunStore):
        raise DistdmError(
            f"store must be a distdm RunStore (e.g. run.store) or None, got {type(store).__name__}"
        )


# chunked jobs --------------------------------------------------------------------------------
# A job computes tensors for n_items rows (retrained models, further-trained models, ...) in chunks
# of consecutive rows. Chunk i of job NAME is the artifact NAME/chunk<i>.safetensors, and its
# completion flag is the stage NAME/chunk<i>: the same name, so what resumes a job and what `reset`
# removes are found the same way. configs[NAME] records the job's identity and chunk size (a changed
# identity is refused, saying what differs); each flag also carries the digest of that config and
# its row count, so a flag left by other settings or another chunking never counts as done.

Tensors = dict[str, torch.Tensor]
CHUNKED_JOB = "chunked-job"  # the kind under which a complete job is listed in the results index
# compute(slices, executor) -> tensors for the rows of those slices, concatenated in order
ChunkCompute = Callable[[list[slice], Any], Mapping[str, torch.Tensor]]


def chunk_slices(n_items: int, chunk_size: int) -> list[slice]:
    """The rows of each chunk: consecutive slices of chunk_size items (the last may be shorter)."""
    return [slice(i, min(i + chunk_size, n_items)) for i in range(0, n_items, chunk_size)]


def _rows(sl: slice) -> int:
    return int(sl.stop - sl.start)


@dataclasses.dataclass(frozen=True)
class ChunkedJob:
    """Where a chunked job's results live in a run directory, and which of its chunks are complete.

    name: the job's stage name (e.g. 'retrain/loo/seed0'); identity: JSON-able settings its results
    depend on (recorded with the chunk size as configs[name]); n_items rows in chunks of chunk_size."""

    name: str
    identity: Mapping[str, Any]
    n_items: int
    chunk_size: int

    def __post_init__(self) -> None:
        if not self.name or self.name.startswith("/") or ".." in self.name.split("/"):
            raise DistdmError(f"a job name must be a non-empty relative name, got {self.name!r}")
        if "chunk_size" in self.identity:
            raise DistdmError("a job's identity must not hold 'chunk_size': pass it as chunk_size")
        if isinstance(self.n_items, bool) or not isinstance(self.n_items, int) or self.n_items < 1:
            raise DistdmError(f"a job needs at least one item, got n_items={self.n_items!r}")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise DistdmError(f"chunk_size must be an integer >= 1, got {self.chunk_size!r}")

    @property
    def config(self) -> dict[str, Any]:
        """What configs[name] records: the identity and the chunk size, normalised as JSON."""
        return json.loads(json.dumps({**self.identity, "chunk_size": self.chunk_size}, default=str))

    @property
    def digest(self) -> str:
        """The content hash of `config`, carried by every completion flag of this job."""
        return digest(self.config)

    def chunks(self) -> list[slice]:
        """The rows of each chunk, in order."""
        return chunk_slices(self.n_items, self.chunk_size)

    def key(self, i: int) -> str:
        """Chunk i's artifact name (without '.safetensors') and completion flag."""
        return f"{self.name}/chunk{i}"

    def is_done(self, store: RunStore, i: int) -> bool:
        """Whether chunk i is complete: flagged for this identity and row count, its file recorded."""
        rows = _rows(self.chunks()[i])
        info = store.stage_info(self.key(i))
        if "identity" in info:
            ours = info.get("identity") == self.digest and info.get("items") == rows
        else:  # flagged by retrain_masks before this runner: trusted when configs[name] is this job's
            ours = info.get("variants") == rows and store.config(self.name) == self.config
        return bool(info.get("done")) and ours and store.has(self.key(i) + ".safetensors")

    def pending(self, store: RunStore) -> list[int]:
        """The indices of the chunks that are not complete."""
        return [i for i in range(len(self.chunks())) if not self.is_done(store, i)]

    def complete(self, store: RunStore) -> bool:
        """Whether every chunk is complete."""
        return not self.pending(store)

    def recorded_seconds(self, store: RunStore) -> float | None:
        """Seconds the complete chunks took when they were computed (None if none is complete)."""
        done = [i for i in range(len(self.chunks())) if self.is_done(store, i)]
        if not done:
            return None
        return float(sum(store.stage_info(self.key(i)).get("seconds", 0.0) for i in done))

    @classmethod
    def recorded(cls, store: RunStore, name: str, n_items: int) -> ChunkedJob | None:
        """The job of that name as the run recorded it (its identity and chunk size), or None."""
        cfg = store.config(name)
        if not isinstance(cfg, dict) or not isinstance(cfg.get("chunk_size"), int):
            return None
        identity = {k: v for k, v in cfg.items() if k != "chunk_size"}
        try:
            return cls(name, identity, n_items, cfg["chunk_size"])
        except DistdmError:
            return None


def run_chunked(
    store: RunStore | None,
    name: str,
    identity: Mapping[str, Any],
    n_items: int,
    chunk_size: int,
    compute: ChunkCompute,
    *,
    executor: Any = None,
    device: torch.device | str | None = None,
    progress: StageProgress | None = None,
    work_per_item: int = 1,
) -> Tensors:
    """Compute a job's tensors for n_items rows chunk by chunk, caching each chunk in `store` and
    reusing or resuming complete ones; returns every chunk's tensors concatenated in row order.

    compute(slices, executor) returns the tensors (rows leading) of those rows, concatenated in order.
    Without an executor it is called once per pending chunk with one slice and None, and each chunk
    is saved before the next starts, so a crash loses at most the chunk in progress. With one (see
    distdm.executors), it is called once with every pending chunk and the executor, which spreads
    them (e.g. the engine maps its chunks onto Ray workers), and each chunk is saved when it returns.
    A chunk's completion flag is written only after its tensors are. Two processes on one run may
    both compute a chunk; each write is atomic and checksummed, so neither loses what it recorded.
    store None computes the same way without caching. device: where loaded chunks are put (default:
    where they are stored, the CPU). progress: advanced by work_per_item per row of every chunk that
    is loaded instead of computed (compute reports the progress of what it computes).
    """
    job = ChunkedJob(name, identity, n_items, chunk_size)
    chunks = job.chunks()
    if store is None:
        if executor is not None:
            return _checked(compute(chunks, executor), n_items, name)
        return _concat([_checked(compute([sl], None), _rows(sl), name) for sl in chunks])
    store.check_config(name, job.config)
    loaded: dict[int, Tensors] = {}

    def load(i: int) -> Tensors:
        stored = store.load_tensors(job.key(i))  # on the CPU, wherever it was computed
        return stored if device is None else {k: v.to(device) for k, v in stored.items()}

    pending = job.pending(store)
    if progress is not None:  # what is cached counts as done at once
        progress.advance(sum(_rows(sl) for i, sl in enumerate(chunks) if i not in pending) * work_per_item)
    for i in range(len(chunks)):
        if i not in pending:
            loaded[i] = load(i)
    if executor is not None and pending:
        t = time.perf_counter()
        together = _checked(
            compute([chunks[i] for i in pending], executor), sum(_rows(chunks[i]) for i in pending), name
        )
        seconds = (time.perf_counter() - t) / len(pending)
        at = 0
        for i in pending:
            n = _rows(chunks[i])
            loaded[i] = {k: v[at : at + n].contiguous() for k, v in together.items()}
            _save_chunk(store, job, i, loaded[i], seconds)
            at += n
        log.info("computed %d chunks of %s through %r in %.1f s", len(pending), name, executor, seconds)
    for i in pending:
        if i in loaded:
            continue
        if job.is_done(store, i):  # another process finished it meanwhile
            if progress is not None:
                progress.advance(_rows(chunks[i]) * work_per_item)
            loaded[i] = load(i)
            continue
        t = time.perf_counter()
        loaded[i] = _checked(compute([chunks[i]], None), _rows(chunks[i]), name)
        seconds = time.perf_counter() - t
        _save_chunk(store, job, i, loaded[i], seconds)
        log.info("computed %s (%d items) in %.1f s", job.key(i), _rows(chunks[i]), seconds)
    if store.result(name) is None:  # complete now: index it (once; a read-only run is read as is)
        with contextlib.suppress(ReadOnlyRunError):
            store.record_result(
                name, CHUNKED_JOB, [job.key(i) + ".safetensors" for i in range(len(chunks))], job.config,
                items=n_items, chunks=len(chunks), seconds=job.recorded_seconds(store),
            )  # fmt: skip
    return _concat([loaded[i] for i in range(len(chunks))])


def cached_tensors(
    store: RunStore | None,
    name: str,
    identity: Mapping[str, Any],
    compute: Callable[[], Mapping[str, torch.Tensor]],
    *,
    kind: str,
    device: torch.device | str | None = None,
    **info: Any,
) -> Tensors:
    """One result (named tensors) computed once per run and then loaded: the artifact
    NAME.safetensors, a completion flag NAME written after it (carrying digest(identity)) and a
    results-index entry of `kind`. A flag made with another identity does not count: the result is
    computed again. store None: just compute(). device: where a loaded result is put."""
    if store is None:
        return dict(compute())
    identity = json.loads(json.dumps(dict(identity), default=str))
    d = digest(identity)
    files = [name + ".safetensors"]
    flag = store.stage_info(name)
    if flag.get("done") and flag.get("identity") == d and store.has(files[0]):
        stored = store.load_tensors(name)  # on the CPU, wherever it was computed
        if store.result(name) is None:  # cached before the results index: list it (unless read-only)
            with contextlib.suppress(ReadOnlyRunError):
                store.record_result(name, kind, files, identity, seconds=flag.get("seconds"), **info)
        return stored if device is None else {k: v.to(device) for k, v in stored.items()}
    t = time.perf_counter()
    out = dict(compute())
    seconds = time.perf_counter() - t
    store.save_tensors(name, out)
    store.mark_done(name, identity=d, seconds=seconds, **info)
    store.record_result(name, kind, files, identity, seconds=seconds, **info)
    return out


def _save_chunk(store: RunStore, job: ChunkedJob, i: int, tensors: Tensors, seconds: float) -> None:
    """The tensors first, the flag second: a crash in between leaves a chunk that is recomputed."""
    store.save_tensors(job.key(i), tensors)
    store.mark_done(job.key(i), identity=job.digest, items=_rows(job.chunks()[i]), seconds=seconds)


def _checked(tensors: Mapping[str, torch.Tensor], rows: int, name: str) -> Tensors:
    out = dict(tensors)
    if not out or any(v.ndim == 0 or v.shape[0] != rows for v in out.values()):
        shapes = {k: tuple(v.shape) for k, v in out.items()}
        raise DistdmError(f"job {name}: compute must return tensors with {rows} rows leading, got {shapes}")
    return out


def _concat(parts: list[Tensors]) -> Tensors:
    if len(parts) == 1:
        return parts[0]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _version() -> str:
    from . import __version__

    return __version__
