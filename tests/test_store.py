"""The run directory: checksums, refusal of tampered, truncated or foreign files, settings checks,
atomic writes, and no pickle anywhere."""

from __future__ import annotations

import ast
import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distdm
from distdm.config import ClusterConfig, TrainConfig
from distdm.data import TensorData
from distdm.errors import DistdmError
from distdm.run import Run
from distdm.store import ReadOnlyRunError, RunStore, atomic_write_bytes


def _sha_ok(store: RunStore) -> None:
    """Every recorded artifact is present and matches its checksum."""
    for name in store.manifest["artifacts"]:
        store.load_bytes(name)


@pytest.fixture
def store(tmp_path) -> RunStore:
    s = RunStore(tmp_path / "run", fingerprint="abc")
    s.save_tensors("trajectory", {"0/w": torch.arange(12.0).reshape(3, 4), "0/b": torch.ones(3)})
    s.save_json("info", {"a": 1})
    return s


def test_manifest_records_checksum_and_size_of_every_artifact(store):
    manifest = json.loads((store.root / "manifest.json").read_text())
    assert set(manifest) >= {"format", "versions", "fingerprint", "configs", "stages", "artifacts"}
    for name, entry in manifest["artifacts"].items():
        data = (store.root / name).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["bytes"] == len(data)
    loaded = RunStore(store.root).load_tensors("trajectory")
    torch.testing.assert_close(loaded["0/w"], torch.arange(12.0).reshape(3, 4))


def test_tampered_artifact_is_refused_naming_the_file(store):
    path = store.root / "trajectory.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # one bit of one parameter
    path.write_bytes(bytes(data))
    with pytest.raises(DistdmError, match=r"trajectory\.safetensors.*checksum"):
        RunStore(store.root).load_tensors("trajectory")


def test_truncated_artifact_is_refused_naming_the_file(store):
    path = store.root / "trajectory.safetensors"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DistdmError, match=r"trajectory\.safetensors.*(changed or truncated)"):
        RunStore(store.root).load_tensors("trajectory")


def test_foreign_artifact_from_another_run_is_refused(store, tmp_path):
    other = RunStore(tmp_path / "other", fingerprint="abc")
    other.save_tensors("trajectory", {"0/w": torch.zeros(3, 4), "0/b": torch.zeros(3)})
    (store.root / "trajectory.safetensors").write_bytes((other.root / "trajectory.safetensors").read_bytes())
    with pytest.raises(DistdmError, match=r"trajectory\.safetensors"):
        RunStore(store.root).load_tensors("trajectory")


def test_missing_artifact_and_unknown_artifact_are_errors(store):
    (store.root / "info.json").unlink()
    with pytest.raises(DistdmError, match=r"info\.json is missing"):
        RunStore(store.root).load_json("info")
    with pytest.raises(DistdmError, match="no artifact 'clusters.safetensors'"):
        store.load_tensors("clusters")


def test_recorded_file_that_is_not_safetensors_cannot_be_read(store):
    store.save_file("fake.safetensors", b"not a safetensors file at all")
    with pytest.raises(DistdmError, match=r"fake\.safetensors cannot be read"):
        store.load_tensors("fake")


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", r"manifest\.json is corrupt"),
        ('["a list"]', "not a distdm run directory"),
        ('{"format": "someone-else/2"}', r"not a distdm run directory \(format 'someone-else/2'\)"),
        ('{"format": "distdm-run/1", "configs": {}, "stages": {}}', "no valid 'artifacts' section"),
        (
            '{"format": "distdm-run/1", "configs": {}, "stages": {"train": true}, "artifacts": {}}',
            "stage 'train'",
        ),
        (
            '{"format": "distdm-run/1", "configs": {}, "stages": {}, "artifacts": {"x.json": {}}}',
            "without a checksum",
        ),
        (
            '{"format": "distdm-run/1", "configs": {}, "stages": {}, '
            '"artifacts": {"../x.json": {"sha256": "0"}}}',
            "outside the run directory",
        ),
    ],
)
def test_damaged_or_foreign_manifest_is_refused(tmp_path, text, match):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.json").write_text(text)
    with pytest.raises(DistdmError, match=match):
        RunStore(tmp_path / "run")


def test_paths_that_are_not_run_directories(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DistdmError, match="is a file"):
        RunStore(tmp_path / "file")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(DistdmError, match="not empty and has no manifest.json"):
        RunStore(tmp_path / "busy")
    with pytest.raises(DistdmError, match="no such run at .*absent: create it with `distdm train`"):
        RunStore(tmp_path / "absent", create=False)


def test_directory_with_only_leftover_temp_files_can_become_a_run(tmp_path):
    # a process killed inside the very first manifest write leaves only a temporary file behind
    root = tmp_path / "run"
    root.mkdir()
    (root / ".manifest.json.k2j3.tmp").write_text('{"format": "distdm-run/1", "conf')
    store = RunStore(root, fingerprint="f")
    assert store.manifest["configs"] == {}
    assert RunStore(root).manifest["fingerprint"] == "f"


def test_other_data_fingerprint_is_refused(store):
    with pytest.raises(DistdmError, match="made from other data.*use a new run directory"):
        RunStore(store.root, fingerprint="xyz")


def test_other_settings_are_refused_saying_what_differs(store):
    store.check_config("train", {"epochs": 2, "lr": 0.1, "nested": {"a": [1, 2]}})
    store.check_config("train", {"epochs": 2, "lr": 0.1, "nested": {"a": (1, 2)}})  # JSON-equal
    with pytest.raises(DistdmError) as e:
        RunStore(store.root).check_config("train", {"epochs": 3, "lr": 0.1, "nested": {"a": [1]}})
    msg = str(e.value)
    assert (
        "stage 'train'" in msg
        and "epochs: stored 2, now 3" in msg
        and "nested.a: stored [1, 2], now [1]" in msg
    )
    assert "lr" not in msg


def test_atomic_write_never_leaves_half_a_file(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    atomic_write_bytes(path, b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, b"new contents")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # the temporary file was removed


def test_artifact_written_but_not_recorded_is_not_trusted(store):
    # killed between renaming the file into place and recording it in the manifest
    (store.root / "clusters.safetensors").write_bytes(b"whatever was there")
    reopened = RunStore(store.root)
    assert not reopened.has("clusters.safetensors")
    with pytest.raises(DistdmError, match="no artifact"):
        reopened.load_tensors("clusters")
    reopened.save_tensors("clusters", {"assignment": torch.zeros(3, dtype=torch.long)})
    assert RunStore(store.root).load_tensors("clusters")["assignment"].tolist() == [0, 0, 0]


def test_reset_forgets_a_stage_and_its_artifacts(store):
    store.check_config("retrain", {"a": 1})
    store.save_tensors("retrain/x/chunk0", {"w": torch.ones(2)})
    store.mark_done("retrain/x/chunk0", seconds=1.0)
    store.reset("retrain")
    assert store.config("retrain") is None
    assert not (store.root / "retrain/x/chunk0.safetensors").exists()
    assert "retrain/x/chunk0.safetensors" not in store.manifest["artifacts"]
    _sha_ok(RunStore(store.root))


# Run: reopening with other data or settings ------------------------------------------------------


@pytest.fixture(scope="module")
def small(digits):
    return TensorData(
        digits.x_train[:200], digits.y_train[:200], digits.x_test[:40], digits.y_test[:40], 10, "d200"
    )


TC = TrainConfig(epochs=2, lr=0.1, batch_size=32)


def _run(path, data, **kw):
    return Run(
        path, data, "mlp", train=kw.pop("train", TC), model_kwargs=kw.pop("mk", {"hidden": (8,)}), **kw
    )


def test_run_reopened_with_other_data_or_settings_says_what_differs(tmp_path, small):
    r = _run(tmp_path / "r", small)
    r.train()
    r.cluster(ClusterConfig(per_class=2, n_init=1))
    before = (tmp_path / "r" / "manifest.json").read_bytes()

    other = TensorData(small.x_train[:150], small.y_train[:150], small.x_test, small.y_test, 10, "d150")
    with pytest.raises(DistdmError, match="made from other data"):
        _run(tmp_path / "r", other)
    with pytest.raises(DistdmError, match=r"stage 'model'.*kwargs\.hidden: stored \[8\], now \[9\]"):
        _run(tmp_path / "r", small, mk={"hidden": (9,)})
    with pytest.raises(DistdmError, match=r"stage 'train'.*epochs: stored 2, now 3"):
        _run(tmp_path / "r", small, train=TrainConfig(epochs=3, lr=0.1, batch_size=32)).train()
    with pytest.raises(DistdmError, match=r"stage 'cluster'.*per_class: stored 2, now 3"):
        _run(tmp_path / "r", small).cluster(ClusterConfig(per_class=3, n_init=1))
    assert (tmp_path / "r" / "manifest.json").read_bytes() == before  # refusals write nothing

    again = _run(tmp_path / "r", small)  # the same data and settings reuse everything
    assert again.store.is_done("train") and again.clusters().n_clusters == 20
    opened = Run.open(tmp_path / "r", data=small)
    torch.testing.assert_close(opened.trajectory()[-1], r.trajectory()[-1])


def test_failed_stage_does_not_bind_its_settings(tmp_path, small):
    r = _run(tmp_path / "r", small)
    with pytest.raises(DistdmError, match="class 0 has .* but 1000 clusters"):
        r.cluster(ClusterConfig(per_class=1000, features="inputs"))
    c = r.cluster(ClusterConfig(per_class=2, features="inputs", n_init=1))  # not "made with other settings"
    assert c.n_clusters == 20


def test_tampered_trajectory_is_refused_by_the_run(tmp_path, small):
    r = _run(tmp_path / "r", small)
    r.train()
    path = tmp_path / "r" / "trajectory.safetensors"
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(DistdmError, match=r"trajectory\.safetensors does not match its recorded checksum"):
        _run(tmp_path / "r", small).trajectory()


# no pickle ---------------------------------------------------------------------------------------

SRC = Path(distdm.__file__).parent


PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "cloudpickle", "shelve", "marshal"}


def _pickle_uses(path: Path) -> list[str]:
    """Imports of pickle-like modules and calls that unpickle (torch.load without weights_only=True,
    np.load(allow_pickle=True), torch.save, read_pickle) in one source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name = node.func.attr
            kw = {k.arg: k.value for k in node.keywords}
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            safe = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
            if owner == "torch" and name == "load" and not safe:
                found.append("torch.load without weights_only=True")
            if owner == "torch" and name == "save":
                found.append("torch.save (pickle)")
            if (
                name == "load"
                and isinstance(kw.get("allow_pickle"), ast.Constant)
                and kw["allow_pickle"].value
            ):
                found.append("load(allow_pickle=True)")
            if name in ("read_pickle", "to_pickle"):
                found.append(name)
    return [f"{path.name}: {f}" for f in found]


def test_the_pickle_scanner_finds_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle\nfrom joblib import load\nimport torch, numpy as np\n"
        "torch.load('a')\ntorch.load('b', weights_only=True)\nnp.load('c', allow_pickle=True)\n"
    )
    assert len(_pickle_uses(bad)) == 4  # all but the weights_only load


def test_no_pickle_anywhere_in_the_package():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 10  # the scan does look at the package
    offenders = [use for path in files for use in _pickle_uses(path)]
    assert not offenders, "pickle-based I/O in the package:\n" + "\n".join(offenders)


# two processes, one run: nothing lost -----------------------------------------------------------

WRITER = """
import sys, time, torch
from pathlib import Path
from distdm.store import RunStore

root, tag, n, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
while not go.exists():  # both processes start writing at the same moment
    time.sleep(0.01)
store = RunStore(root)
store.check_config(tag, {"writer": tag})
for i in range(n):
    store.save_tensors(f"{tag}/chunk{i}", {"w": torch.full((50,), float(i))})
    store.mark_done(f"{tag}/chunk{i}", seconds=0.0)
store.save_json(f"{tag}/summary", {"n": n})
store.mark_done(tag)
"""


def test_two_processes_writing_one_run_lose_no_manifest_entry(tmp_path):
    # what a concurrent `distdm distill` and `distdm evaluate` do to one run, many times over
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    root, go, n = tmp_path / "run", tmp_path / "go", 30
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(root), tag, str(n), str(go)], stderr=subprocess.PIPE
        )
        for tag in ("distill-default", "evaluation")
    ]
    go.touch()
    errors = [p.communicate(timeout=240)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    store = RunStore(root)
    m = store.manifest
    for tag in ("distill-default", "evaluation"):
        assert m["configs"][tag] == {"writer": tag}
        assert store.is_done(tag) and all(store.is_done(f"{tag}/chunk{i}") for i in range(n))
        assert {f"{tag}/chunk{i}.safetensors" for i in range(n)} | {f"{tag}/summary.json"} <= set(
            m["artifacts"]
        )
        assert store.load_tensors(f"{tag}/chunk{n - 1}")["w"][0] == n - 1
    assert len(m["artifacts"]) == 2 * (n + 1)
    _sha_ok(store)


def test_a_store_sees_what_another_one_recorded(tmp_path):
    a = RunStore(tmp_path / "run")
    b = RunStore(tmp_path / "run")
    a.mark_done("train", seconds=1.0)
    b.save_json("other", {"x": 1})  # b's change is made on the manifest as a left it, not as b read it
    assert b.is_done("train") and a.has("other.json")
    assert RunStore(tmp_path / "run").manifest["stages"]["train"]["seconds"] == 1.0


# read-only run directories and the umask ---------------------------------------------------------


def _make_read_only(monkeypatch, root: Path) -> None:
    """chmod the run read-only; as root (whom chmod does not stop) also refuse every write under it
    the way the kernel would for anyone else: PermissionError from os.open/mkdir/replace/unlink."""
    for p in [root, *root.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    if os.geteuid() != 0:
        return

    def inside(path) -> bool:
        try:
            return Path(os.fsdecode(path)).resolve().is_relative_to(root.resolve())
        except (TypeError, ValueError):
            return False

    def refuse(path):
        raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))

    real_open, real_mkdir, real_replace, real_unlink = os.open, os.mkdir, os.replace, os.unlink
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def guarded_open(path, flags, *a, **k):
        if flags & writing and inside(path):
            refuse(path)
        return real_open(path, flags, *a, **k)

    def guarded(real):
        def call(path, *a, **k):
            if inside(path):
                refuse(path)
            return real(path, *a, **k)

        return call

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(os, "mkdir", guarded(real_mkdir))
    monkeypatch.setattr(
        os, "replace", lambda src, dst, **k: refuse(dst) if inside(dst) else real_replace(src, dst, **k)
    )
    monkeypatch.setattr(os, "unlink", guarded(real_unlink))


@pytest.fixture
def writable_again(tmp_path):
    yield
    for p in [tmp_path, *tmp_path.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)


def test_a_read_only_run_can_be_read_and_refuses_writes_in_one_line(
    tmp_path, small, monkeypatch, writable_again
):
    r = _run(tmp_path / "r", small)
    r.train()
    r.cluster(ClusterConfig(per_class=2, n_init=1))
    (tmp_path / "r" / ".distdm.lock").unlink()  # as a copy made without it (e.g. cp of the visible files)
    _make_read_only(monkeypatch, tmp_path / "r")

    opened = Run.open(tmp_path / "r", data=small)  # reading needs no lock file and writes nothing
    assert opened.clusters().n_clusters == 20 and len(opened.train()) == TC.epochs + 1
    opened.cluster(ClusterConfig(per_class=2, n_init=1))  # cached: reused without writing
    for write in (
        lambda: opened.store.mark_done("x"),
        lambda: opened.store.save_json("note", {"a": 1}),
        lambda: opened.store.check_config("distill-default", {"a": 1}),
        lambda: opened.store.reset("cluster"),
    ):
        with pytest.raises(ReadOnlyRunError) as e:
            write()
        assert "is read-only" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ReadOnlyRunError, match="parent is read-only"):
        _run(tmp_path / "r" / "nested", small)
    assert opened.store.is_done("cluster")  # nothing was lost either


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        store = RunStore(tmp_path / "run")
        store.save_tensors("t", {"w": torch.ones(2)})
        store.save_json("j", {"a": 1})
        store.save_file("f.txt", b"x")
        atomic_write_bytes(tmp_path / "plain.bin", b"y")
    finally:
        os.umask(old)
    for name in ("manifest.json", "t.safetensors", "j.json", "f.txt"):
        assert (tmp_path / "run" / name).stat().st_mode & 0o777 == mode, name
    assert (tmp_path / "plain.bin").stat().st_mode & 0o777 == mode


def test_changed_settings_give_the_exact_reset_command(store):
    store.check_config("train", {"epochs": 2})
    with pytest.raises(DistdmError) as e:
        store.check_config("train", {"epochs": 3})
    assert f"`distdm reset {store.root} train`" in str(e.value)
    store.check_config("model", {"name": "mlp"})
    with pytest.raises(DistdmError) as e:
        store.check_config("model", {"name": "convnet"})
    assert "use a new run directory" in str(e.value) and "distdm reset" not in str(e.value)


def test_discard_removes_only_a_run_this_store_made_and_nothing_finished(tmp_path):
    made = RunStore(tmp_path / "new")
    made.save_tensors("model-init", {"w": torch.ones(1)})
    assert made.discard() and not (tmp_path / "new").exists()
    with pytest.raises(DistdmError, match="removed after a failed command"):
        made.mark_done("x")
    kept = RunStore(tmp_path / "kept")
    kept.mark_done("train")
    assert not kept.discard() and (tmp_path / "kept" / "manifest.json").exists()
    assert not RunStore(tmp_path / "kept").discard()  # opened, not made, here


def test_digest_identifies_content_not_order_or_container():
    from distdm.store import digest

    a = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert digest(a) == digest(a.clone()) == digest(a.numpy())
    assert digest(a) != digest(a.reshape(3, 2))  # same bytes, another shape
    assert digest(a) != digest(a.double())  # same values, another dtype
    assert digest({"w": a, "b": a[0]}) == digest({"b": a[0], "w": a})
    assert digest({"w": a}) != digest({"v": a})
    assert digest({"lr": 0.1, "k": [1, 2]}) == digest({"k": [1, 2], "lr": 0.1})
    assert digest({"lr": 0.1}) != digest({"lr": 0.2})
    assert len(digest(a)) == 16 and len(digest(a, length=40)) == 40


# the chunked-job runner ----------------------------------------------------------------------------


class _Job:
    """A job of 10 rows whose row r is (r, r^2): counts which rows each compute call was given."""

    def __init__(self, fail_at: int | None = None):
        self.calls: list[tuple[list[tuple[int, int]], bool]] = []
        self.fail_at = fail_at

    def __call__(self, slices, executor):
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise KeyboardInterrupt("killed")
        self.calls.append(([(sl.start, sl.stop) for sl in slices], executor is not None))
        rows = torch.cat([torch.arange(sl.start, sl.stop, dtype=torch.float64) for sl in slices])
        return {"a": rows, "b": torch.stack([rows, rows**2], 1)}


def _expected(n: int = 10) -> dict[str, torch.Tensor]:
    rows = torch.arange(n, dtype=torch.float64)
    return {"a": rows, "b": torch.stack([rows, rows**2], 1)}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_chunked_job_equals_the_unchunked_one_with_or_without_a_store(tmp_path):
    from distdm.store import run_chunked

    whole = run_chunked(None, "job", {}, 10, 10, _Job())
    assert _equal(whole, _expected())
    for size in (1, 3, 4, 10, 25):
        job = _Job()
        assert _equal(run_chunked(None, "job", {}, 10, size, job), whole)
        assert len(job.calls) == -(-10 // size)  # one call per chunk
        stored = RunStore(tmp_path / f"run{size}")
        assert _equal(run_chunked(stored, "job", {"k": 1}, 10, size, _Job()), whole)


def test_interrupted_job_resumes_without_recomputing_finished_chunks(tmp_path):
    from distdm.store import ChunkedJob, run_chunked

    store = RunStore(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        run_chunked(store, "ft/seed0", {"lr": 0.1}, 10, 3, _Job(fail_at=2))  # killed in chunk 2
    assert store.is_done("ft/seed0/chunk1") and not store.is_done("ft/seed0/chunk2")
    assert store.has("ft/seed0/chunk1.safetensors")  # the flag's name is the result's name
    job = ChunkedJob("ft/seed0", {"lr": 0.1}, 10, 3)
    assert job.pending(store) == [2, 3] and not job.complete(store)
    resumed = _Job()
    reopened = RunStore(tmp_path / "run")
    assert _equal(run_chunked(reopened, "ft/seed0", {"lr": 0.1}, 10, 3, resumed), _expected())
    assert resumed.calls == [([(6, 9)], False), ([(9, 10)], False)]  # chunks 2 and 3 only
    again = _Job()
    assert _equal(run_chunked(reopened, "ft/seed0", {"lr": 0.1}, 10, 3, again), _expected())
    assert again.calls == [] and job.complete(reopened)
    assert job.recorded_seconds(reopened) is not None
    # other settings or another chunking of the same job are refused, saying what differs
    with pytest.raises(DistdmError, match="lr: stored 0.1, now 0.2"):
        run_chunked(reopened, "ft/seed0", {"lr": 0.2}, 10, 3, _Job())
    with pytest.raises(DistdmError, match="chunk_size"):
        run_chunked(reopened, "ft/seed0", {"lr": 0.1}, 10, 4, _Job())


def test_completion_flag_is_written_only_after_the_result(tmp_path, monkeypatch):
    from distdm.store import ChunkedJob, run_chunked

    store = RunStore(tmp_path / "run")
    seen: list[bool] = []
    real_mark = RunStore.mark_done

    def mark(self, stage, **info):
        seen.append(self.has(stage + ".safetensors"))  # the result is there when its flag is set
        return real_mark(self, stage, **info)

    def crash_on_chunk1(self, stage, **info):
        if stage.endswith("chunk1"):
            raise KeyboardInterrupt("killed between the result and its flag")
        return mark(self, stage, **info)

    monkeypatch.setattr(RunStore, "mark_done", crash_on_chunk1)
    with pytest.raises(KeyboardInterrupt):
        run_chunked(store, "job", {}, 10, 4, _Job())
    # chunk 1's tensors were written but not flagged: not trusted, computed again on resume
    assert store.has("job/chunk1.safetensors") and not store.is_done("job/chunk1")
    monkeypatch.setattr(RunStore, "mark_done", mark)
    job = _Job()
    assert _equal(run_chunked(store, "job", {}, 10, 4, job), _expected())
    assert job.calls == [([(4, 8)], False), ([(8, 10)], False)]
    assert seen and all(seen)
    # a result whose write failed leaves no flag either
    other = RunStore(tmp_path / "other")

    def broken(self, name, tensors):
        raise OSError("disk full")

    monkeypatch.setattr(RunStore, "save_tensors", broken)
    with pytest.raises(OSError, match="disk full"):
        run_chunked(other, "job", {}, 10, 4, _Job())
    assert ChunkedJob("job", {}, 10, 4).pending(other) == [0, 1, 2]
    assert not any(k.startswith("job/") for k in other.manifest["stages"])


def test_executor_path_gives_the_in_process_result_in_one_call(tmp_path):
    from distdm.executors import LocalExecutor
    from distdm.store import run_chunked

    local = run_chunked(RunStore(tmp_path / "a"), "job", {}, 10, 4, _Job())
    store = RunStore(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        run_chunked(store, "job", {}, 10, 4, _Job(fail_at=1))  # chunk 0 finished in-process
    job = _Job()
    got = run_chunked(store, "job", {}, 10, 4, job, executor=LocalExecutor())
    assert _equal(got, local)
    assert job.calls == [([(4, 8), (8, 10)], True)]  # every pending chunk in one call, with the executor
    assert all(store.is_done(f"job/chunk{i}") for i in range(3))  # each one saved by the driver
    assert _equal(run_chunked(RunStore(tmp_path / "b"), "job", {}, 10, 4, _Job()), local)
    none = _Job()
    assert _equal(run_chunked(None, "job", {}, 10, 4, none, executor=LocalExecutor()), local)
    assert none.calls == [([(0, 4), (4, 8), (8, 10)], True)]


def test_two_stores_on_one_run_share_finished_chunks(tmp_path):
    from distdm.progress import StageProgress
    from distdm.store import run_chunked

    a, b = RunStore(tmp_path / "run"), RunStore(tmp_path / "run")
    other = _Job()

    class FinishesEverythingElsewhere(_Job):
        def __call__(self, slices, executor):
            out = super().__call__(slices, executor)
            if len(self.calls) == 1:  # meanwhile another process runs the whole job
                run_chunked(b, "job", {}, 10, 4, other)
            return out

    first = FinishesEverythingElsewhere()
    bar = StageProgress("job", 30)
    got = run_chunked(a, "job", {}, 10, 4, first, progress=bar, work_per_item=3)
    assert _equal(got, _expected())
    assert first.calls == [([(0, 4)], False)]  # chunks 1 and 2 were loaded, not computed again
    assert bar.done == 6 * 3  # the loaded chunks count as done; compute reports its own
    assert len(other.calls) == 3


def test_flags_of_other_settings_do_not_count_and_reset_forgets_jobs(tmp_path):
    from distdm.store import ChunkedJob, run_chunked

    store = RunStore(tmp_path / "run")
    run_chunked(store, "retrain/loo/seed0", {"masks": "m1"}, 10, 5, _Job())
    assert ChunkedJob("retrain/loo/seed0", {"masks": "m1"}, 10, 5).complete(store)
    assert not ChunkedJob("retrain/loo/seed0", {"masks": "m2"}, 10, 5).is_done(store, 0)
    assert not ChunkedJob("retrain/loo/seed0", {"masks": "m1"}, 9, 5).is_done(store, 1)  # 4 rows, not 5
    assert ChunkedJob.recorded(store, "retrain/loo/seed0", 10) == ChunkedJob(
        "retrain/loo/seed0", {"masks": "m1"}, 10, 5
    )
    store.reset("retrain")  # the job's settings go with its chunks: other masks can be run now
    assert store.config("retrain/loo/seed0") is None and not store.has("retrain/loo/seed0/chunk0.safetensors")
    job = _Job()
    run_chunked(store, "retrain/loo/seed0", {"masks": "m2"}, 10, 5, job)
    assert len(job.calls) == 2


def test_chunked_job_refuses_bad_arguments_and_bad_results(tmp_path):
    from distdm.store import run_chunked

    store = RunStore(tmp_path / "run")
    for kwargs, match in (
        ({"n_items": 0}, "at least one item"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"name": "../x"}, "relative name"),
        ({"identity": {"chunk_size": 3}}, "identity"),
    ):
        args = {"name": "job", "identity": {}, "n_items": 10, "chunk_size": 4, **kwargs}
        with pytest.raises(DistdmError, match=match):
            run_chunked(store, args["name"], args["identity"], args["n_items"], args["chunk_size"], _Job())
    with pytest.raises(DistdmError, match="4 rows leading"):
        run_chunked(store, "job", {}, 10, 4, lambda slices, ex: {"a": torch.zeros(3)})


def test_results_index_lists_results_by_kind_and_forgets_them_on_reset(tmp_path):
    from distdm.store import CHUNKED_JOB, run_chunked

    store = RunStore(tmp_path / "run")
    run_chunked(store, "retrain/loo/seed0", {"masks": "m"}, 10, 4, _Job())
    store.save_tensors("synset/kmeans-abc", {"x": torch.ones(2)})
    store.save_json("synset/kmeans-abc", {"forgetting": 0.1})
    store.record_result(
        "synset/kmeans-abc", "synset", ["synset/kmeans-abc.safetensors", "synset/kmeans-abc.json"],
        {"kind": "kmeans"}, seconds=2.0,
    )  # fmt: skip
    reopened = RunStore(tmp_path / "run")
    (job,) = reopened.index(CHUNKED_JOB)
    assert job.name == "retrain/loo/seed0" and job.identity == {"masks": "m", "chunk_size": 4}
    assert job.files == tuple(f"retrain/loo/seed0/chunk{i}.safetensors" for i in range(3))
    assert job.info["items"] == 10 and job.info["chunks"] == 3
    (syn,) = reopened.index("synset")
    assert syn.info == {"seconds": 2.0} and reopened.result("synset/kmeans-abc") == syn
    assert [r.name for r in reopened.index()] == ["retrain/loo/seed0", "synset/kmeans-abc"]
    with pytest.raises(DistdmError, match="save them first"):
        reopened.record_result("x", "synset", ["nothing.json"])
    (store.root / "synset/kmeans-abc.json").unlink()
    assert reopened.index("synset") == []  # a result with a missing file is not listed
    reopened.reset("retrain")
    assert reopened.index(CHUNKED_JOB) == [] and "retrain/loo/seed0" not in reopened.manifest["results"]
    assert reopened.index() == []  # the job was reset, the synset lost a file


def test_a_run_without_an_index_still_opens_and_a_damaged_index_is_refused(tmp_path):
    store = RunStore(tmp_path / "run")
    m = json.loads((store.root / "manifest.json").read_text())
    assert "results" not in m  # made before any result was indexed
    assert RunStore(tmp_path / "run").index() == []
    m["results"] = {"x": {"kind": "synset"}}
    (store.root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DistdmError, match="results"):
        RunStore(tmp_path / "run")


def test_a_distilled_synset_is_indexed_and_loaded_instead_of_distilled_again(
    mini_task, tmp_path, monkeypatch
):
    import distdm.attribution.ddm as ddm_module
    from distdm.config import DistillConfig

    task = mini_task
    cfg = DistillConfig(iterations=2, starts=1, step=1)
    syn = ddm_module.load_or_distill(task, cfg, task.clusters, 0.1, 2, store=RunStore(tmp_path / "run"))
    key = ddm_module.synset_key(cfg, task.clusters, 0.1, 2)
    (entry,) = RunStore(tmp_path / "run").index(ddm_module.SYNSET)
    assert entry.name == key and set(entry.files) == {f"{key}.json", f"{key}.safetensors"}
    assert entry.identity["steps"] == 2 and entry.identity["settings"]["iterations"] == 2

    def no_distill(*args, **kwargs):
        raise AssertionError("distilled although the synset was cached")

    monkeypatch.setattr(ddm_module, "distill", no_distill)
    again = ddm_module.load_or_distill(task, cfg, task.clusters, 0.1, 2, store=RunStore(tmp_path / "run"))
    before, after = syn.to_tensors(), again.to_tensors()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # a synset cached before the index existed is indexed when it is next loaded
    store = RunStore(tmp_path / "run")
    with store._mutate("forget the index") as m:
        m.pop("results")
    ddm_module.load_or_distill(task, cfg, task.clusters, 0.1, 2, store=store)
    assert [r.name for r in store.index(ddm_module.SYNSET)] == [key]


def test_a_cached_result_is_computed_once_per_identity_and_indexed(tmp_path):
    from distdm.store import cached_tensors

    store = RunStore(tmp_path / "run")
    calls = []

    def train():
        calls.append(1)
        return {"w": torch.full((3,), float(len(calls)))}

    first = cached_tensors(store, "compare/mlp", {"lr": 0.1}, train, kind="compare-model", variant="mlp")
    again = cached_tensors(
        RunStore(tmp_path / "run"), "compare/mlp", {"lr": 0.1}, train, kind="compare-model"
    )
    assert len(calls) == 1 and torch.equal(first["w"], again["w"])
    (entry,) = store.index("compare-model")
    assert entry.identity == {"lr": 0.1} and entry.info["variant"] == "mlp" and entry.info["seconds"] >= 0
    assert store.is_done("compare/mlp") and store.has("compare/mlp.safetensors")
    other = cached_tensors(store, "compare/mlp", {"lr": 0.2}, train, kind="compare-model")
    assert len(calls) == 2 and other["w"][0] == 2.0  # a flag of other settings does not count
    assert cached_tensors(None, "compare/mlp", {"lr": 0.2}, train, kind="compare-model")["w"][0] == 3.0


def test_retrain_chunks_flagged_before_the_runner_are_still_read(tmp_path):
    from distdm.store import run_chunked

    store = RunStore(tmp_path / "run")
    store.check_config(
        "retrain/loo/seed0", {"masks": "m", "variants": 10, "unit": "cluster", "chunk_size": 5}
    )
    for i in range(2):  # what retrain_masks wrote before: the states, then a flag with its row count
        store.save_tensors(
            f"retrain/loo/seed0/chunk{i}", {k: v[5 * i : 5 * i + 5] for k, v in _expected().items()}
        )
        store.mark_done(f"retrain/loo/seed0/chunk{i}", seconds=1.0, variants=5)
    job = _Job()
    identity = {"masks": "m", "variants": 10, "unit": "cluster"}
    assert _equal(run_chunked(store, "retrain/loo/seed0", identity, 10, 5, job), _expected())
    assert job.calls == []
    store.mark_done("retrain/loo/seed0/chunk1", seconds=1.0, variants=4)  # another row count: not ours
    assert _equal(run_chunked(store, "retrain/loo/seed0", identity, 10, 5, job), _expected())
    assert job.calls == [([(5, 10)], False)]
