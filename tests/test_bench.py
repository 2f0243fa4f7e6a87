"""scripts/speed_table.py rewrites README's speed table from benchmark results (benchmarks/machine.py's format)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import machine  # noqa: E402
import speed_table  # noqa: E402

AMX = {"cpu": "Intel(R) Xeon(R) Processor", "cpus": 2, "flags": ["amx_bf16", "amx_int8", "avx512_vnni"],
       "torch": "2.15.0", "onnxruntime": "1.30.0", "load": [0.5, 0.4, 0.3], "date": "2026-12-02 19:25 UTC"}
EPYC = {**AMX, "cpu": "AMD EPYC 7B13", "flags": ["avx2"]}


def _write(folder: Path, name: str, m: dict, rows: list[dict]) -> None:
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps({"machine": m, "rows": rows}))


def test_table_between_markers_names_each_machine(tmp_path):
    results = tmp_path / "results"
    _write(results, "metrics", EPYC, [{"what": "metrics 800", "command": "`m`", "result": "0.2 s", "target": "< 0.5 s"}])
    _write(results, "inference", AMX, [{"what": "inference 800", "command": "`i`", "result": "a | b", "target": ""}])
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{speed_table.START}\nold table\n{speed_table.END}\nafter\n")
    assert speed_table.main(["--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{speed_table.END}\nafter\n") and "old table" not in text
    assert "- [1] Intel(R) Xeon(R) Processor, 2 logical CPUs, flags amx_bf16 amx_int8 avx512_vnni" in text
    assert "- [2] AMD EPYC 7B13, 2 logical CPUs, flags avx2" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    # inference first (ORDER), its '|' escaped; each row names its machine
    assert rows == ["| inference 800 | `i` | a \\| b |  | [1] |", "| metrics 800 | `m` | 0.2 s | < 0.5 s | [2] |"]


def test_missing_markers_or_results_leave_readme_alone(tmp_path, capsys):
    results = tmp_path / "results"
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    assert speed_table.main(["--results", str(results), "--readme", str(readme)]) == 1
    assert "no benchmark results" in capsys.readouterr().err
    _write(results, "refine", AMX, [{"what": "gf", "command": "c", "result": "r", "target": "t"}])
    assert speed_table.main(["--results", str(results), "--readme", str(readme)]) == 1
    assert "needs one <!-- speed-table:start -->" in capsys.readouterr().err
    assert readme.read_text() == "no markers\n"


def test_record_writes_what_the_table_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "RESULTS", tmp_path)
    path = machine.record("x", [{"what": "w", "command": "c", "result": "r", "target": "t"}])
    data = speed_table.load_results(tmp_path)["x"]
    assert path == tmp_path / "x.json" and data["rows"][0]["result"] == "r"
    assert set(data["machine"]) >= {"cpu", "cpus", "flags", "torch", "onnxruntime", "load", "date"}
    assert set(data["machine"]["flags"]) <= set(machine.FLAGS)
