"""`dvc plots show` offline: the page DVC writes with this project's plots declarations and its
committed html_template (.dvc/config) draws every chart with no network, and shows each picture once.

A scratch git + DVC repo gets dvc.yaml's top-level plots and the evaluate stage's reports/ outputs
(its cmd replaced: nothing runs), the project's .dvc/config and template, and small fake
reports/per_image.csv and reports/pictures/*.png; the page is opened in headless Chromium with every
request off this disk refused."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.support.browser import chromium_page

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def _scratch_repo(root: Path) -> dict:
    """The scratch repo (see the module docstring); returns the dvc.yaml written there."""
    project = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stage = project["stages"]["evaluate"]

    def reports_only(entries):
        return [e for e in entries if str(next(iter(e)) if isinstance(e, dict) else e).startswith("reports/")]

    scratch_stage = {"cmd": "true", **{key: reports_only(stage[key]) for key in ("outs", "plots") if key in stage}}
    pipeline = {"stages": {"evaluate": scratch_stage}, "plots": project.get("plots", [])}
    (root / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    (root / ".dvc").mkdir()
    shutil.copy(ROOT / ".dvc" / "config", root / ".dvc" / "config")
    env = _env()
    rel = subprocess.run([str(BIN / "dvc"), "config", "plots.html_template"], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    template = (ROOT / ".dvc" / rel).resolve()
    assert template.is_file(), f"plots.html_template {rel} is not in the repo"
    (root / ".dvc" / rel).resolve().parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(template, (root / ".dvc" / rel).resolve())
    # fake evaluate outputs: the columns the declared charts read, 3 images, 4 pictures
    header = ["image"] + sorted({col for plot in pipeline["plots"] if isinstance(plot, dict)
                                 for spec in plot.values() for cols in spec.get("y", {}).values()
                                 for col in ([cols] if isinstance(cols, str) else cols)} | {"raw_band_sad"})
    rows = [[f"syn-{i:05d}"] + [f"{1.0 + i + j / 10:.3f}" for j in range(len(header) - 1)] for i in range(3)]
    (root / "reports").mkdir()
    (root / "reports" / "per_image.csv").write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n")
    (root / "reports" / "pictures").mkdir()
    for name in ("best_1_a", "best_2_b", "worst_1_c", "worst_2_d"):
        pixels = np.random.default_rng(len(name)).integers(0, 255, (8, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "reports" / "pictures" / f"{name}.png")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "scratch"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True, timeout=60)
    return pipeline


def _env() -> dict:
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", DVC_NO_ANALYTICS="1",
                DO_NOT_TRACK="true", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
                GIT_COMMITTER_EMAIL="t@t")


def test_plots_page_draws_offline_each_picture_once(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    pipeline = _scratch_repo(root)
    charts = [plot for plot in pipeline["plots"] if isinstance(plot, dict)]
    shown = subprocess.run([str(BIN / "dvc"), "plots", "show", "-o", "page"], cwd=root, env=_env(),
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    page_file = root / "page" / "index.html"
    html = page_file.read_text()
    assert "cdn.jsdelivr" not in html and "<script src=" not in html  # the libraries are inline

    with chromium_page() as page:
        refused = []
        page.context.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file:")
                           else (refused.append(route.request.url), route.abort()))
        errors = []
        page.on("console", lambda msg: msg.type == "error" and errors.append(msg.text))
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(page_file.as_uri())
        page.wait_for_function(
            f"() => document.querySelectorAll('.vega-embed canvas, .vega-embed svg').length >= {len(charts)}",
            timeout=20_000)
        drawn = page.evaluate("""() => [...document.querySelectorAll('.vega-embed')].map((el) => {
            const c = el.querySelector('canvas');
            return c ? c.width * c.height : (el.querySelector('svg') ? 1 : 0); })""")
        pictures = page.evaluate("() => [...document.images].map((img) => img.naturalWidth > 0 ? img.src : 'broken')")
    assert errors == [], errors  # e.g. "vegaEmbed is not defined" when the libraries come from a CDN
    assert refused == []  # the page asked for nothing off this disk
    assert len(drawn) == len(charts) and all(area > 0 for area in drawn), drawn
    names = sorted(Path(src).name.split("pictures_")[-1] for src in pictures)  # DVC prefixes revision and path
    assert "broken" not in pictures
    assert names == ["best_1_a.png", "best_2_b.png", "worst_1_c.png", "worst_2_d.png"]  # each picture once
