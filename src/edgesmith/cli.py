"""Command line: thin argparse subcommands mapped onto the stage functions; no logic of its own."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from edgesmith.errors import EdgesmithError

log = logging.getLogger("edgesmith")
EXIT_BAD_INPUT = 2


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a recipe: train -> optimize -> export -> bench")
    p.add_argument("recipe", help="recipe TOML file, or a bundled recipe name (quickstart)")
    p.add_argument("--data", help="data folder (train/<class>/*, test/<class>/*); overrides data.path")
    p.add_argument("--out", help="run directory (default runs/<recipe name>)")
    p.add_argument("--force", action="store_true", help="overwrite an existing run directory")
    p.add_argument("--strict", action="store_true", help="fail on unreadable image files instead of skipping them")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set train.head_epochs=1 (repeatable)")
    p.add_argument("--stages", default="train,optimize,export,bench", help="comma-separated stages to run")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train stage alone: a recipe into a new run directory")
    p.add_argument("recipe")
    p.add_argument("--data")
    p.add_argument("--out")
    p.add_argument("--force", action="store_true")
    p.add_argument("--strict", action="store_true", help="fail on unreadable image files instead of skipping them")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _add_stage(sub: argparse._SubParsersAction, stage: str, help_text: str) -> None:
    p = sub.add_parser(stage, help=help_text)
    p.add_argument("run_dir", help="run directory made by `edgesmith run` or `edgesmith train`")
    p.add_argument("--data", help="data folder, if it moved since the run was made")


def _add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="check a run's report against a budgets.toml (exit 1 on any violation)")
    p.add_argument("run_dir", help="run directory holding report.json (or a report.json file)")
    p.add_argument("--budget", required=True, help="budgets.toml: limits per artifact name or glob")
    p.add_argument("--baseline", help="an older report.json (or run directory) for the growth rules")


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="re-render a run's report.md, or compare runs side by side")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="run directory (or report.json); two or more are compared, the first is the baseline")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgesmith", description="Edge-ready models and hard numbers about them.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_train(sub)
    _add_stage(sub, "optimize", "optimize stage alone (pruning, QAT) on a run directory")
    _add_stage(sub, "export", "export stage alone (TFLite, ONNX, validated) on a run directory")
    _add_stage(sub, "bench", "bench stage alone (accuracy, size, latency, reports) on a run directory")
    sub.add_parser("models", help="list the registered backbones")
    sub.add_parser("env", help="versions, CPU, threads and GPUs of this machine")
    _add_check(sub)
    _add_report(sub)
    return parser


def _load(args: argparse.Namespace):
    from edgesmith.recipe import apply_overrides, load_recipe

    recipe = load_recipe(args.recipe)
    overrides = [*args.overrides, *(["data.strict=true"] if args.strict else [])]
    return apply_overrides(recipe, overrides) if overrides else recipe


def cmd_run(args: argparse.Namespace, stages: tuple[str, ...] | None = None) -> int:
    from edgesmith.workflow import STAGE_RUNNERS, run_recipe

    recipe = _load(args)
    stages = stages or tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = [s for s in stages if s not in STAGE_RUNNERS]
    if unknown:
        raise EdgesmithError(f"--stages: unknown stage {unknown[0]!r}; choose from {', '.join(STAGE_RUNNERS)}")
    out = Path(args.out or Path("runs") / recipe.name)
    run = run_recipe(recipe, out=out, data_path=args.data, force=args.force, stages=stages)
    report = run.path / "report.md"
    print(report.read_text() if report.exists() else f"run directory: {run.path}")
    print(f"run directory: {run.path}")
    return _report_failed_exports(run)


def _report_failed_exports(run) -> int:
    from edgesmith.workflow import failed_exports

    failed = failed_exports(run)
    for reason in failed.values():
        print(f"edgesmith: export failed validation: {reason}", file=sys.stderr)
    return 1 if failed else 0


def cmd_stage(args: argparse.Namespace) -> int:
    from edgesmith.workflow import run_stage

    entry = run_stage(args.command, args.run_dir, data_path=args.data)
    print(json.dumps({"stage": args.command, "outputs": {k: v["path"] for k, v in entry["outputs"].items()},
                      "metrics": entry["metrics"]}, indent=2, default=str))
    if args.command == "export":
        from edgesmith.runs import RunDir

        return _report_failed_exports(RunDir.open(args.run_dir))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from edgesmith.zoo import list_backbones

    print(f"{'name':<20} {'size':>5}  {'preprocess':<10} {'imagenet':<8} description")
    for b in list_backbones():
        imagenet = "yes" if b.has_imagenet else "no"
        print(f"{b.name:<20} {b.default_size:>5}  {b.preprocess:<10} {imagenet:<8} {b.description}")
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    from edgesmith.bench import environment

    print(json.dumps(environment(), indent=2))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from edgesmith.bench.budgets import check, format_results, load_budgets
    from edgesmith.bench.report import load_report

    budgets = load_budgets(args.budget)
    report = load_report(args.run_dir)
    baseline = load_report(args.baseline) if args.baseline else None
    results = check(report, budgets, baseline)
    print(format_results(results))
    return 1 if any(not r.passed for r in results) else 0


def cmd_report(args: argparse.Namespace) -> int:
    from edgesmith.bench.report import compare_markdown, load_report, rewrite_markdown, run_labels

    reports = [load_report(path) for path in args.run_dirs]
    if len(reports) > 1:
        print(compare_markdown(reports, run_labels(reports, args.run_dirs)))
        return 0
    run_dir = Path(args.run_dirs[0])
    run_dir = run_dir if run_dir.is_dir() else run_dir.parent
    written = rewrite_markdown(reports[0], run_dir, extra_sections=_run_sections(run_dir))
    print(written.read_text())
    print(f"rewrote {written}")
    return 0


def _run_sections(run_dir: Path) -> list[str]:
    """The export-validation and pruning sections of a run's report.md (none outside a run directory)."""
    from edgesmith.runs import MANIFEST, RunDir
    from edgesmith.workflow import report_sections

    return report_sections(RunDir(run_dir)) if (run_dir / MANIFEST).is_file() else []


COMMANDS = {"run": cmd_run, "train": lambda a: cmd_run(a, ("train",)), "optimize": cmd_stage,
            "export": cmd_stage, "bench": cmd_stage, "models": cmd_models, "env": cmd_env,
            "check": cmd_check, "report": cmd_report}


def _configure_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("tensorflow", "absl", "tf2onnx", "h5py", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.quiet)
    try:
        return COMMANDS[args.command](args)
    except EdgesmithError as exc:
        print(f"edgesmith: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("edgesmith: interrupted; finished stages are recorded in the run directory's manifest.json",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
