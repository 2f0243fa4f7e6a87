"""The evaluate stage's outputs (fusionnet.evaluation.outputs): the DVC metrics are only the headline
numbers, so `dvc exp show` is narrow; the table (one file per row) and everything else are plain outputs.

The files and dvc.yaml are checked here; how DVC renders them is DVC's business, not run here."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest

from tests.test_evaluate import TINY_PARAMS, make_foregrounds, make_photos, tiny_project  # noqa: F401  (fixture)


def _leaves(value, prefix=""):
    """(dotted key, leaf) of a nested mapping."""
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _leaves(v, f"{prefix}{k}.")]
    return [(prefix[:-1], value)]


def test_table_metrics_files_are_the_table_rounded_and_replaced_whole(tmp_path):
    from fusionnet.evaluation.outputs import write_table_metrics

    def regions(names, base):
        return {r: {"sad": base * (i + 1), "mse": base / 7, "grad": 12345.678, "conn": math.nan} for i, r in enumerate(names)}

    record = {"evaluate": {"raw": regions(["band", "full"], 0.123456789), "constant_half": regions(["band", "full"], 2.0)},
              "photos": {"held_out": {"scored": ["GT02"]}, "rows": {"raw": regions(["trimap1", "trimap2", "full"], 1 / 3)}}}
    metrics_dir = tmp_path / "metrics"
    (metrics_dir / "table" / "composites").mkdir(parents=True)
    (metrics_dir / "table" / "composites" / "fusion_only.json").write_text("{}")  # a row of an earlier run
    paths = write_table_metrics(record, metrics_dir)
    table = metrics_dir / "table"
    assert paths == [str(table / "composites" / "raw.json"), str(table / "composites" / "constant_half.json"),
                     str(table / "photos" / "raw.json")]
    assert sorted(p.name for p in (table / "composites").iterdir()) == ["constant_half.json", "raw.json"]
    raw = json.loads((table / "composites" / "raw.json").read_text())
    assert raw == {"band": {"sad": 0.1235, "mse": 0.01764, "grad": 12350.0, "conn": None},   # 4 significant digits
                   "full": {"sad": 0.2469, "mse": 0.01764, "grad": 12350.0, "conn": None}}   # NaN -> null
    photo = json.loads((table / "photos" / "raw.json").read_text())
    assert list(photo) == ["trimap1", "trimap2", "full"] and photo["trimap2"]["sad"] == 0.6667
    assert sorted(p.name for p in metrics_dir.iterdir()) == ["table"]  # no temp folder left
    # photos skipped the next time: their table goes; a failing write keeps the table before it, whole
    record["photos"] = {"skipped": "absent"}
    write_table_metrics(record, metrics_dir)
    assert sorted(p.name for p in table.iterdir()) == ["composites"]
    before = {p.name: p.read_text() for p in (table / "composites").iterdir()}
    with pytest.raises(ValueError):  # a value that is no number fails before anything is written
        write_table_metrics({**record, "evaluate": {"zeros": {"full": {"sad": "n/a"}}}}, metrics_dir)
    broken = {**record, "evaluate": {**record["evaluate"], "no/such": record["evaluate"]["raw"]}}
    with pytest.raises(FileNotFoundError):  # fails half-way through writing the new table
        write_table_metrics(broken, metrics_dir)
    assert {p.name: p.read_text() for p in (table / "composites").iterdir()} == before
    assert sorted(p.name for p in metrics_dir.iterdir()) == ["table"]


def test_dvc_yaml_declares_only_the_headline_as_metrics():
    """The evaluate stage's one DVC metrics entry is metrics/headline; the table and what other code
    reads stay plain outputs."""
    import yaml

    project = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())
    declared = {name: [next(iter(m)) if isinstance(m, dict) else m for m in stage.get("metrics", [])]
                for name, stage in project["stages"].items()}
    assert {name: paths for name, paths in declared.items() if paths} == {"evaluate": ["metrics/headline"]}
    assert "metrics" not in project  # no top-level metrics either
    outs = {next(iter(o)): o[next(iter(o))] for o in project["stages"]["evaluate"]["outs"] if isinstance(o, dict)}
    for name in ("evaluate.json", "claims.json", "photos.json", "details.json", "table"):  # read by the registry, tests, scripts
        assert outs[f"metrics/{name}"] == {"cache": False}
    assert project["stages"]["evaluate"]["metrics"] == [{"metrics/headline": {"cache": False}}]


def test_headline_is_sad_and_mse_of_raw_and_refined_with_keys_unique_across_files(tmp_path):
    from fusionnet.evaluation.outputs import write_headline_metrics

    def regions(names, base):
        return {r: {"sad": base * (i + 1), "mse": base / 7, "grad": 1.0, "conn": 2.0} for i, r in enumerate(names)}

    record = {"evaluate": {row: regions(["band", "full"], b) for row, b in (("raw", 6.4521), ("refined", 6.34), ("closed_form", 3.0))},
              "photos": {"rows": {row: regions(["trimap1", "trimap2", "full"], b) for row, b in (("raw", 32.361), ("zeros", 41.0))}}}
    paths = write_headline_metrics(record, tmp_path / "metrics")
    headline = tmp_path / "metrics" / "headline"
    assert paths == [str(headline / "composites.json"), str(headline / "photos.json")]
    composites = json.loads((headline / "composites.json").read_text())
    assert composites == {"raw": {"sad25": 6.452, "mse25": 0.9217, "sad": 12.9, "mse": 0.9217},
                          "refined": {"sad25": 6.34, "mse25": 0.9057, "sad": 12.68, "mse": 0.9057}}
    photos = json.loads((headline / "photos.json").read_text())
    assert photos == {"photo_raw": {"sad_t1": 32.36, "mse_t1": 4.623, "sad": 97.08, "mse": 4.623}}  # no refined row scored
    assert not {f"{r}.{k}" for r, v in composites.items() for k in v} & {f"{r}.{k}" for r, v in photos.items() for k in v}
    record["photos"] = {"skipped": "absent"}  # photos skipped the next time: their file goes
    assert write_headline_metrics(record, tmp_path / "metrics") == [str(headline / "composites.json")]
    assert sorted(p.name for p in (tmp_path / "metrics").iterdir()) == ["headline"]


@pytest.mark.slow
def test_run_evaluation_writes_only_the_table_numbers_as_metrics(tiny_project, tmp_path):
    """A real tiny evaluation (composites + held-out photos): metrics/table, the folder dvc.yaml declares
    as the stage's metrics, holds one file per table row with the table's numbers and nothing else."""
    from fusionnet.evaluation.run import run_evaluation

    make_photos(tmp_path / "photos", names=("GT01", "GT02"))
    foregrounds = make_foregrounds(tmp_path / "foregrounds", [{"id": "GT01", "split": "train", "source": "folder"}])
    rows, photo_rows = ["raw", "refined", "constant_half"], ["raw"]
    params = {"crops": TINY_PARAMS["crops"], "evaluate": {**TINY_PARAMS["evaluate"], "rows": rows, "pictures": 0, "workers": 0,  # no pool start-up
                           "photos": {"root": "photos", "rows": photo_rows}}}
    metrics_dir = tmp_path / "repo" / "metrics"
    record = run_evaluation(params, tiny_project["checkpoints"], tiny_project["composites"], metrics_dir,
                            tmp_path / "repo" / "reports", base_dir=tmp_path, foregrounds=foregrounds)
    table = metrics_dir / "table"
    files = {str(path.relative_to(metrics_dir.parent)): json.loads(path.read_text())
             for path in sorted(table.rglob("*")) if path.is_file()}
    photo_table = ["raw", "segmentation_only", "constant_half", "zeros"]  # + the claims' comparison rows
    assert sorted(files) == sorted([f"metrics/table/composites/{r}.json" for r in rows]
                                   + [f"metrics/table/photos/{r}.json" for r in photo_table])
    assert sorted(record["table_files"]) == sorted(str(metrics_dir.parent / p) for p in files)
    full = {"composites": json.loads((metrics_dir / "evaluate.json").read_text()),
            "photos": json.loads((metrics_dir / "photos.json").read_text())["rows"]}
    columns = set()
    for path, data in files.items():
        group, row = path.split("/")[2], Path(path).stem
        assert set(data) == ({"band", "full"} if group == "composites" else {"trimap1", "trimap2", "full"}), path
        for key, value in _leaves(data):
            assert type(value) is float, (path, key, value)  # numbers only: no provenance, sha256 or paths
            region, metric = key.split(".")  # two levels: one line per row, a column per region x metric
            assert metric in {"sad", "mse", "grad", "conn"}
            assert value == pytest.approx(full[group][row][region][metric], rel=5e-4), (path, key)  # 4 digits
            columns.add(key)
    assert columns == {f"{r}.{m}" for r in ("band", "full", "trimap1", "trimap2") for m in ("conn", "grad", "mse", "sad")}
    assert sorted(p.name for p in metrics_dir.iterdir() if p.name.startswith(".")) == []  # no temp folders left
    headline = json.loads((metrics_dir / "headline" / "composites.json").read_text())  # the DVC metrics
    assert headline["refined"] == {"sad25": files["metrics/table/composites/refined.json"]["band"]["sad"],
                                   "mse25": files["metrics/table/composites/refined.json"]["band"]["mse"],
                                   "sad": files["metrics/table/composites/refined.json"]["full"]["sad"],
                                   "mse": files["metrics/table/composites/refined.json"]["full"]["mse"]}
    assert sorted(record["headline_files"]) == [str(metrics_dir / "headline" / f) for f in ("composites.json", "photos.json")]
    details = json.loads((metrics_dir / "details.json").read_text())  # still written, not a metric
    assert details["provenance"]["raw"]["sha256"] == hashlib.sha256(tiny_project["checkpoints"]["joint"].read_bytes()).hexdigest()
