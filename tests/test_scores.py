"""Scores as a person and a program read them: top(k) as a table with class and size, pandas, and
a safetensors file that round-trips and refuses what it did not write."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from distdm.attribution import make_attributor
from distdm.errors import DistdmError
from distdm.scores import SIGN_CONVENTION, Scores, TopUnits

# 4 clusters x 3 queries; per query the order by score is known by construction
VALUES = np.array(
    [
        [0.5, -2.0, 0.0],
        [3.0, 1.0, -1.0],
        [-1.0, 4.0, 2.0],
        [2.0, 0.5, 1.5],
    ]
)
CLASS = np.array([0, 0, 1, 1])
SIZE = np.array([10, 20, 30, 40])


def _scores(**kw) -> Scores:
    return Scores(
        VALUES, "cluster", "margin", "hand", 1.25, **({"unit_class": CLASS, "unit_size": SIZE} | kw)
    )


def test_top_lists_rank_cluster_class_size_and_score_per_query():
    top = _scores().top(2)
    assert isinstance(top, TopUnits) and top.k == 2 and top.n_queries == 3
    np.testing.assert_array_equal(top.indices, [[1, 2, 2], [3, 1, 3]])
    np.testing.assert_array_equal(top.scores, [[3.0, 4.0, 2.0], [2.0, 1.0, 1.5]])
    np.testing.assert_array_equal(top.unit_class, [[0, 1, 1], [1, 0, 1]])
    np.testing.assert_array_equal(top.unit_size, [[20, 30, 30], [40, 20, 40]])
    rows = top.to_rows()
    assert [tuple(r) for r in rows][:1] == [("query", "rank", "cluster", "class", "size", "score")]
    assert rows[:2] == [
        {"query": 0, "rank": 1, "cluster": 1, "class": 0, "size": 20, "score": 3.0},
        {"query": 0, "rank": 2, "cluster": 3, "class": 1, "size": 40, "score": 2.0},
    ]
    assert rows[-1] == {"query": 2, "rank": 2, "cluster": 3, "class": 1, "size": 40, "score": 1.5}
    low = _scores().top(1, largest=False)
    np.testing.assert_array_equal(low.indices, [[2, 0, 1]])
    np.testing.assert_array_equal(low.scores, [[-1.0, -2.0, -1.0]])


def test_top_prints_as_a_table():
    text = str(_scores().top(2))
    lines = text.splitlines()
    assert lines[0] == "top 2 clusters per query by largest score (hand, objective margin)"
    assert lines[1].split() == ["query", "rank", "cluster", "class", "size", "score"]
    assert lines[2].split() == ["0", "1", "1", "0", "20", "+3"]
    assert len(lines) == 2 + 3 * 2 and repr(_scores().top(2)) == text
    # unknown class and size (a Scores built by hand) print as '?', not as a made-up number
    bare = str(Scores(VALUES, "cluster", "margin", "hand").top(1)).splitlines()
    assert bare[2].split() == ["0", "1", "1", "?", "?", "+3"]
    # many queries: the first ones are printed and the rest counted
    many = Scores(np.random.default_rng(0).normal(size=(5, 50)), "sample", "dist1", "x").top(1)
    assert many.columns[2] == "sample"
    assert str(many).splitlines()[-1] == "... 30 more queries (to_rows() lists all 50)"
    assert len(many.to_rows()) == 50


def test_top_renders_with_rich():
    from rich.console import Console

    console = Console(record=True, width=100)
    console.print(_scores().top(2))
    out = console.export_text()
    assert "top 2 clusters per query" in out and "cluster" in out and "+4" in out and "30" in out


@pytest.mark.parametrize("k", [0, -1, 1.5, True, "2", 5])
def test_top_refuses_a_bad_k(k):
    with pytest.raises(DistdmError, match="k"):
        _scores().top(k)


def test_unit_metadata_is_checked():
    with pytest.raises(DistdmError, match="unit_class must have one entry per unit"):
        _scores(unit_class=np.array([0, 1]))
    with pytest.raises(DistdmError, match="unit_size must hold integers"):
        _scores(unit_size=np.array([1.5, 2, 3, 4]))


def test_attributor_scores_name_each_units_class_and_size(tiny_task, queries):
    x, y = queries
    s = make_attributor("predict").fit(tiny_task).scores(x, y, "margin")
    np.testing.assert_array_equal(s.unit_class, tiny_task.clusters.cluster_class)
    np.testing.assert_array_equal(s.unit_size, tiny_task.clusters.sizes())
    top = s.top(3)
    np.testing.assert_array_equal(top.unit_class, tiny_task.clusters.cluster_class[top.indices])
    per_sample = (
        make_attributor("grad-dot", unit="sample", params="last").fit(tiny_task).scores(x, y, "margin")
    )
    np.testing.assert_array_equal(per_sample.unit_class, tiny_task.data.y_train.numpy())
    assert (per_sample.unit_size == 1).all()
    # summed into clusters: sizes counted, a cluster's class is its members' shared label
    summed = per_sample.to_clusters(tiny_task.clusters.assignment, tiny_task.clusters.n_clusters)
    np.testing.assert_array_equal(summed.unit_size, tiny_task.clusters.sizes())
    np.testing.assert_array_equal(summed.unit_class, tiny_task.clusters.cluster_class)


def test_to_clusters_marks_a_mixed_cluster_and_counts_members():
    s = Scores(np.eye(4), "sample", "margin", "x", unit_class=np.array([3, 3, 1, 2]))
    c = s.to_clusters(np.array([0, 0, 1, 1]), 3)
    np.testing.assert_array_equal(c.unit_class, [3, -1, -1])  # cluster 2 is empty: no class
    np.testing.assert_array_equal(c.unit_size, [2, 2, 0])
    np.testing.assert_array_equal(c.values, [[1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]])


def test_save_and_load_round_trip(tmp_path):
    s = _scores()
    path = s.save(tmp_path / "sub" / "scores.safetensors")
    assert [p.name for p in path.parent.iterdir()] == ["scores.safetensors"]  # no temporary file left
    back = Scores.load(path)
    np.testing.assert_array_equal(back.values, s.values)
    np.testing.assert_array_equal(back.unit_class, CLASS)
    np.testing.assert_array_equal(back.unit_size, SIZE)
    assert (back.unit, back.objective, back.method, back.seconds) == ("cluster", "margin", "hand", 1.25)
    bare = Scores.load(Scores(VALUES, "sample", "dist1", "m").save(tmp_path / "bare.safetensors"))
    assert bare.unit_class is None and bare.unit_size is None and bare.unit == "sample"
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        meta = json.loads(f.metadata()["distdm"])
    assert meta["sign_convention"] == SIGN_CONVENTION and meta["format"] == "distdm.scores"


def test_load_refuses_foreign_corrupt_and_missing_files(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"values": VALUES}, str(foreign))
    with pytest.raises(DistdmError, match="holds no distdm scores"):
        Scores.load(foreign)
    good = _scores().save(tmp_path / "good.safetensors")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(good.read_bytes()[:40])
    with pytest.raises(DistdmError, match="not a readable safetensors file"):
        Scores.load(broken)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(DistdmError, match="not a readable safetensors file"):
        Scores.load(garbage)
    with pytest.raises(DistdmError, match="no scores file"):
        Scores.load(tmp_path / "missing.safetensors")
    newer = tmp_path / "newer.safetensors"
    meta = {"format": "distdm.scores", "version": 99, "unit": "cluster", "objective": "m", "method": "x"}
    save_file({"values": VALUES}, str(newer), metadata={"distdm": json.dumps(meta)})
    with pytest.raises(DistdmError, match="version 99"):
        Scores.load(newer)


def test_to_pandas_long_and_wide():
    pd = pytest.importorskip("pandas")
    df = _scores().to_pandas()
    assert list(df.columns) == ["cluster", "query", "score", "class", "size"] and len(df) == 12
    row = df[(df["cluster"] == 2) & (df["query"] == 1)].iloc[0]
    assert row["score"] == 4.0 and row["class"] == 1 and row["size"] == 30
    assert df["class"].isna().sum() == 0
    assert Scores(VALUES, "cluster", "m", "x").to_pandas()["size"].isna().all()
    wide = _scores().to_pandas(wide=True)
    assert wide.shape == (4, 3) and wide.index.name == "cluster" and wide.loc[2, 1] == 4.0
    assert isinstance(wide, pd.DataFrame)


def test_to_pandas_without_pandas_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas now raises ImportError
    with pytest.raises(DistdmError, match=r"pip install 'distdm\[pandas\]'"):
        _scores().to_pandas()


def test_values_are_unchanged_float64():
    s = Scores(torch.ones(2, 3).numpy().astype(np.float32), "cluster", "m", "x")
    assert s.values.dtype == np.float64 and s.values.shape == (2, 3)
