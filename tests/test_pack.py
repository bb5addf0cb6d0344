"""Synset packs: export from a run, answer from the pack and the model alone, refuse what changed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from distdm.cli import app
from distdm.config import TrainConfig
from distdm.errors import DistdmError
from distdm.pack import MANIFEST, SYNSET_FILE, export_pack, load_pack, model_from_pack
from distdm.run import Run

# a cheap influence synset: the default preset with a small eigenbasis and few input steps
CHEAP = {"hessian_rank": 20, "input_steps": 6}


@pytest.fixture(scope="module")
def made(tmp_path_factory, digits):
    """A tiny run from a data file (300 digits, MLP 64-16-10, 3 epochs, 2 clusters per class), its pack
    and the target's weights file."""
    root = tmp_path_factory.mktemp("pack")
    path = root / "d.npz"
    np.savez(
        path,
        x_train=digits.x_train[:300].numpy(),
        y_train=digits.y_train[:300].numpy(),
        x_test=digits.x_test[:40].numpy(),
        y_test=digits.y_test[:40].numpy(),
    )
    r = Run(root / "run", path, "mlp", train=TrainConfig(epochs=3, lr=0.1, batch_size=32),
            model_kwargs={"hidden": [16]})  # fmt: skip
    r.train()
    r.cluster(per_class=2, n_init=2)
    out = export_pack(r, root / "pack", distill=CHEAP, labels={0: "zeros, round"})
    weights = root / "target.safetensors"
    save_file({k: v.contiguous() for k, v in r.task().final.items()}, str(weights))
    x, y, _ = r.queries(12)
    return r, out, weights, x, y


def _target(r: Run) -> torch.nn.Module:
    m = r.model
    m.load_state_dict(r.task().final)
    return m


def test_pack_holds_metadata_and_no_training_data(made, digits):
    r, out, _, _, _ = made
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, SYNSET_FILE]
    pack = load_pack(out)
    k = r.clusters().n_clusters
    assert pack.n_clusters == k
    assert pack.cluster_class.tolist() == r.clusters().cluster_class.tolist()
    assert pack.cluster_size.tolist() == r.clusters().sizes().tolist()
    assert pack.cluster_labels[0] == "zeros, round" and pack.cluster_labels[1] is None
    assert pack.manifest["preset"] == "default" and pack.manifest["distill"]["hessian_rank"] == 20
    # the synset file holds the synset and nothing else; no training row appears in it
    from safetensors.torch import load_file

    t = load_file(str(out / SYNSET_FILE))
    assert set(t) == {"x", "y", "cluster", "scale", "lr_steps"}
    xs = t["x"].flatten(1)
    d = torch.cdist(xs.double(), digits.x_train[:300].flatten(1).double()).min(1).values
    assert bool((d > 1e-6).all())  # no synthetic input is a copy of a training image


def test_pack_scores_equal_run_scores_and_unlearn(made):
    r, out, _, x, y = made
    want = r.attributor("ddm", distill=CHEAP).scores(x, y, "dist1")
    pack = load_pack(out)
    got = pack.attribute(_target(r), x, y, "dist1")
    np.testing.assert_allclose(got.values, want.values, rtol=1e-5, atol=1e-7)
    assert got.unit_size.tolist() == r.clusters().sizes().tolist()
    state = pack.unlearn(_target(r), [0, 3])
    assert any(not torch.equal(state[k], r.task().final[k]) for k in state)
    g = pack.diagnose(_target(r), x, y)
    assert g.shape == (pack.n_clusters,) and np.isfinite(g).all()


def test_fresh_process_without_run_or_data_gets_the_same_scores(made, tmp_path):
    r, out, weights, x, y = made
    want = r.attributor("ddm", distill=CHEAP).scores(x, y, "dist1").values
    shared = tmp_path / "shared"
    shutil.copytree(out, shared / "pack")
    shutil.copy(weights, shared / "target.safetensors")
    save_file({"x": x.contiguous(), "y": y.contiguous()}, str(shared / "queries.safetensors"))
    # a copy of the run, deleted before the fresh process starts: it cannot read the run or its data
    run_copy = tmp_path / "run-copy"
    shutil.copytree(r.path, run_copy)
    shutil.rmtree(run_copy)
    script = textwrap.dedent(
        """
        import sys, torch
        from safetensors.torch import load_file, save_file
        from distdm.pack import load_pack, model_from_pack
        pack = load_pack("pack")
        model = model_from_pack(pack, "target.safetensors")
        q = load_file("queries.safetensors")
        s = pack.attribute(model, q["x"], q["y"], "dist1")
        save_file({"scores": torch.as_tensor(s.values)}, "scores.safetensors")
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", script], cwd=shared, capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    from safetensors.torch import load_file

    got = load_file(str(shared / "scores.safetensors"))["scores"].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_changed_model_is_refused(made):
    r, out, _, x, y = made
    pack = load_pack(out)
    m = _target(r)
    with torch.no_grad():
        next(m.parameters())[0, 0] += 1e-3
    with pytest.raises(DistdmError, match="not those of the target model"):
        pack.attribute(m, x, y)
    with pytest.raises(DistdmError, match="not those of the target model"):
        pack.unlearn(m, [0])


@pytest.mark.parametrize("victim", [SYNSET_FILE, MANIFEST])
def test_flipped_byte_is_refused_naming_the_file(made, tmp_path, victim):
    _, out, _, _, _ = made
    dst = tmp_path / "p"
    shutil.copytree(out, dst)
    f = dst / victim
    b = bytearray(f.read_bytes())
    # a byte in the middle: tensor data of the synset, a value inside the manifest
    i = len(b) // 2
    while victim == MANIFEST and not chr(b[i]).isdigit():
        i += 1
    b[i] = (b[i] + 1) % 256 if victim == SYNSET_FILE else ord("7" if chr(b[i]) != "7" else "3")
    f.write_bytes(bytes(b))
    with pytest.raises(DistdmError, match=victim):
        load_pack(dst)


def test_truncated_or_missing_file_is_refused(made, tmp_path):
    _, out, _, _, _ = made
    dst = tmp_path / "p"
    shutil.copytree(out, dst)
    f = dst / SYNSET_FILE
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(DistdmError, match=rf"{SYNSET_FILE} has \d+ bytes.*truncated"):
        load_pack(dst)
    f.unlink()
    with pytest.raises(DistdmError, match="missing"):
        load_pack(dst)
    (dst / MANIFEST).unlink()
    with pytest.raises(DistdmError, match="not a synset pack"):
        load_pack(dst)


def test_export_refuses_a_directory_with_other_files(made, tmp_path):
    r, _, _, _, _ = made
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DistdmError, match="other files"):
        export_pack(r, tmp_path, distill=CHEAP)


def test_model_from_pack_refuses_foreign_weights(made, tmp_path):
    _, out, _, _, _ = made
    bad = tmp_path / "w.safetensors"
    save_file({"nothing": torch.zeros(2)}, str(bad))
    with pytest.raises(DistdmError, match="do not fit"):
        model_from_pack(load_pack(out), bad)


def test_cli_export_and_attribute_from_pack(made, tmp_path):
    r, _, weights, x, y = made
    runner = CliRunner()
    # the CLI exports the run's own default synset (distilled here if not stored)
    res = runner.invoke(app, ["export", r.path, "--out", str(tmp_path / "pk")])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "pk" / MANIFEST).read_text())
    assert manifest["preset"] == "default" and len(manifest["clusters"]) == r.clusters().n_clusters
    np.savez(tmp_path / "q.npz", x=x.numpy(), y=y.numpy())
    args = ["attribute", "--pack", str(tmp_path / "pk"), "--model", str(weights),
            "--queries-file", str(tmp_path / "q.npz"), "--top", "2"]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "top clusters" in res.output
    want = r.attributor("ddm").scores(x, y, "dist1").values
    got = load_file_scores(tmp_path / "q.scores.safetensors")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    # a model of other weights: refused with status 2 and a one-line message
    m = _target(r)
    with torch.no_grad():
        next(m.parameters())[0, 0] += 1.0
    other = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(other))
    res = runner.invoke(app, args[:3] + ["--model", str(other)] + args[5:])
    assert res.exit_code == 2 and "not those of the target model" in res.output


def load_file_scores(path) -> np.ndarray:
    from safetensors.torch import load_file

    return load_file(str(path))["scores"].numpy()
