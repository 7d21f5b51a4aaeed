"""report.json schema and `edgesmith report`: validation, re-rendering report.md, comparing runs."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from edgesmith.bench.report import COLUMNS, compare_markdown, load_report
from edgesmith.bench.report_schema import ReportError, report_schema, schema_problems, validate_report
from edgesmith.cli import main
from tiny_artifacts import make_report, make_row, standard_report, tiny_data, tiny_tflite, write_run

DOC = Path(__file__).resolve().parents[1] / "docs" / "report-schema.md"

# --- the schema ---------------------------------------------------------------------------------


def test_schema_is_draft_2020_12_and_documents_every_csv_column():
    schema = report_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    row = schema["$defs"]["row"]
    assert set(COLUMNS) <= set(row["properties"])
    assert set(row["required"]) <= set(row["properties"])
    for key, spec in row["properties"].items():
        assert spec.get("description"), key


def test_the_markdown_doc_lists_every_key_of_the_schema():
    schema, text = report_schema(), DOC.read_text()
    defs = schema["$defs"]
    keys = [*schema["properties"], *defs["environment"]["properties"], *defs["row"]["properties"]]
    missing = [key for key in keys if f"| `{key}` |" not in text]
    assert not missing


def test_schema_is_accepted_by_jsonschema_when_installed():
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(report_schema())
    jsonschema.validate(standard_report(), report_schema())


def test_a_hand_made_report_validates():
    validate_report(standard_report())
    validate_report(standard_report(run_name=None))
    assert schema_problems(make_report(make_row("k", fmt="keras", bytes_=None))) == []


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda r: r.pop("rows"), "$: missing required key 'rows'"),
        (lambda r: r.update(schema_version=2), "$.schema_version: expected 1, got 2"),
        (lambda r: r["rows"][0].update(top1="0.9"), '$.rows[0].top1: expected number, got string "0.9"'),
        (lambda r: r["rows"][1].update(top1=93.0), "$.rows[1].top1: 93.0 is above the maximum 1"),
        (lambda r: r["rows"][0].update(bytes=1.5), "$.rows[0].bytes: expected integer, got float 1.5"),
        (lambda r: r["rows"][0].update(format="pb"), "$.rows[0].format: 'pb' is not one of 'keras'"),
        (lambda r: r["rows"][2].update(speed=1), "$.rows[2]: unknown key 'speed'"),
        (lambda r: r["rows"][0].update(threads=True), "$.rows[0].threads: expected integer, got boolean"),
        (lambda r: r["environment"]["versions"].update(numpy=2),
         "$.environment.versions.numpy: expected string or null"),
        (lambda r: r["environment"].pop("cpu"), "$.environment: missing required key 'cpu'"),
        (lambda r: r.update(rows={}), "$.rows: expected array, got object"),
    ],
)
def test_schema_violations_are_named_by_path(mutate, expected):
    report = standard_report()
    mutate(report)
    problems = schema_problems(report)
    assert any(p.startswith(expected) for p in problems), problems


def test_validate_report_lists_every_problem():
    report = standard_report()
    for row in report["rows"]:
        del row["top1"]
    expected = r"r\.json does not follow the report schema \(3 problem\(s\)\):\n  \$\.rows\[0\]"
    with pytest.raises(ReportError, match=expected):
        validate_report(report, origin="r.json")
    assert isinstance(ReportError("x"), ValueError)


def test_integer_valued_floats_are_integers():
    report = standard_report()
    report["rows"][0]["bytes"] = 400000.0
    validate_report(report)


# --- a real bench report -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_report(tmp_path_factory):
    """bench() on a float and an int8 TFLite file, written with write_reports like a run's bench stage."""
    from edgesmith.bench import bench, write_reports
    from edgesmith.recipe import BenchConfig

    root = tmp_path_factory.mktemp("real-report")
    inputs, labels = tiny_data()
    artifacts = {"float_float32": tiny_tflite(root / "export" / "float_float32.tflite", int8=False),
                 "model_int8": tiny_tflite(root / "export" / "model_int8.tflite")}
    report = bench(artifacts, inputs, labels, BenchConfig(min_seconds=0, warmup=2, runs=5, threads=1)).to_dict()
    report["run"] = {"name": "real", "path": str(root)}
    for row in report["rows"]:
        row["path"] = str(Path(row["path"]).relative_to(root))
    write_reports(report, root, title="edgesmith report: real")
    return root


def test_a_real_bench_report_validates(real_report):
    report = load_report(real_report)
    assert [row["name"] for row in report["rows"]] == ["float_float32", "model_int8"]
    validate_report(json.loads((real_report / "report.json").read_text()))


# --- edgesmith report ----------------------------------------------------------------------------


def test_report_rerenders_report_md(real_report, capsys):
    original = (real_report / "report.md").read_text()
    (real_report / "report.md").write_text("stale")
    assert main(["report", str(real_report)]) == 0
    out = capsys.readouterr().out
    assert (real_report / "report.md").read_text() == original
    assert out.startswith("# edgesmith report: real") and f"rewrote {real_report / 'report.md'}" in out


def test_report_rerenders_from_an_old_minimal_report(tmp_path, capsys):
    run = write_run(tmp_path / "old", standard_report())
    assert main(["report", str(run / "report.json")]) == 0
    text = (run / "report.md").read_text()
    assert text.startswith("# edgesmith report: tiny\n")
    assert "| pruned_int8 | tflite | ai-edge-litert | 90.00 |" in text


def test_report_compares_runs_side_by_side(tmp_path, capsys):
    before = write_run(tmp_path / "a", standard_report(run_name="before"))
    grown = standard_report(int8_bytes=125_000, run_name="after")
    grown["rows"][1].update(top1=0.915, latency_p50_ms=0.6)
    grown["rows"].pop(2)
    grown["rows"].append(make_row("new_int8", bytes_=90_000))
    after = write_run(tmp_path / "b", grown)
    assert main(["report", str(before), str(after)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "# edgesmith comparison: before vs after"
    header = [cell.strip() for cell in lines[2].strip("|").split("|")]
    assert header == ["model", "top-1 % before", "top-1 % after", "Δ top-1 % after", "size before",
                      "size after", "Δ size after", "p50 ms before", "p50 ms after", "Δ p50 ms after"]
    table = {cells[0]: cells
             for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[4:8])}
    assert table["pruned_int8"][1:] == ["90.00", "91.50", "+1.50 pp", "100.00 KB", "125.00 KB", "+25.0%",
                                        "0.8000", "0.6000", "-25.0%"]
    assert table["qat_int8"][1:4] == ["92.00", "-", "-"]
    assert table["new_int8"][1:4] == ["-", "90.00", "-"]
    assert list(table) == ["float_float32", "pruned_int8", "qat_int8", "new_int8"]
    assert "All runs measured on Test CPU with 1 threads." in out


def test_compare_warns_about_different_machines():
    other = standard_report()
    other["environment"]["threads"] = 2
    text = compare_markdown([standard_report(), other], ["a", "b"])
    assert re.search(r"Note: latency was measured on different CPUs or thread counts "
                     r"\(a: Test CPU, 1 threads; b: Test CPU, 2 threads\)", text)


def test_compare_labels_fall_back_to_paths_when_names_repeat(tmp_path, capsys):
    a = write_run(tmp_path / "a", standard_report())
    b = write_run(tmp_path / "b", copy.deepcopy(standard_report()))
    assert main(["report", str(a), str(b)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"# edgesmith comparison: {a} vs {b}"


def test_report_bad_input_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "holds no report.json" in capsys.readouterr().err
    broken = standard_report()
    broken["rows"][0]["top1"] = "high"
    run = write_run(tmp_path / "broken", broken)
    assert main(["report", str(run)]) == 2
    assert "$.rows[0].top1: expected number" in capsys.readouterr().err


def test_pareto_front():
    from edgesmith.bench.report import pareto_front

    rows = [make_row("big_best", bytes_=400, top1=0.95), make_row("small_good", bytes_=100, top1=0.90),
            make_row("mid_worse", bytes_=200, top1=0.89), make_row("mid_better", bytes_=300, top1=0.93),
            make_row("keras", fmt="keras", bytes_=None, top1=0.99)]
    assert [r["name"] for r in pareto_front(rows, "bytes")] == ["small_good", "mid_better", "big_best"]
