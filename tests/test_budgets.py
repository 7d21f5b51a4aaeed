"""Budgets and regression gates: budgets.toml parsing, check() rows, `edgesmith check` exit codes."""

from __future__ import annotations

import json

import pytest

from edgesmith.bench.budgets import BudgetError, check, format_results, load_budgets, parse_budgets
from edgesmith.cli import main
from edgesmith.errors import EdgesmithError
from tiny_artifacts import make_report, make_row, standard_report, tiny_data, tiny_tflite, write_run


def write_budget(tmp_path, text: str, name: str = "budgets.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def by_key(results):
    return {(r.artifact, r.rule): r for r in results}


# --- parsing ------------------------------------------------------------------------------------


def test_parse_budgets_reads_globs_and_sizes(tmp_path):
    path = write_budget(tmp_path, '["*_int8"]\nmax_bytes = "150 KB"\nmax_gzip_bytes = "1 KiB"\n'
                                  "max_growth_pct = 5\n\n[float_float32]\nmin_top1 = 0.9\nmax_p50_ms = 3\n")
    budgets = load_budgets(path)
    assert [b.pattern for b in budgets] == ["*_int8", "float_float32"]
    assert budgets[0].limits == {"max_bytes": 150_000, "max_gzip_bytes": 1024, "max_growth_pct": 5}
    assert budgets[1].limits == {"min_top1": 0.9, "max_p50_ms": 3.0}


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ('["*_int8"]\nmax_byte = 1000\n',
         r'\["\*_int8"\]\.max_byte: unknown budget key; did you mean \'max_bytes\''),
        ("[qat_int8]\nmin_top1 = 92.5\n", r"\[qat_int8\]\.min_top1: top-1 is a fraction .* got 92\.5"),
        ("[qat_int8]\nmax_bytes = -3\n", r"\[qat_int8\]\.max_bytes: expected a positive whole number"),
        ('[qat_int8]\nmax_bytes = "12 parsecs"\n', r"max_bytes: .*got '12 parsecs'"),
        ('[qat_int8]\nmax_p50_ms = "fast"\n', r"\[qat_int8\]\.max_p50_ms: expected a number, got 'fast'"),
        ("[qat_int8]\nmax_p50_ms = true\n", r"max_p50_ms: expected a number, got True"),
        ("[qat_int8]\nmax_growth_pct = -1\n", r"max_growth_pct: expected a non-negative number, got -1"),
        ("max_bytes = 1000\n", r"'max_bytes' = 1000 is not a table"),
        ("[qat_int8]\n", r"\[qat_int8\] has no rules"),
        ("", r"holds no budgets"),
        ("[qat_int8\nmax_bytes = 1\n", r"not valid TOML"),
    ],
    ids=["unknown-key", "top1-percent", "negative-bytes", "bad-size-unit", "string-number", "bool",
         "negative-growth", "not-a-table", "empty-table", "empty-file", "bad-toml"],
)
def test_bad_budgets_raise_a_typed_error_naming_the_key(tmp_path, text, pattern):
    with pytest.raises(BudgetError, match=pattern) as info:
        load_budgets(write_budget(tmp_path, text))
    assert isinstance(info.value, EdgesmithError) and isinstance(info.value, ValueError)


def test_missing_budget_file(tmp_path):
    with pytest.raises(BudgetError, match=r"nope\.toml does not exist"):
        load_budgets(tmp_path / "nope.toml")


# --- check() ------------------------------------------------------------------------------------


def test_check_one_result_per_artifact_and_rule():
    budgets = parse_budgets({"*_int8": {"max_bytes": 120_000, "min_top1": 0.91},
                             "float_float32": {"max_p50_ms": 1.5}})
    results = check(standard_report(int8_bytes=100_000), budgets)
    assert [(r.artifact, r.rule, r.status) for r in results] == [
        ("pruned_int8", "max_bytes", "pass"),
        ("pruned_int8", "min_top1", "fail"),
        ("qat_int8", "max_bytes", "pass"),
        ("qat_int8", "min_top1", "pass"),
        ("float_float32", "max_p50_ms", "fail"),
    ]
    low = by_key(results)[("pruned_int8", "min_top1")]
    assert (low.measured, low.limit, low.passed) == (0.90, 0.91, False)
    assert low.detail == "under by 1.00 percentage points"
    slow = by_key(results)[("float_float32", "max_p50_ms")]
    assert slow.detail == "over by 0.500 ms (+33.3%)"


def test_check_fails_an_int8_model_grown_past_its_budget_and_passes_it_otherwise():
    budgets = parse_budgets({"*_int8": {"max_bytes": 120_000}})
    assert all(r.passed for r in check(standard_report(int8_bytes=119_000), budgets))
    results = check(standard_report(int8_bytes=130_000), budgets)
    failed = [r for r in results if not r.passed]
    assert [(r.artifact, r.measured, r.limit) for r in failed] == [("pruned_int8", 130_000, 120_000)]
    assert failed[0].detail == "over by 10,000 B (+8.3%)"


def test_glob_matches_the_file_name_too():
    report = make_report(make_row("mobile", bytes_=5000))  # path export/mobile.tflite
    results = check(report, parse_budgets({"*.tflite": {"max_bytes": 4000}}))
    assert [(r.artifact, r.status) for r in results] == [("mobile", "fail")]


def test_a_budget_matching_nothing_fails():
    results = check(standard_report(), parse_budgets({"*_int9": {"max_bytes": 10**9}}))
    assert len(results) == 1 and not results[0].passed and results[0].rule == "match"
    expected = "no artifact matches '*_int9' (artifacts: float_float32, pruned_int8, qat_int8)"
    assert results[0].detail == expected


def test_unmeasured_field_fails():
    report = make_report(make_row("float_keras", fmt="keras", bytes_=None))
    (result,) = check(report, parse_budgets({"float_keras": {"max_bytes": 10}}))
    assert result.status == "fail" and result.detail == "not measured: the row has no bytes"


def test_growth_against_a_baseline():
    budgets = parse_budgets({"*_int8": {"max_growth_pct": 5, "max_p50_growth_pct": 10}})
    baseline = standard_report(int8_bytes=100_000)
    grown = standard_report(int8_bytes=106_000)
    results = by_key(check(grown, budgets, baseline))
    assert results[("pruned_int8", "max_growth_pct")].status == "fail"
    assert results[("pruned_int8", "max_growth_pct")].measured == pytest.approx(6.0)
    assert "over by 1.00 percentage points" in results[("pruned_int8", "max_growth_pct")].detail
    assert results[("qat_int8", "max_growth_pct")].status == "pass"
    assert results[("pruned_int8", "max_p50_growth_pct")].status == "pass"
    assert all(r.passed for r in check(standard_report(int8_bytes=104_000), budgets, baseline))


def test_growth_rules_skip_visibly_without_a_baseline_or_a_baseline_row():
    budgets = parse_budgets({"*_int8": {"max_growth_pct": 5}})
    results = check(standard_report(), budgets)
    assert {r.status for r in results} == {"skip"} and all(r.passed for r in results)
    assert results[0].detail == "no --baseline given"
    baseline = make_report(make_row("qat_int8", bytes_=110_000))
    results = by_key(check(standard_report(), budgets, baseline))
    assert results[("pruned_int8", "max_growth_pct")].status == "skip"
    assert results[("qat_int8", "max_growth_pct")].status == "pass"


def test_format_results_table():
    budgets = parse_budgets({"*_int8": {"max_bytes": 120_000}, "nothing": {"min_top1": 0.5}})
    text = format_results(check(standard_report(int8_bytes=130_000), budgets))
    lines = text.splitlines()
    assert lines[0].split() == ["status", "artifact", "rule", "measured", "limit", "detail"]
    assert lines[1].split()[:6] == ["FAIL", "pruned_int8", "max_bytes", "130,000", "B", "120,000"]
    assert lines[2].startswith("PASS") and "qat_int8" in lines[2]
    assert lines[3].startswith("FAIL") and "no artifact matches 'nothing'" in lines[3]
    assert lines[-1] == "FAILED: 1 passed, 2 failed, 0 skipped"


# --- the command line ---------------------------------------------------------------------------

BUDGET = '["*_int8"]\nmax_bytes = 120_000\nmax_growth_pct = 10\n\n[float_float32]\nmin_top1 = 0.9\n'


def test_check_cli_exit_codes(tmp_path, capsys):
    budget = write_budget(tmp_path, BUDGET)
    ok = write_run(tmp_path / "ok", standard_report(int8_bytes=100_000))
    grown = write_run(tmp_path / "grown", standard_report(int8_bytes=125_000))

    assert main(["check", str(ok), "--budget", str(budget)]) == 0
    out = capsys.readouterr().out
    assert "OK: 3 passed, 0 failed, 2 skipped" in out

    assert main(["check", str(grown), "--budget", str(budget), "--baseline", str(ok / "report.json")]) == 1
    out = capsys.readouterr().out
    assert "FAILED: 3 passed, 2 failed, 0 skipped" in out
    fails = [line for line in out.splitlines() if line.startswith("FAIL ")]
    assert len(fails) == 2 and all("pruned_int8" in line for line in fails)
    assert "over by 5,000 B (+4.2%)" in fails[0] and "+25.00%" in fails[1]


@pytest.mark.parametrize(
    ("case", "pattern"),
    [
        ("missing-budget", r"budgets file .*missing\.toml does not exist"),
        ("unknown-key", r"\[float_float32\]\.min_top: unknown budget key; did you mean 'min_top1'"),
        ("bad-toml", r"not valid TOML"),
        ("no-report", r"empty holds no report\.json; run `edgesmith bench RUN_DIR` first"),
        ("missing-run", r"nowhere does not exist"),
        ("bad-report", r"does not follow the report schema .*\$\.rows\[0\]: missing required key 'top1'"),
        ("bad-baseline", r"baseline\.json: not valid JSON"),
    ],
)
def test_check_cli_bad_input_exits_2(tmp_path, capsys, case, pattern):
    ok = write_run(tmp_path / "ok", standard_report())
    budget = write_budget(tmp_path, BUDGET)
    run, extra = ok, []
    if case == "missing-budget":
        budget = tmp_path / "missing.toml"
    elif case == "unknown-key":
        budget = write_budget(tmp_path, "[float_float32]\nmin_top = 0.9\n", "typo.toml")
    elif case == "bad-toml":
        budget = write_budget(tmp_path, "[float_float32\n", "broken.toml")
    elif case == "no-report":
        run = tmp_path / "empty"
        run.mkdir()
    elif case == "missing-run":
        run = tmp_path / "nowhere"
    elif case == "bad-report":
        broken = standard_report()
        del broken["rows"][0]["top1"]
        run = write_run(tmp_path / "broken", broken)
    elif case == "bad-baseline":
        (tmp_path / "baseline.json").write_text("{not json")
        extra = ["--baseline", str(tmp_path / "baseline.json")]
    assert main(["check", str(run), "--budget", str(budget), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgesmith: error:")
    import re

    assert re.search(pattern, err, flags=re.DOTALL), err


def test_check_cli_requires_budget(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["check", str(tmp_path)])
    assert info.value.code == 2
    assert "--budget" in capsys.readouterr().err


# --- a real int8 model that grew ----------------------------------------------------------------


@pytest.fixture(scope="module")
def int8_runs(tmp_path_factory):
    """Two run directories benchmarked for real: the int8 model small, then grown (wider hidden layer)."""
    from edgesmith.bench import bench
    from edgesmith.recipe import BenchConfig

    root = tmp_path_factory.mktemp("int8-growth")
    inputs, labels = tiny_data()
    runs = {}
    for label, hidden in (("small", 8), ("grown", 256)):
        model = tiny_tflite(root / label / "export" / "model_int8.tflite", hidden=hidden)
        cfg = BenchConfig(min_seconds=0, warmup=1, runs=3, threads=1)
        report = bench({"model_int8": model}, inputs, labels, cfg).to_dict()
        runs[label] = write_run(root / label, report)
    return runs


def test_check_fails_a_real_int8_model_that_grew_past_its_budget(int8_runs, tmp_path, capsys):
    small = json.loads((int8_runs["small"] / "report.json").read_text())["rows"][0]["bytes"]
    grown = json.loads((int8_runs["grown"] / "report.json").read_text())["rows"][0]["bytes"]
    assert grown > small + 1000
    budget = write_budget(tmp_path, f'["*_int8"]\nmax_bytes = {small + 500}\n')
    assert main(["check", str(int8_runs["small"]), "--budget", str(budget)]) == 0
    assert "OK: 1 passed" in capsys.readouterr().out
    assert main(["check", str(int8_runs["grown"]), "--budget", str(budget)]) == 1
    out = capsys.readouterr().out
    assert f"over by {grown - small - 500:,} B" in out and "FAILED: 0 passed, 1 failed" in out

    growth = write_budget(tmp_path, '["*.tflite"]\nmax_growth_pct = 10\n', "growth.toml")
    baseline = str(int8_runs["small"] / "report.json")
    assert main(["check", str(int8_runs["grown"]), "--budget", str(growth), "--baseline", baseline]) == 1
    assert main(["check", str(int8_runs["small"]), "--budget", str(growth), "--baseline", baseline]) == 0
