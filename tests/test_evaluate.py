import numpy as np
import pytest

from distdm.attribution import make_attributor
from distdm.attribution.retrain import ExactRetrain
from distdm.errors import DistdmError
from distdm.evaluate import CEILING, evaluate, to_csv, to_markdown
from distdm.metrics import spearman


@pytest.fixture(scope="module")
def evaluation(mini_task, queries):
    x, y = queries
    methods = {
        "exact": ExactRetrain(seeds=(0, 1)),
        "random": make_attributor("random"),
        "clustering": make_attributor("clustering", features="input"),
    }
    ev = evaluate(
        mini_task, methods, (x[:8], y[:8]), truth=methods["exact"], lds_subsets=12, removal_ks=(1, 4)
    )
    return ev, methods


def test_table_has_every_method_the_ceiling_and_the_columns(evaluation):
    ev, methods = evaluation
    assert [r["method"] for r in ev.rows] == ["exact", "random", "clustering", CEILING]
    for r in ev.rows:
        for key in ("dist1_x100", "dist2", "dist3", "spearman", "spearman_class", "lds", "top1_in_top3"):
            assert key in r and f"{key}_lo" in r and f"{key}_hi" in r
        assert r["n_queries"] == 8
        assert r["drop_at_1"] == ev.curves[r["method"]]["drop"][0].mean
    assert ev.rows[1]["offline_s"] == methods["random"].offline_seconds_
    assert ev.rows[0]["online_s"] > 0


def test_truth_agrees_with_itself_and_the_ceiling_is_seed_zero_against_seed_one(evaluation, queries):
    ev, methods = evaluation
    exact, ceiling = ev.rows[0], ev.rows[-1]
    assert exact["spearman"] == pytest.approx(1.0)
    assert exact["top1_in_top3"] == 1.0
    per_seed = methods["exact"].per_seed_scores(queries[0][:8], queries[1][:8], "margin")
    assert ceiling["spearman"] == pytest.approx(spearman(per_seed[0], per_seed[1]).mean)
    # the oracle picks the cluster whose removal moves the prediction most: no method beats it
    for r in ev.rows[1:]:
        assert r["dist1_x100"] <= exact["dist1_x100"] + 1e-9


def test_writers_and_figure(evaluation, tmp_path):
    ev, _ = evaluation
    md = to_markdown(ev.rows)
    assert md.splitlines()[0].startswith("| method | dist1_x100")
    assert len(md.splitlines()) == 2 + len(ev.rows)
    csv_text = to_csv(ev.rows)
    header = csv_text.splitlines()[0].split(",")
    assert "spearman_lo" in header and "lds" in header
    assert len(csv_text.splitlines()) == 1 + len(ev.rows)
    paths = ev.save(tmp_path, "q")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths["md"].read_text().strip() == md


def test_every_printed_column_is_explained_once_and_intervals_stay_in_range(evaluation):
    from distdm.evaluate import COLUMN_HELP, columns, legend

    ev, _ = evaluation
    cols = columns(ev.rows)
    lines = legend(ev.rows)
    assert lines[0].startswith("mean over 8 queries [95% Student-t interval")
    for c in cols:
        key = "drop_at_K" if c.startswith("drop_at_") else c
        assert key in COLUMN_HELP
        assert sum(COLUMN_HELP[key] in line for line in lines) == 1, c
    assert "drop_at_1, drop_at_4: " in "\n".join(lines)
    ranges = {"spearman": (-1, 1), "spearman_class": (-1, 1), "pearson": (-1, 1), "lds": (-1, 1),
              "top1_in_top3": (0, 1), "dist3": (1 / 3, 1), "dist1_x100": (0, 200),
              "dist2": (0, np.inf)}  # fmt: skip
    for r in ev.rows:
        for key, (lo, hi) in ranges.items():
            if not np.isnan(r[f"{key}_lo"]):
                assert lo <= r[f"{key}_lo"] <= r[key] <= r[f"{key}_hi"] <= hi, (r["method"], key)
    # exact against itself hits for every query: the interval is [1, 1]
    assert (ev.rows[0]["top1_in_top3_lo"], ev.rows[0]["top1_in_top3_hi"]) == (1.0, 1.0)


def test_mismatched_queries_are_rejected(mini_task, queries):
    with pytest.raises(DistdmError, match="labels"):
        evaluate(mini_task, {}, (queries[0][:3], queries[1][:2]), truth=ExactRetrain())
