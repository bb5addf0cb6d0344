"""The robustness suite's helpers (benchmarks/robustness.py): shares, findings, caching and resume."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import robustness as rb  # noqa: E402

from distdm.data import from_tensors  # noqa: E402
from distdm.engine import Schedule  # noqa: E402
from distdm.models import build_model  # noqa: E402


def _result(rows: dict, ceiling: dict | None = None) -> dict:
    return {"name": "s", "rows": rows, "ceiling": ceiling or {"spearman_class": 0.8, "lds": 0.8}}


def test_best_skips_random_and_failed_rows() -> None:
    res = _result({
        "random": {"spearman_class": 0.9},
        "broken": {"error": "x", "spearman_class": 0.95},
        "if-cg": {"spearman_class": 0.5},
        "ddm": {"spearman_class": 0.6},
    })  # fmt: skip
    assert rb.best(res, "spearman_class") == ("ddm", 0.6)
    assert rb.best(res, "spearman_class", rb.is_influence) == ("if-cg", 0.5)


def test_summary_shares_of_best_and_ceiling_leave_out_the_sweep() -> None:
    res = _result({
        "ddm": {"spearman_class": 0.4, "lds": 0.3},
        "if-exact": {"spearman_class": 0.2, "lds": 0.6},
        "if-exact@d=0.1": {"spearman_class": 0.8, "lds": 0.6},
    })  # fmt: skip
    sm = rb.summary([res])["s"]
    assert set(sm) == {"ddm", "if-exact"}  # sweep rows are references, not methods
    assert sm["ddm"]["class"] == pytest.approx(0.5)
    assert sm["ddm"]["lds"] == pytest.approx(0.5)
    assert sm["if-exact"]["class_ceiling"] == pytest.approx(0.25)
    assert math.isnan(rb.share(0.3, -0.1))


def test_findings_flag_ddm_short_of_the_best_if_and_a_dead_default() -> None:
    res = _result({
        "ddm": {"spearman_class": 0.5, "lds": 0.79},
        "if-exact": {"spearman_class": 0.02, "lds": 0.8, "damping": 0.01},
        "if-exact@d=0.3": {"spearman_class": 0.6, "lds": 0.8},
    })  # fmt: skip
    notes = rb.findings([res])
    assert any("DDM within class 0.500" in n and "0.83 of the best IF" in n for n in notes)
    assert not any("DDM LDS" in n for n in notes)  # 0.79 >= 0.95 * 0.8
    assert any("default if-exact within class 0.020" in n and "0.600" in n for n in notes)


def test_fit_info_and_damping_readers() -> None:
    class Syn:
        info = {"relative_error_median": 0.2, "layer_cosine": {"w": 0.9}, "curvature_share": 0.4, "x": 1}

    class M:
        synset_ = Syn()
        damping = 0.01
        damping_ = 0.25

    want = {"relative_error_median": 0.2, "layer_cosine": {"w": 0.9}, "curvature_share": 0.4}
    assert rb.ddm_fit_info(M()) == want
    assert rb.chosen_damping(M()) == 0.25
    assert rb.singletons(np.array([2, 0, 1])).cluster_class.tolist() == [2, 0, 1]


def test_run_setting_computes_every_row_and_resumes_from_its_json(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 4, generator=g)
    y = (x[:, 0] > 0).long()
    data = from_tensors(x, y, test=(x[:12] + 0.1, y[:12]))
    setting = rb.Setting(
        "tiny", "logreg on 48 points", lambda: data,
        lambda d: build_model("logreg", d.input_shape, 2, seed=0),
        Schedule(epochs=3, lr=0.1, batch_size=16), 3,
    )  # fmt: skip
    kw = {"queries": 6, "lds_subsets": 8, "methods": ["grad-dot", "random"], "log": lambda _: None}
    res = rb.run_setting(setting, tmp_path, **kw)
    assert res["done"] and res["n_units"] == 6
    assert {"grad-dot", "random", "if-exact@ggn"} <= set(res["rows"])
    assert all("error" not in r for r in res["rows"].values())
    assert -1 <= res["ceiling"]["spearman"] <= 1 and res["rows"]["if-exact@d=0.1"]["damping"] == 0.1
    saved = json.loads((tmp_path / "tiny.json").read_text())
    # a finished setting is read back, not recomputed; a half-done one keeps its finished rows
    saved["rows"]["grad-dot"]["marker"] = 1
    saved["done"] = False
    (tmp_path / "tiny.json").write_text(json.dumps(saved))
    again = rb.run_setting(setting, tmp_path, **kw)
    assert again["rows"]["grad-dot"]["marker"] == 1 and again["done"]
    table = rb.setting_table(again)
    body = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [line.split(" | ")[0][2:] for line in body] == [rb.CEILING, *again["rows"]]
