"""The accuracy-budgeted search: every candidate's shipped file measured, the pick within the budget and best
there, an honest answer when nothing fits, a non-dominated Pareto set, recipe keys and CLI flags validated."""

from __future__ import annotations

import gzip
import json

import pytest

from conftest import run_with_trained, tiny_recipe
from edgesmith.cli import EXIT_BAD_INPUT, main
from edgesmith.errors import RecipeError
from edgesmith.optimize import search
from edgesmith.optimize.check import CheckData, kernel_stats, predict, top1
from edgesmith.optimize.search import RUNGS, resolve_ladder, select
from edgesmith.optimize.search_report import write_search_report
from edgesmith.recipe import SEARCH_LADDER, SearchConfig, load_recipe, recipe_from_dict
from edgesmith.runs import RunDir

LADDER = ["float32", "float16", "int8", "int8_more_calibration", "prune_int8", "qat_int8"]
FAST = {"eval_samples": 300, "calibration_samples": 100, "more_calibration_samples": 400,
        "latency_warmup": 2, "latency_runs": 10, "latency_min_seconds": 0.0}
FINETUNE = {"finetune_samples": 300, "batch_size": 32, "prune_learning_rate": 1e-3, "qat_learning_rate": 1e-4}
KEYS = {"size": "gzip_bytes", "latency": "latency_p50_ms"}


@pytest.fixture(scope="module")
def searched(trained_tiny, digits_data, tmp_path_factory):
    """One search over LADDER on the tiny model (files kept): (result, recipe, folder)."""
    recipe = tiny_recipe(optimize={**FINETUNE, "search": {**FAST, "ladder": LADDER, "sparsities": [0.5, 0.9]}})
    folder = tmp_path_factory.mktemp("search")
    result = search(trained_tiny.model, digits_data, recipe.optimize, spec=trained_tiny.spec, seed=3, mirror=False,
                    out_dir=folder)
    return result, recipe, folder


def measured(result):
    return [c for c in result.candidates if "error" not in c]


def test_each_candidate_is_its_shipped_file_measured_on_the_val_split(searched, digits_data, trained_tiny):
    result, recipe, folder = searched
    names = [c["name"] for c in result.candidates]
    assert names == ["float32", "float16", "int8", "int8_more_calibration", "prune50_int8", "prune90_int8", "qat_int8"]
    assert len(measured(result)) == len(names) and result.held_out == "val"
    # Measure again, independently: the same val images, each file read from disk.
    check = CheckData.draw(digits_data, trained_tiny.spec, 300, 3, 100)
    assert result.eval_samples == len(check.labels) == len(digits_data.val)
    assert result.float_top1 == top1(predict(trained_tiny.model, check.inputs), check.labels)
    for c in result.candidates:
        raw = (folder / c["path"]).read_bytes()
        assert c["bytes"] == len(raw) and c["gzip_bytes"] == len(gzip.compress(raw, compresslevel=9))
        assert c["top1"] == top1(predict(folder / c["path"], check.inputs), check.labels), c["name"]
        assert c["drop_points"] == pytest.approx(100 * (result.float_top1 - c["top1"]), abs=0.006)
        assert c["latency_p50_ms"] > 0 and c["latency_runs"] >= 10
    rows = {c["name"]: c for c in result.candidates}
    assert abs(rows["float32"]["drop_points"]) <= 0.5  # the float file is the float model
    assert rows["int8"]["calibration_samples"] == 100 and rows["int8_more_calibration"]["calibration_samples"] == 400
    assert rows["qat_int8"]["calibration_samples"] is None  # a QAT model carries its own ranges
    # Pruning really happened and survived into the int8 file.
    assert kernel_stats(folder / rows["prune90_int8"]["path"])["int8_sparsity_overall"] > 0.8
    assert rows["prune90_int8"]["gzip_bytes"] < rows["int8"]["gzip_bytes"]


@pytest.mark.parametrize("objective", ["size", "latency"])
@pytest.mark.parametrize("budget", [0.0, 1.0, 5.0, 100.0])
def test_pick_is_within_budget_and_best_among_those(searched, objective, budget):
    result = searched[0].reselect(max_accuracy_drop=budget, objective=objective)
    key = KEYS[objective]
    within = [c for c in measured(result) if c["drop_points"] <= budget]
    assert [c["name"] for c in result.candidates if c["within_budget"]] == [c["name"] for c in within]
    if not within:
        assert result.pick is None and result.reason.startswith("no candidate is within the budget")
        return
    pick = result.pick_row
    assert pick["drop_points"] <= budget and pick["picked"]
    assert pick[key] == min(c[key] for c in within)
    assert result.reason.startswith(f"picked {pick['name']}")
    assert [c["name"] for c in result.candidates if c["picked"]] == [pick["name"]]
    for c in result.candidates:
        if not c["picked"] and not c["within_budget"]:
            assert c["reason"].startswith(f"over budget by {c['drop_points'] - budget:.2f} points")


@pytest.mark.parametrize("objective", ["size", "latency"])
def test_pareto_set_is_non_dominated(searched, objective):
    result = searched[0].reselect(objective=objective)
    key, rows = KEYS[objective], measured(result)

    def beats(a, b):
        return a["top1"] >= b["top1"] and a[key] <= b[key] and (a["top1"] > b["top1"] or a[key] < b[key])

    front = {c["name"] for c in rows if not any(beats(o, c) for o in rows)}
    assert front and set(result.pareto) == front
    by_name = {c["name"]: c for c in rows}
    assert [by_name[n][key] for n in result.pareto] == sorted(by_name[n][key] for n in result.pareto)
    for c in rows:
        assert c["pareto"] == (c["name"] in front)
        if not c["pareto"]:  # never the pick, and the reason names a candidate that really beats it
            assert not c["picked"] and beats(by_name[c["dominated_by"]], c)
            assert f"dominated by {c['dominated_by']}" in c["reason"]


def row(name, top1, gzip_bytes, p50=1.0, **extra):
    return {"name": name, "technique": "none", "format": "tflite-int8", "top1": top1, "bytes": 2 * gzip_bytes,
            "gzip_bytes": gzip_bytes, "latency_p50_ms": p50, **extra}


def test_zero_budget_with_only_lossy_candidates_says_so(tmp_path):
    rows = [row("int8", 0.94, 100), row("prune80_int8", 0.80, 60), row("dynamic", 0.945, 150)]
    result = select(rows, float_top1=0.95, max_accuracy_drop=0.0, objective="size")
    assert result.pick is None and result.pick_row is None
    assert result.reason == ("no candidate is within the budget of 0 points: the smallest top-1 drop is 0.50 points "
                             "(dynamic); raise max_accuracy_drop (--max-accuracy-drop) to at least 0.50, or add "
                             "lossless rungs (float32, float16) to the ladder")
    reasons = {c["name"]: c["reason"] for c in result.candidates}
    assert reasons["int8"] == "over budget by 1.00 points (top-1 drop 1.00)"
    assert reasons["prune80_int8"] == "over budget by 15.00 points (top-1 drop 15.00)"
    assert result.pareto == ["prune80_int8", "int8", "dynamic"]
    # A lossless candidate is the only one a zero budget can pick.
    lossless = select([*rows, row("float16", 0.95, 300)], float_top1=0.95, max_accuracy_drop=0.0, objective="size")
    assert lossless.pick == "float16"
    written = write_search_report(result, tmp_path)
    assert "no candidate is within the budget" in written["search_md"].read_text()
    assert json.loads(written["search_json"].read_text())["pick"] is None
    assert written["search_plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_loser_says_why():
    rows = [row("a", 0.90, 100), row("b", 0.95, 200, p50=3.0), row("c", 0.94, 300), row("d", 0.96, 400),
            {"name": "e", "technique": "prune", "format": "tflite-int8", "error": "prune: not a Keras 2 model"}]
    result = select(rows, float_top1=0.95, max_accuracy_drop=1.0, objective="size")
    reasons = {c["name"]: c["reason"] for c in result.candidates}
    assert result.pick == "b" and reasons["b"].startswith("pick: the smallest gzip size of the 3 candidate(s)")
    assert reasons["a"] == "over budget by 4.00 points (top-1 drop 5.00)"  # and on the front: smallest
    assert reasons["c"].startswith("dominated by b (top-1 95.00% vs 94.00%, 200 gzip bytes vs 300 gzip bytes)")
    assert reasons["d"] == "larger than the pick b (400 gzip bytes vs 200 gzip bytes)"
    assert reasons["e"] == "failed: prune: not a Keras 2 model"
    assert result.pareto == ["a", "b", "d"]
    fastest = result.reselect(objective="latency")  # b is slow: the in-budget d, as fast as c and better, wins
    assert fastest.pick == "d" and fastest.candidates[1]["reason"].startswith("dominated by d")


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ('[optimize.search]\nladder = ["int8", "int3"]\n',
         r"optimize\.search\.ladder = 'int3' is not allowed; choose from float32, float16, dynamic, int8"),
        ('[optimize.search]\nobjective = "speed"\n',
         r"optimize\.search\.objective = 'speed' is not allowed; choose from size, latency"),
        ("[optimize.search]\nmax_accuracy_drop = -1\n",
         r"optimize\.search\.max_accuracy_drop = -1\.0 is out of range; allowed: 0\.0 <= max_accuracy_drop <= 100"),
        ("[optimize.search]\nsparsities = [0.5, 1.5]\n", r"optimize\.search\.sparsities = 1\.5 is out of range"),
        ("[optimize.search]\nbudget = 1\n", r"unknown key 'optimize\.search\.budget'; allowed here: enabled, "),
    ],
)
def test_bad_search_keys_are_recipe_errors_naming_the_key(tmp_path, text, pattern):
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=pattern):
        load_recipe(path)


def test_ladder_resolution_and_its_errors():
    assert set(RUNGS) == set(SEARCH_LADDER)
    rungs = resolve_ladder(SearchConfig(ladder=["int8", "prune_qat_int8", "int8"], sparsities=[0.5, 0.8]))
    assert [(r.name, r.sparsity) for r in rungs] == [("int8", None), ("prune50_qat_int8", 0.5),
                                                      ("prune80_qat_int8", 0.8)]
    with pytest.raises(RecipeError, match=r"optimize\.search\.ladder is empty; give at least one of float32"):
        resolve_ladder(SearchConfig(ladder=[]))
    with pytest.raises(RecipeError, match=r"optimize\.search\.sparsities is empty but the ladder holds 'prune_int8'"):
        resolve_ladder(SearchConfig(ladder=["prune_int8"], sparsities=[]))
    with pytest.raises(RecipeError, match=r"optimize\.search\.objective = 'speed' is not allowed"):
        select([], float_top1=0.9, max_accuracy_drop=1.0, objective="speed")


def test_default_recipes_do_not_search():
    assert not load_recipe("quickstart").optimize.search.enabled
    assert not recipe_from_dict({}).optimize.search.enabled


@pytest.fixture
def tiny_run(tmp_path, trained_tiny):
    """A run directory whose train stage holds the tiny model; optimize runs no technique, only the search."""
    recipe = tiny_recipe(optimize={"techniques": [], "check_samples": 0, "search": FAST})
    return run_with_trained(tmp_path / "run", trained_tiny, recipe).path


def test_optimize_cli_flags_run_the_search_and_record_it(tiny_run, capsys):
    from edgesmith.workflow import bench_artifacts, load_run_recipe

    args = ["optimize", str(tiny_run), "--max-accuracy-drop", "2.5", "--objective", "latency",
            "--ladder", "float16,int8"]
    assert main(args) == 0
    out = capsys.readouterr().out
    entry = RunDir.open(tiny_run).manifest()["stages"]["optimize"]
    assert entry["config"]["search"]["enabled"] and entry["config"]["search"]["ladder"] == ["float16", "int8"]
    summary = entry["metrics"]["search"]
    assert summary["objective"] == "latency" and summary["max_accuracy_drop"] == 2.5 and summary["candidates"] == 2
    report = json.loads((tiny_run / "optimize" / "search.json").read_text())
    assert report["pick"] == summary["pick"] and report["reason"] == summary["reason"]
    assert summary["reason"] in out and "| candidate |" in out  # search.md printed
    assert {"search_json", "search_md", "search_plot"} <= set(entry["outputs"])
    assert (tiny_run / "optimize" / "search.png").stat().st_size > 0
    kept = sorted(p.name for p in (tiny_run / "optimize" / "search").glob("*.tflite"))
    if summary["pick"] is None:
        assert kept == []
    else:  # only the pick's file is kept, and bench measures it with the other artifacts
        assert kept == [f"{summary['pick']}.tflite"] and entry["outputs"]["search_pick"]["sha256"]
        run = RunDir.open(tiny_run)
        assert bench_artifacts(run, load_run_recipe(run))["search_pick"].name == kept[0]


def test_optimize_cli_without_flags_does_not_search(tiny_run):
    assert main(["optimize", str(tiny_run)]) == 0
    entry = RunDir.open(tiny_run).manifest()["stages"]["optimize"]
    assert "search" not in entry["metrics"] and "search_json" not in entry["outputs"]
    assert not (tiny_run / "optimize" / "search.json").exists()


@pytest.mark.parametrize(
    ("flags", "pattern"),
    [
        (["--objective", "speed"], r"--objective 'speed': .*optimize\.search\.objective = 'speed' is not allowed; "
                                   r"choose from size, latency"),
        (["--ladder", "int8,int3"], r"--ladder 'int8,int3': .*optimize\.search\.ladder = 'int3' is not allowed"),
        (["--max-accuracy-drop=-1"], r"--max-accuracy-drop '-1': .*max_accuracy_drop = -1\.0 is out of range"),
        (["--max-accuracy-drop", "lots"], r"--max-accuracy-drop 'lots': .*must be float, got str 'lots'"),
    ],
)
def test_bad_optimize_flags_exit_2_with_one_line(tmp_path, capsys, flags, pattern):
    import re

    assert main(["optimize", str(tmp_path), *flags]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgesmith: error: ") and re.search(pattern, err[0]), err
