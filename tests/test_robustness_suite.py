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


def test_ddm_over_seeds_averages_the_default_draws_and_shares_of_the_best_if() -> None:
    res = _result({
        "ddm": {"spearman_class": 0.6, "lds": 0.7},
        "ddm@seed1": {"spearman_class": 0.9, "lds": 0.7},
        "ddm@seed2": {"error": "x", "spearman_class": 0.0},
        "ddm@steps50": {"spearman_class": 0.99, "lds": 0.99},  # a variant, not a draw of the default
        "if-cg": {"spearman_class": 0.5, "lds": 0.7},
        "if-cg@d=0.1": {"spearman_class": 0.8, "lds": 0.5},
    })  # fmt: skip
    got = rb.ddm_over_seeds(res)
    want = {"mean": 0.75, "min": 0.6, "max": 0.9, "n": 2, "share": 0.9375}
    assert got["spearman_class"] == pytest.approx(want)
    assert got["lds"]["share"] == pytest.approx(1.0)
    table = rb.ddm_table([res])
    assert "0.750 (0.600-0.900) (0.94) / 0.700 (0.700-0.700) (1.00), 2 seeds" in table
    assert "ddm@seed1 |" not in table.splitlines()[0]  # draws are summarised, not columns
    notes = rb.findings([res])
    assert any("DDM within class 0.600" in n and "over 2 distillation seeds 0.750 = 0.94" in n for n in notes)
    assert rb.ddm_over_seeds(_result({"if-cg": {"spearman_class": 0.5}})) == {}


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

    class PerLayer:
        damping = "auto"
        damping_ = {"body.0": 0.1, "head": 0.3}  # EK-FAC: one per layer, reported as their mean

    assert rb.chosen_damping(PerLayer()) == pytest.approx(0.2)
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
    methods = ["grad-dot", "if-exact", "random"]
    kw = {"queries": 6, "lds_subsets": 8, "methods": methods, "log": lambda _: None}
    res = rb.run_setting(setting, tmp_path, **kw)
    assert res["done"] and res["n_units"] == 6
    sweep = {f"if-exact{c}@d={d:g}" for d in rb.SWEEP for c in ("", "@hessian")}
    assert {"grad-dot", "random", "if-exact", "if-exact@hessian"} | sweep == set(res["rows"])
    assert (
        res["rows"]["if-exact"]["curvature"] == "ggn"
        and res["rows"]["if-exact@hessian"]["curvature"] == "hessian"
    )
    assert all("error" not in r for r in res["rows"].values())
    assert -1 <= res["ceiling"]["spearman"] <= 1 and res["rows"]["if-exact@d=0.1"]["damping"] == 0.1
    saved = json.loads((tmp_path / "tiny.json").read_text())
    # a finished setting is read back, not recomputed; a half-done one keeps its finished rows
    saved["rows"]["grad-dot"]["marker"] = 1
    del saved["rows"]["random"]
    saved["done"] = False
    (tmp_path / "tiny.json").write_text(json.dumps(saved))
    again = rb.run_setting(setting, tmp_path, **kw)
    assert again["rows"]["grad-dot"]["marker"] == 1 and again["done"] and "random" in again["rows"]
    # another method joins the same file and truth; the rows already there are kept, not recomputed
    more = rb.run_setting(setting, tmp_path, **{**kw, "methods": ["grad-cos"]})
    assert more["rows"]["grad-dot"]["marker"] == 1 and "grad-cos" in more["rows"]
    assert len(list(tmp_path.glob("run-tiny-*"))) == 1
    table = rb.setting_table(again)
    body = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [line.split(" | ")[0][2:] for line in body] == [rb.CEILING, *again["rows"]]


def test_plan_sweeps_every_influence_default_from_its_own_fitted_row() -> None:
    plan = rb.method_plan(10, False, ["fastif", "if-cg", "ddm"], {"fastif": {"depth": 50}})
    assert plan["fastif[depth=50]"] == ("fastif", {"depth": 50}, None)
    assert plan["fastif[depth=50]@d=0.3"] == ("fastif", {"depth": 50, "damping": 0.3}, "fastif[depth=50]")
    # the small model's Hessian reference is if-exact, not in this plan
    assert plan["if-cg@d=3"][2] == "if-cg" and not any("@hessian@d=" in label for label in plan)
    # every default with a curvature is also run on the Hessian, once
    assert plan["if-cg@hessian"] == ("if-cg", {"curvature": "hessian"}, None)
    assert plan["fastif[depth=50]@hessian"] == ("fastif", {"depth": 50, "curvature": "hessian"}, None)
    big = rb.method_plan(10**6, False, ["if-cg"])
    assert big["if-cg@hessian"] == ("if-cg", {"curvature": "hessian"}, None)
    assert big["if-cg@hessian@d=0.1"] == ("if-cg", {"curvature": "hessian", "damping": 0.1}, "if-cg@hessian")
    assert plan["ddm@ggn"] == ("ddm", {"progress": False, "distill": {"curvature": "ggn"}}, None)
    # DDM is not swept: its one fixed-damping row is the default before issue 15, fitted on its own
    assert plan["ddm@d=0.01"] == ("ddm", {"progress": False, "distill": {"damping": 0.01}}, None)
    assert [label for label in plan if label.startswith("ddm@d=")] == ["ddm@d=0.01"]


def test_damping_shares_and_the_finding_below_the_bar() -> None:
    res = _result({
        "if-cg": {"spearman_class": 0.45, "lds": 0.8, "damping": 0.2},
        "if-cg@d=0.01": {"spearman_class": 0.1, "lds": 0.4, "damping": 0.01},
        "if-cg@d=1": {"spearman_class": 0.6, "lds": 0.7, "damping": 1.0},
        "if-cg@d=3": {"error": "diverged"},
        "grad-dot": {"spearman_class": 0.9, "lds": 0.9},
    })  # fmt: skip
    e = rb.damping_shares(res)["if-cg"]
    assert e["class"] == pytest.approx(0.75) and e["best_class"] == 1.0
    assert e["lds"] == pytest.approx(1.0) and e["best_lds"] == 0.2  # the default itself is the best
    notes = rb.findings([res])
    assert any("if-cg within class at 0.75 of its best damping" in n for n in notes)
    assert not any("if-cg LDS at" in n for n in notes)
    assert "1 of 1" not in rb.damping_table([res]) and "0 of 1" in rb.damping_table([res])


def test_several_settings_run_one_process_each_with_the_same_arguments(tmp_path, monkeypatch) -> None:
    calls, reads = [], []
    monkeypatch.setattr(rb.subprocess, "run", lambda cmd, check: calls.append(cmd))
    monkeypatch.setattr(
        rb, "run_setting", lambda setting, out, **kw: reads.append((setting.name, kw["compute"]))
    )
    monkeypatch.setattr(rb, "plot_shares", lambda results, path: path)
    out = str(tmp_path / "suite")
    rb.main(
        [
            "--settings",
            "wine-mlp-samples,noisy-mlp-sgd",
            "--methods",
            "grad-dot",
            "--threads",
            "1",
            "--out",
            out,
        ]
    )
    assert [c[c.index("--settings") + 1] for c in calls] == ["wine-mlp-samples", "noisy-mlp-sgd"]
    for c in calls:
        assert (
            "--in-process" in c
            and c[c.index("--out") + 1] == out
            and c[c.index("--methods") + 1] == "grad-dot"
        )
    # the parent only reads what the children cached, for its report
    assert reads == [("wine-mlp-samples", False), ("noisy-mlp-sgd", False)]
    calls.clear(), reads.clear()
    rb.main(["--settings", "wine-mlp-samples,noisy-mlp-sgd", "--in-process", "--out", out])
    assert calls == [] and reads == [("wine-mlp-samples", True), ("noisy-mlp-sgd", True)]


def test_crossfit_best_picks_on_the_other_queries_so_pure_noise_has_no_winner_bonus() -> None:
    # a row that is best on every query is found, and its value is kept
    good = {"lds_q": [0.9, 0.8, 0.9, 0.8]}
    bad = {"lds_q": [0.1, 0.2, 0.1, 0.2]}
    assert rb.crossfit_best([bad, good], "lds") == pytest.approx(0.85)
    # each row wins on one fold only: the pick made on the other fold scores the loser there
    a = {"lds_q": [1.0, 0.0, 1.0, 0.0]}
    b = {"lds_q": [0.0, 1.0, 0.0, 1.0]}
    assert max(np.mean(a["lds_q"]), np.mean(b["lds_q"])) == 0.5
    assert rb.crossfit_best([a, b], "lds") == pytest.approx(0.0)
    # many equally good noisy rows: the plain maximum is biased up, the cross-fitted one is not
    # (8 rows, 60 queries, sd 0.3: the maximum of 8 means is ~1.4 standard errors = +0.055 high)
    rng = np.random.default_rng(0)
    plain, fitted = [], []
    for _ in range(100):
        rows = [{"lds_q": list(rng.normal(0.5, 0.3, 60))} for _ in range(8)]
        plain.append(max(np.mean(r["lds_q"]) for r in rows))
        fitted.append(rb.crossfit_best(rows, "lds"))
    assert np.mean(plain) > 0.54 and abs(np.mean(fitted) - 0.5) < 0.01
    assert math.isnan(rb.crossfit_best([good, {"lds": 0.3}], "lds"))  # a row without per-query values


def test_damping_shares_report_the_cross_fitted_share_beside_the_oracle() -> None:
    res = _result({
        "if-cg": {"spearman_class": 0.5, "lds": 0.5, "damping": 0.2,
                  "spearman_class_q": [0.5, 0.5], "lds_q": [0.5, 0.5]},
        "if-cg@d=1": {"spearman_class": 0.5, "lds": 0.6, "damping": 1.0,
                      "spearman_class_q": [1.0, 0.0], "lds_q": [0.6, 0.6]},
        "if-cg@d=3": {"spearman_class": 0.5, "lds": 0.4, "damping": 3.0,
                      "spearman_class_q": [0.0, 1.0], "lds_q": [0.4, 0.4]},
    })  # fmt: skip
    e = rb.damping_shares(res)["if-cg"]
    assert e["lds"] == pytest.approx(0.5 / 0.6) and e["lds_cv"] == pytest.approx(0.5 / 0.6)
    # within class the sweep's rows win on one query each; picked on the other query they score 0,
    # so the cross-fitted best is 0 (no share) while the plain maximum ties the default
    assert e["class"] == pytest.approx(1.0) and math.isnan(e["class_cv"])
    assert "[cv - / 0.83]" in rb.damping_table([res])
    # d=1 is best on LDS and ties within class: one damping reaches both bests
    assert e["joint"] == pytest.approx(1.0)
    res["rows"]["if-cg@d=1"]["spearman_class"] = 0.4
    res["rows"]["if-cg@d=3"]["spearman_class"] = 0.6
    # now d=3 is best within class but at 0.4 / 0.6 on LDS, d=1 the reverse: the default's 0.5 / 0.6
    # on both is the most one damping reaches
    assert rb.damping_shares(res)["if-cg"]["joint"] == pytest.approx(0.5 / 0.6)


def test_damping_factor_script_refuses_unknown_settings_and_factors_at_or_below_one(tmp_path) -> None:
    import damping_factor

    with pytest.raises(rb.DistdmError, match="unknown settings"):
        damping_factor.main(["--settings", "nope", "--out", str(tmp_path)])
    with pytest.raises(rb.DistdmError, match="singular"):
        damping_factor.main(["--settings", "noisy-mlp-sgd", "--factors", "1,2", "--out", str(tmp_path)])
    with pytest.raises(rb.DistdmError, match="> 0 for training-time"):
        damping_factor.main(
            [
                "--of",
                "training-time",
                "--settings",
                "noisy-mlp-sgd",
                "--factors",
                "0,1",
                "--out",
                str(tmp_path),
            ]
        )
