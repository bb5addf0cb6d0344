"""The single-file HTML report: every part of a run, nothing external, robust to missing or bad parts,
and it renders in a real browser."""

from __future__ import annotations

import base64
import html as html_lib
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from distdm.applications.diagnose import diagnose, diagnosis_files, save_outputs
from distdm.applications.noise import corrupt, corrupted_task, noisy_diagnosis
from distdm.applications.privacy import privacy_figure_png, privacy_table
from distdm.applications.transfer import transfer
from distdm.applications.unlearn import forgetting_table, rows_to_markdown, unlearn_report
from distdm.attribution import make_attributor
from distdm.config import ClusterConfig, DistillConfig, TrainConfig
from distdm.data import TensorData
from distdm.evaluate import COLUMNS, write_csv, write_markdown
from distdm.figures import bar_png
from distdm.report import APPLICATIONS, SECTIONS, csv_to_html, markdown_to_html, write_report
from distdm.run import Run
from distdm.synset import Synset

PNG = b"\x89PNG\r\n\x1a\n"
TC = TrainConfig(epochs=2, lr=0.1, batch_size=64)
MODEL = {"hidden": (16,)}


@pytest.fixture(scope="module")
def small(digits) -> TensorData:
    """400 training and 60 test digits: enough for every figure, fast to train."""
    return TensorData(
        digits.x_train[:400], digits.y_train[:400], digits.x_test[:60], digits.y_test[:60], 10, "d400"
    )


def _run(path: Path, data: TensorData) -> Run:
    return Run(path, data, "mlp", train=TC, model_kwargs=MODEL)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, small) -> Run:
    """Digits, MLP 64-16-10 for 2 epochs, 2 clusters per class, a short distillation, grad-dot scores
    saved as `distdm attribute` saves them, and an evaluation table and figure."""
    run = _run(tmp_path_factory.mktemp("report") / "run", small)
    run.train()
    run.cluster(ClusterConfig(per_class=2, n_init=1))
    syn = run.distill(
        config=DistillConfig(target="trajectory", starts=2, iterations=5, step=1, soft_labels=True)
    )
    x, y, idx = run.queries(8)
    s = run.attributor("grad-dot").scores(x, y, "margin")
    run.store.save_tensors(
        "attribution/grad-dot-margin-q8s0",
        {"scores": torch.as_tensor(s.values), "queries": torch.as_tensor(idx)},
    )
    rows = [{"method": "grad-dot", "spearman": 0.42, "spearman_lo": 0.3, "spearman_hi": 0.5, "lds": 0.61}]
    # every column of an evaluation table, each with its interval: as wide as the quality table gets
    for m in ("ddm", "ddm:paper", "if-cg", "grad-dot-long-method-name"):
        row: dict[str, object] = {"method": m}
        for c in COLUMNS[1:]:
            row |= {c: 123.456789, f"{c}_lo": -1234.5678, f"{c}_hi": 1234.5678}
        row |= {f"drop_at_{k}": 12.3456 for k in (1, 5, 10)}  # means only, as evaluate writes them
        rows.insert(0, row)  # the first row names the drop_at_ columns
    (run.store.root / "evaluation").mkdir()
    write_markdown(rows, run.store.root / "evaluation" / "quality.md")
    write_csv(rows, run.store.root / "evaluation" / "quality.csv")
    run.store.save_file("figures/extra-check.png", bar_png(["a", "b"], [1.0, 2.0], "extra figure", "x"))
    _application_outputs(run, syn)
    return run


def _application_outputs(run: Run, syn: Synset) -> None:
    """Small outputs of every application, made by the applications' own code as the CLI saves them."""
    task = run.task()
    fitted = {"grad-dot": run.attributor("grad-dot")}
    few = {"fractions": [0.2], "random_seeds": [0]}
    d = diagnose(task, fitted, **few)
    save_outputs(run.store, "applications/diagnose", diagnosis_files(d, run.data.x_train))
    c = corrupt(run.data, "labels", 0.2, seed=0)
    ctask = corrupted_task(task, c)
    rep = noisy_diagnosis(ctask, c, {"grad-dot": make_attributor("grad-dot").fit(ctask)}, **few)
    files = diagnosis_files(rep.diagnosis, c.data.x_train)
    files |= {"detection.csv": rep.to_csv(), "report.md": rep.to_markdown()}
    save_outputs(run.store, f"applications/diagnose-{c.tag}", files)
    save_outputs(run.store, "applications/transfer", transfer(task, fitted, **few).files())
    forget = rows_to_markdown(forgetting_table(task, {"custom": syn}))
    removed = unlearn_report(task, syn, [0, 1], retrain=False).to_markdown()
    save_outputs(
        run.store, "applications/unlearn", {"forgetting.md": forget, "clusters-0-1-custom.md": removed}
    )
    table = privacy_table({"custom": syn}, run.data)
    png = privacy_figure_png({"custom": syn}, run.data, task.clusters.cluster_class, n_rows=3)
    save_outputs(
        run.store, "applications/privacy", {"metrics.json": json.dumps(table), "nearest-real.png": png}
    )


@pytest.fixture(scope="module")
def full_report(full_run) -> Path:
    """The full run's report, written once (default path)."""
    return write_report(full_run)


def _images(text: str) -> list[bytes]:
    return [
        base64.b64decode(m) for m in re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([^"]+)"', text)
    ]


def _assert_self_contained(text: str) -> None:
    assert text.startswith("<!DOCTYPE html>")
    for bad in ("http://", "https://", "<script", "<link", "<iframe", "url(", 'src="/', "src='"):
        assert bad not in text, bad
    assert text.count("<img") == len(_images(text))  # every image is an embedded PNG
    assert all(png.startswith(PNG) for png in _images(text))


def test_report_of_a_fresh_run_says_what_is_not_computed_yet(tmp_path, small):
    path = write_report(_run(tmp_path / "fresh", small))
    assert path == tmp_path / "fresh" / "report.html"
    text = path.read_text()
    _assert_self_contained(text)
    for sid, title in SECTIONS:
        assert f'<section id="{sid}"><h2>{title}</h2>' in text
    for what in (
        "The target model",
        "Clusters",
        "Synsets",
        "Attribution scores",
        "Evaluation against exact retraining",
    ):
        assert f"{what}: not computed yet" in text
    assert "distdm train RUN" in text  # says what to run
    for sid, title, *_ in APPLICATIONS:  # each application says how to compute it
        body = _section(text, sid)
        assert f"{title}: not computed yet" in body and "Run <code>distdm " in body


def _section(text: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', text, re.S)
    assert m, sid
    return m.group(1)


def test_applications_get_titled_sections_not_file_paths(full_report):
    text = full_report.read_text()
    _assert_self_contained(text)
    for sid, title, *_ in APPLICATIONS:
        body = _section(text, sid)
        assert f'<section id="{sid}"><h2>{title}</h2>' in text
        assert "not computed yet" not in body and 'class="error"' not in body, sid
        assert "<img" in body or sid == "unlearn", sid  # every application with a figure shows it
    assert not re.search(r"<h[34]>[^<]*applications/", text)  # captions, not paths, as headings
    assert "applications/" not in _section(text, "evaluation")  # shown once, in its own section
    diag = _section(text, "diagnose")
    assert "<h3>Members of the most harmful clusters by grad-dot</h3>" in diag
    assert "the 10 clusters whose removal lowers the validation loss most" in diag  # from diagnose.json
    assert "<th>rank</th><th>cluster</th><th>class</th><th>size</th><th>score</th>" in diag
    noise = _section(text, "noise")
    assert '<h3 class="corruption">Flipped labels on 20% of the training samples (seed 0)</h3>' in noise
    assert "Detection of the corrupted samples" in noise and noise.count("<h4>Test accuracy and") == 0
    assert "<h3>Student test accuracy after deleting data</h3>" in _section(text, "transfer")
    unlearn = _section(text, "unlearn")
    assert "Removing clusters 0, 1 by fine-tuning on the &#x27;custom&#x27; synset" in unlearn
    assert "forgetting everything" in unlearn
    priv = _section(text, "privacy")
    assert "<th>synset</th>" in priv and "<td>custom</td>" in priv  # metrics.json as a table
    assert "from <code>applications/privacy/metrics.json</code>" in priv  # the source is still named


def test_full_report_shows_every_part_of_the_run(full_run, full_report):
    path = full_report
    text = path.read_text()
    _assert_self_contained(text)
    assert "not computed yet" not in text and 'class="error"' not in text
    # settings from the manifest, stage timings, target accuracy
    assert "per_class" in text and "batch_size" in text and "kwargs.hidden" in text
    for stage in ("train</td>", "cluster</td>", "distill-custom-"):  # a custom synset's stage has a digest
        assert f"<td>{stage}" in text
    assert "Target model test accuracy" in text
    # matching diagnostics per layer, forgetting check, synset grid
    for layer in ("body.1.weight", "head.weight"):
        assert f"<td>{layer}</td>" in text
    assert "target fine-tuned on the whole synset" in text and 'alt="synset grid"' in text
    # attribution: heatmap, top clusters per query (table and member images)
    assert 'alt="heatmap grad-dot-margin-q8s0"' in text and 'alt="top clusters grad-dot-margin-q8s0"' in text
    assert text.count("(class ") >= 8 * 3
    # evaluation files in the run directory: the markdown table (not its CSV twin) and the figure
    assert "evaluation/quality.md" in text and "evaluation/quality.csv" not in text
    assert "<th>spearman</th>" in text and '0.420<br><span class="ci">[0.300, 0.500]</span>' in text
    assert "figures/extra-check.png" in text
    assert len(_images(text)) >= 6
    # the report is an artifact of the run like any other: recorded with its checksum
    assert full_run.store.load_bytes("report.html") == path.read_bytes()


def test_report_to_an_explicit_path(tmp_path, small):
    run = _run(tmp_path / "run", small)
    out = write_report(run, tmp_path / "elsewhere" / "r.html")
    assert out == tmp_path / "elsewhere" / "r.html"
    assert "distdm report: run" in out.read_text()
    assert not (tmp_path / "run" / "report.html").exists() and not run.store.has("report.html")
    assert [p.name for p in out.parent.iterdir()] == ["r.html"]  # no temporary file left behind


def test_report_names_a_tampered_artifact_instead_of_showing_it(full_run, small, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(full_run.store.root, copy)
    scores = copy / "attribution" / "grad-dot-margin-q8s0.safetensors"
    scores.write_bytes(scores.read_bytes()[:-4] + b"\0\0\0\0")
    text = write_report(Run.open(copy, data=small)).read_text()
    assert re.search(r'class="error">attribution grad-dot-margin-q8s0 could not be read: .*checksum', text)
    assert 'alt="synset grid"' in text  # the rest of the report is still there


def _without_index(root: Path) -> None:
    """The manifest as a run made before the results index wrote it (no 'results' section)."""
    path = root / "manifest.json"
    m = json.loads(path.read_text())
    del m["results"]
    path.write_text(json.dumps(m, indent=2, sort_keys=True))


def _headings(body: str) -> list[str]:
    return re.findall(r"<h[34][^>]*>(.*?)</h[34]>", body)


def test_report_reads_the_results_index_and_renders_a_run_made_before_it(full_run, small, tmp_path):
    from distdm.store import APPLICATION, DISTILLATION, run_chunked

    copy = tmp_path / "indexed"
    shutil.copytree(full_run.store.root, copy)
    run = Run.open(copy, data=small)
    # a second custom synset: each one is named by its own stage (the index, not matched diagnostics)
    other = DistillConfig(target="trajectory", starts=2, iterations=3, step=1, soft_labels=True)
    syn = run.distill(config=other)
    assert run.attributor("ddm", distill=other, synset=syn).synset_ is syn  # given: nothing new to index
    stages = {r.name: r for r in run.store.index(DISTILLATION)}
    assert len(stages) == 2 and all(n.startswith("distill-custom-") for n in stages)
    assert len({r.identity["synset"] for r in stages.values()}) == 2
    x, y, idx = run.queries(4)
    run.save_scores(run.attributor("grad-dot").scores(x, y, "loss"), idx, seed=1)  # indexed without settings
    assert run.store.result("attribution/grad-dot-loss-q4s1").identity == {"method": "grad-dot"}
    out = run.diagnose(
        ("grad-dot",), fractions=[0.2], random_seeds=1
    )  # Run's applications index their outputs
    entry = run.store.result("applications/diagnose")
    assert entry.kind == APPLICATION and entry.info["application"] == "diagnose"
    assert sorted(str(run.store.root / f) for f in entry.files) == sorted(out.paths)
    assert entry.identity["methods"] == ["grad-dot"] and entry.identity["fractions"] == [0.2]
    # a file in the folder that no indexed result lists (say, of an earlier diagnosis) is not shown
    run.store.save_file("applications/diagnose/diagnose-flagged-stale.png", bar_png(["a"], [1.0], "t", "x"))
    # a chunked job: its chunks are grouped by the job the index names, whatever the chunks' names
    run_chunked(
        run.store, "probe", {"v": 1}, 4, 2, lambda sl, ex: {"t": torch.zeros(sl[0].stop - sl[0].start)}
    )

    text = write_report(run, tmp_path / "indexed.html").read_text()
    _assert_self_contained(text)
    assert 'class="error"' not in text
    dist = _section(text, "distillation")
    for stage, r in stages.items():  # each synset under its own heading, labelled with its own stage
        label = stage.removeprefix("distill-")
        assert f"synset {r.identity['synset'].split('/', 1)[1]} (preset {label})</h3>" in dist
    assert 'alt="heatmap grad-dot-loss-q4s1"' in text and 'alt="heatmap grad-dot-margin-q8s0"' in text
    diag = _section(text, "diagnose")
    assert "Members of the most harmful clusters by grad-dot" in diag and "stale" not in diag
    assert "<td>probe</td><td>done (2 cached chunks)</td>" in _section(text, "timings")
    assert _section(text, "noise").count('<h3 class="corruption">') == 1  # saved as before the index

    # the same run as a distdm made before the index wrote it: every part is still found by its name
    old = tmp_path / "old"
    shutil.copytree(copy, old)
    _without_index(old)
    run_old = Run.open(old, data=small)
    assert run_old.store.index() == []
    before = write_report(run_old, tmp_path / "old.html").read_text()
    _assert_self_contained(before)
    assert 'class="error"' not in before and "not computed yet" not in before
    for sid in ("distillation", "attribution", "noise", "transfer", "unlearn", "privacy"):
        assert _headings(_section(before, sid)) == _headings(_section(text, sid)), sid
    assert "Members of the most harmful clusters by grad-dot" in _section(before, "diagnose")
    assert "probe/chunk0" in _section(before, "timings")  # unindexed: one row per chunk


def test_markdown_and_csv_tables():
    html = markdown_to_html("# Head\nsetting x\n\n| a | b |\n|---|---|\n| 1 | <2> |\n")
    assert "<p>setting x</p>" in html and "<th>a</th>" in html and "&lt;2&gt;" in html and "---" not in html
    assert "<h4>Head</h4>" in html
    assert "<th>m</th>" in csv_to_html("m,v\nx,1\n") and '<td class="num">1</td>' in csv_to_html("m\n1\n")
    assert '<td class="num">' not in csv_to_html("m\nddm\n")


def test_wide_tables_wrap_headers_and_put_intervals_on_their_own_line():
    cols = ["method", *[f"metric_{i}_x100" for i in range(9)]]
    md = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n| ddm |" + " 0.420 [0.300, 0.500] |" * 9
    html = markdown_to_html(md)
    assert '<table class="wide">' in html and "<th>metric_<wbr>0_<wbr>x100</th>" in html
    assert html.count('<td class="num">0.420<br><span class="ci">[0.300, 0.500]</span></td>') == 9
    spread = markdown_to_html("| m | 10% |\n|---|---|\n| ddm | 97.1 ± 0.3 (10.0%) |\n")
    assert '97.1<br><span class="ci">± 0.3 (10.0%)</span>' in spread and 'class="wide"' not in spread


CHECK = """<script>
window.__errors = 0;
window.addEventListener('error', function () { window.__errors += 1; }, true);
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var shown = function (e) { return e.getBoundingClientRect().height > 0 ? e.textContent : ''; };
  var heads = Array.prototype.map.call(document.querySelectorAll('section > h2'), shown);
  var subheads = {};
  Array.prototype.forEach.call(document.querySelectorAll('section'), function (s) {
    subheads[s.id] = Array.prototype.map.call(s.querySelectorAll('h3'), shown); });
  var overflow = Array.prototype.filter.call(document.querySelectorAll('.scroll'), function (e) {
    return e.scrollWidth > e.clientWidth + 1; }).map(function (e) { return e.textContent.slice(0, 80); });
  document.title = JSON.stringify({images: imgs.length, decoded: ok, errors: window.__errors,
    sections: heads, subheads: subheads, overflow: overflow});
});
</script>"""
WIDTH = 1280


def _chromium() -> str:
    """The Chromium binary; missing, the browser checks fail where CI is set and are skipped elsewhere."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but chromium is not installed: apt-get install -y chromium")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return path


def test_missing_chromium_fails_in_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set but chromium is not installed"):
        _chromium()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        _chromium()


def _browse(page: Path, shot: Path, height: int = 2000) -> dict:
    """Load the page in headless Chromium: the checker's findings (from the DOM) and a screenshot."""
    chromium = _chromium()
    with tempfile.TemporaryDirectory() as profile:
        flags = [
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--virtual-time-budget=10000", f"--window-size={WIDTH},{height}",
        ]  # fmt: skip
        dom = subprocess.run(
            [chromium, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120
        ).stdout
        subprocess.run(
            [chromium, *flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120
        )
    title = re.search(r"<title>(.*?)</title>", dom, re.S)
    assert title, dom[:500]
    return json.loads(html_lib.unescape(title.group(1)))


def _ink(shot: Path) -> float:
    """Share of the screenshot's pixels that differ from its most common (background) colour."""
    import matplotlib.image

    px = (matplotlib.image.imread(shot)[..., :3] * 255).astype(np.uint8).reshape(-1, 3)
    colours, counts = np.unique(px, axis=0, return_counts=True)
    return float(1.0 - counts.max() / len(px))


def test_report_renders_in_headless_chromium(full_report, tmp_path):
    page = tmp_path / "page.html"
    page.write_text(full_report.read_text().replace("<head>", "<head>" + CHECK, 1))  # checker: copy only
    shot = tmp_path / "shot.png"
    state = _browse(page, shot)
    assert state["errors"] == 0
    assert state["images"] >= 6 and state["decoded"] == state["images"]
    assert state["sections"] == [t for _, t in SECTIONS]  # every section is shown
    assert state["overflow"] == []  # no table, the wide quality table included, scrolls sideways
    assert shot.read_bytes().startswith(PNG) and shot.stat().st_size > 20_000  # a page, not a blank
    assert _ink(shot) > 0.05


def test_chromium_shows_the_applications_sections_with_their_titles(full_report, tmp_path):
    apps = [sid for sid, *_ in APPLICATIONS]
    hide = ",".join(f"#{sid}" for sid, _ in SECTIONS if sid not in apps)  # the screenshot: applications only
    style = f"<style>{hide} {{ display: none; }}</style>"
    page = tmp_path / "apps.html"
    page.write_text(full_report.read_text().replace("<head>", "<head>" + CHECK + style, 1))
    shot = tmp_path / "apps.png"
    state = _browse(page, shot, height=3000)
    assert state["errors"] == 0 and state["decoded"] == state["images"] >= 5
    assert [h for h in state["sections"] if h] == [title for _, title, *_ in APPLICATIONS]  # only they
    heads = state["subheads"]
    assert "Members of the most harmful clusters by grad-dot" in heads["diagnose"]
    assert "Flipped labels on 20% of the training samples (seed 0)" in heads["noise"]
    assert "Student test accuracy after deleting data" in heads["transfer"]
    assert "Removing clusters 0, 1 by fine-tuning on the 'custom' synset" in heads["unlearn"]
    assert "Synthetic samples beside their nearest real training images" in heads["privacy"]
    assert not any("applications/" in h for sid in apps for h in heads[sid])
    assert state["overflow"] == []
    assert shot.read_bytes().startswith(PNG) and shot.stat().st_size > 50_000 and _ink(shot) > 0.05
