"""The single-file HTML report: every part of a run, nothing external, robust to missing or bad parts,
and it renders in a real browser."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from distdm.config import ClusterConfig, DistillConfig, TrainConfig
from distdm.data import TensorData
from distdm.evaluate import write_csv, write_markdown
from distdm.figures import bar_png
from distdm.report import SECTIONS, csv_to_html, markdown_to_html, write_report
from distdm.run import Run

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
    run.distill(config=DistillConfig(target="trajectory", starts=2, iterations=5, step=1, soft_labels=True))
    x, y, idx = run.queries(8)
    s = run.attributor("grad-dot").scores(x, y, "margin")
    run.store.save_tensors(
        "attribution/grad-dot-margin-q8s0",
        {"scores": torch.as_tensor(s.values), "queries": torch.as_tensor(idx)},
    )
    rows = [{"method": "grad-dot", "spearman": 0.42, "spearman_lo": 0.3, "spearman_hi": 0.5, "lds": 0.61}]
    (run.store.root / "evaluation").mkdir()
    write_markdown(rows, run.store.root / "evaluation" / "quality.md")
    write_csv(rows, run.store.root / "evaluation" / "quality.csv")
    run.store.save_file("figures/extra-check.png", bar_png(["a", "b"], [1.0, 2.0], "extra figure", "x"))
    return run


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


def test_full_report_shows_every_part_of_the_run(full_run, full_report):
    path = full_report
    text = path.read_text()
    _assert_self_contained(text)
    assert "not computed yet" not in text and 'class="error"' not in text
    # settings from the manifest, stage timings, target accuracy
    assert "per_class" in text and "batch_size" in text and "kwargs.hidden" in text
    for stage in ("train", "cluster", "distill-custom"):
        assert f"<td>{stage}</td>" in text
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
    assert "<th>spearman</th>" in text and "0.420 [0.300, 0.500]" in text
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


def test_markdown_and_csv_tables():
    html = markdown_to_html("setting x\n\n| a | b |\n|---|---|\n| 1 | <2> |\n")
    assert "<p>setting x</p>" in html and "<th>a</th>" in html and "&lt;2&gt;" in html and "---" not in html
    assert "<th>m</th>" in csv_to_html("m,v\nx,1\n") and '<td class="num">' not in csv_to_html("m\n1\n")


CHECK = """<script>
window.__errors = 0;
window.addEventListener('error', function () { window.__errors += 1; }, true);
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var heads = Array.prototype.map.call(document.querySelectorAll('section > h2'), function (h) {
    return h.getBoundingClientRect().height > 0 ? h.textContent : ''; });
  document.title = JSON.stringify(
    {images: imgs.length, decoded: ok, errors: window.__errors, sections: heads});
});
</script>"""


def test_report_renders_in_headless_chromium(full_report, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    text = full_report.read_text()
    page = tmp_path / "page.html"
    page.write_text(text.replace("<head>", "<head>" + CHECK, 1))  # a checker, added to a copy only
    with tempfile.TemporaryDirectory() as profile:
        flags = [
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
            "--virtual-time-budget=10000",
        ]  # fmt: skip
        dom = subprocess.run(
            [chromium, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120
        ).stdout
        shot = tmp_path / "shot.png"
        report = full_report.as_uri()
        subprocess.run(
            [chromium, *flags, "--window-size=1200,2000", f"--screenshot={shot}", report],
            capture_output=True,
            timeout=120,
        )
    title = re.search(r"<title>(.*?)</title>", dom, re.S)
    assert title, dom[:500]
    state = json.loads(title.group(1).replace("&quot;", '"'))
    assert state["errors"] == 0
    assert state["images"] >= 6 and state["decoded"] == state["images"]
    assert state["sections"] == [t for _, t in SECTIONS]  # every section is shown
    assert shot.read_bytes().startswith(PNG) and shot.stat().st_size > 20_000  # a page, not a blank
