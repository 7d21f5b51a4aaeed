"""Command line: thin argparse subcommands mapped onto the stage functions; no logic of its own."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from edgesmith.errors import EdgesmithError

log = logging.getLogger("edgesmith")
EXIT_BAD_INPUT = 2


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a recipe: train -> optimize -> export -> bench")
    p.add_argument("recipe", help="recipe TOML file, or a bundled recipe name (quickstart)")
    p.add_argument("--data", help="data folder (train/<class>/*, test/<class>/*) or shard directory "
                   "(edgesmith data shard); overrides data.path")
    p.add_argument("--out", help="run directory (default runs/<recipe name>)")
    p.add_argument("--force", action="store_true", help="overwrite an existing run directory")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out: skip stages finished with unchanged outputs "
                        "(same recipe, --set, --strict and --data required)")
    p.add_argument("--strict", action="store_true", help="fail on unreadable image files instead of skipping them")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set train.head_epochs=1 (repeatable)")
    p.add_argument("--stages", default="train,optimize,export,bench", help="comma-separated stages to run")
    _add_strategy(p)


def _add_strategy(p: argparse.ArgumentParser) -> None:
    from edgesmith.recipe import STRATEGIES

    p.add_argument("--strategy", choices=STRATEGIES,
                   help="tf.distribute strategy for training (overrides train.strategy): auto = all GPUs of this "
                        "machine, multiworker = the machines in TF_CONFIG; train.batch_size is per replica")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train stage alone: a recipe into a new run directory")
    p.add_argument("recipe")
    p.add_argument("--data")
    p.add_argument("--out")
    p.add_argument("--force", action="store_true")
    p.add_argument("--strict", action="store_true", help="fail on unreadable image files instead of skipping them")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    _add_strategy(p)


def _add_stage(sub: argparse._SubParsersAction, stage: str, help_text: str) -> None:
    p = sub.add_parser(stage, help=help_text)
    p.add_argument("run_dir", help="run directory made by `edgesmith run` or `edgesmith train`")
    p.add_argument("--data", help="data folder or shard directory, if it moved since the run was made")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value for this stage only, e.g. --set optimize.techniques=[] (repeatable)")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    _add_stage(sub, "bench", "bench stage alone (accuracy, size, latency, memory, reports) on a run directory")
    p = sub.choices["bench"]
    p.add_argument("--batch-sizes", metavar="N,N", help="images per timed call, e.g. 1,8,32 (bench.batch_sizes)")
    p.add_argument("--threads", metavar="N,N", help="thread counts, 0 = all cores, e.g. 1,0 (bench.threads)")
    p.add_argument("--device", choices=("cpu", "gpu"), help="gpu: ONNX on CUDA, Keras on TensorFlow's GPU")
    p.add_argument("--onnx-providers", metavar="NAME,NAME",
                   help="ONNX Runtime providers, first preferred: TensorrtExecutionProvider,CUDAExecutionProvider")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement (a process per model)")


def _bench_overrides(args: argparse.Namespace) -> list[str]:
    """The bench flags as recipe overrides (validated like the recipe's own values)."""
    lists = {"batch_sizes": args.batch_sizes, "threads": args.threads}
    overrides = [f"bench.{key}=[{value}]" for key, value in lists.items() if value]
    if args.onnx_providers:
        overrides.append("bench.onnx_providers=" + str([p.strip() for p in args.onnx_providers.split(",")]))
    overrides += [f'bench.device="{args.device}"'] if args.device else []
    return overrides + (["bench.memory=false"] if args.no_memory else [])


def _add_export(sub: argparse._SubParsersAction) -> None:
    from edgesmith.recipe import EXPORT_FORMATS

    _add_stage(sub, "export", "export stage alone (TFLite, ONNX, validated) on a run directory")
    p = sub.choices["export"]
    p.add_argument("--formats", metavar="FMT,FMT",
                   help=f"formats to export (export.formats): {', '.join(EXPORT_FORMATS)}")
    p.add_argument("--onnx-int8-variants", metavar="NAME,NAME",
                   help="ONNX Runtime int8 variants to try, e.g. qdq-channel-minmax-u8s8,qdq-channel-entropy-s8s8 "
                        "(export.onnx_int8_variants; default: those right for this CPU)")


def _export_overrides(args: argparse.Namespace) -> list[str]:
    """The export flags as recipe overrides (validated like the recipe's own values)."""
    lists = {"formats": args.formats, "onnx_int8_variants": args.onnx_int8_variants}
    return [f"export.{key}=" + str([v.strip() for v in value.split(",")]) for key, value in lists.items() if value]


def _add_optimize(sub: argparse._SubParsersAction) -> None:
    from edgesmith.recipe import SEARCH_LADDER

    _add_stage(sub, "optimize", "optimize stage alone (pruning, QAT, clustering; the accuracy-budgeted search) "
               "on a run directory")
    p = sub.choices["optimize"]
    p.add_argument("--search", action="store_true",
                   help="also run the accuracy-budgeted search with the recipe's [optimize.search] settings "
                        "(implied by the flags below)")
    p.add_argument("--max-accuracy-drop", metavar="POINTS",
                   help="search: top-1 points the pick may lose against the float model "
                        "(optimize.search.max_accuracy_drop)")
    p.add_argument("--objective", metavar="size|latency",
                   help="search: what the pick minimizes, gzip bytes or batch-1 p50 latency "
                        "(optimize.search.objective)")
    p.add_argument("--ladder", metavar="RUNG,RUNG",
                   help=f"search: candidates to try (optimize.search.ladder): {', '.join(SEARCH_LADDER)}")


# optimize flag -> (recipe key, how its text becomes a TOML value); each is validated like the recipe's values
SEARCH_FLAGS = {
    "max_accuracy_drop": ("optimize.search.max_accuracy_drop", lambda text: text),
    "objective": ("optimize.search.objective", lambda text: f'"{text}"'),
    "ladder": ("optimize.search.ladder", lambda text: str([v.strip() for v in text.split(",") if v.strip()])),
}


def _optimize_overrides(args: argparse.Namespace) -> list[str]:
    """The search flags as recipe overrides; any of them turns the search on. A bad value is a RecipeError
    naming the flag."""
    from edgesmith.errors import RecipeError
    from edgesmith.recipe import Recipe, apply_overrides

    overrides = []
    for attr, (key, to_toml) in SEARCH_FLAGS.items():
        value = getattr(args, attr)
        if value is None:
            continue
        override = f"{key}={to_toml(value)}"
        try:
            apply_overrides(Recipe(), [override])
        except RecipeError as exc:
            raise RecipeError(f"--{attr.replace('_', '-')} {value!r}: {exc}") from None
        overrides.append(override)
    enabled = args.search or overrides
    return [*overrides, "optimize.search.enabled=true"] if enabled else []


def _add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="check a run's report against a budgets.toml (exit 1 on any violation)")
    p.add_argument("run_dir", help="run directory holding report.json (or a report.json file)")
    p.add_argument("--budget", required=True, help="budgets.toml: limits per artifact name or glob")
    p.add_argument("--baseline", help="an older report.json (or run directory) for the growth rules")


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="re-render a run's report.md, or compare runs side by side")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="run directory (or report.json); two or more are compared, the first is the baseline")


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="data set tools: write an image folder as TFRecord shards")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    s = data_sub.add_parser("shard", help="write IMAGE_DIR (train/<class>/*, test/<class>/*) as TFRecord shards")
    s.add_argument("image_dir", help="image folder laid out as train/<class>/* and test/<class>/* (or val/)")
    s.add_argument("--out", required=True, help="shard directory to create (pass it as --data later)")
    s.add_argument("--shard-size-mb", type=float, default=100.0, help="size of each shard file in MB (default 100)")
    s.add_argument("--force", action="store_true", help="replace an existing --out")
    s.add_argument("--strict", action="store_true", help="fail on unreadable image files instead of skipping them")


def _add_ensemble(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ensemble", help="ensembles (averaging, bagging, boosting, stacking) of a run's model "
                       "with other runs' models, shipped as single files, with a report")
    p.add_argument("run_dir", help="run directory whose train stage finished")
    p.add_argument("--member", dest="members", action="append", default=[], metavar="RUN_DIR",
                   help="another run directory whose trained model joins as a member (repeatable)")
    p.add_argument("--data", help="data folder, if it moved since the run was made")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set ensemble.estimators='[\"adaboost\"]' (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgesmith", description="Edge-ready models and hard numbers about them.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("--trust", action="store_true",
                        help="load Keras Lambda layers and pickles no run directory vouches for (they run code): "
                             "only for files from a source you trust")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_train(sub)
    _add_optimize(sub)
    _add_export(sub)
    _add_bench(sub)
    sub.add_parser("models", help="list the registered backbones")
    sub.add_parser("env", help="versions, CPU, threads and GPUs of this machine")
    _add_check(sub)
    _add_report(sub)
    _add_data(sub)
    _add_ensemble(sub)
    return parser


def _load(args: argparse.Namespace):
    from edgesmith.recipe import apply_overrides, load_recipe

    recipe = load_recipe(args.recipe)
    overrides = [*args.overrides, *(["data.strict=true"] if args.strict else [])]
    if getattr(args, "strategy", None):
        overrides.append(f'train.strategy="{args.strategy}"')
    return apply_overrides(recipe, overrides) if overrides else recipe


def cmd_run(args: argparse.Namespace, stages: tuple[str, ...] | None = None) -> int:
    from edgesmith.workflow import STAGE_RUNNERS, run_recipe

    recipe = _load(args)
    stages = stages or tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = [s for s in stages if s not in STAGE_RUNNERS]
    if unknown:
        raise EdgesmithError(f"--stages: unknown stage {unknown[0]!r}; choose from {', '.join(STAGE_RUNNERS)}")
    if "train" in stages:  # multi-worker set-up must precede any TensorFlow operation (loading data may run some)
        from edgesmith.train.distribute import strategy_for

        strategy_for(recipe.train.strategy)
    out = Path(args.out or Path("runs") / recipe.name)
    run = run_recipe(recipe, out=out, data_path=args.data, force=args.force, resume=getattr(args, "resume", False),
                     stages=stages)
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

    overrides = [*args.overrides, *{"bench": _bench_overrides, "export": _export_overrides,
                                    "optimize": _optimize_overrides}.get(args.command, lambda _: [])(args)]
    entry = run_stage(args.command, args.run_dir, data_path=args.data, overrides=overrides)
    if "search_md" in entry["outputs"]:
        print((Path(args.run_dir) / entry["outputs"]["search_md"]["path"]).read_text())
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


def cmd_data(args: argparse.Namespace) -> int:
    from edgesmith.data.shards import write_shards

    index = write_shards(args.image_dir, args.out, shard_size_mb=args.shard_size_mb, force=args.force,
                         strict=args.strict)
    for name, split in index["splits"].items():
        print(f"{name}: {split['count']} images in {len(split['shards'])} shard(s), "
              f"{sum(s['bytes'] for s in split['shards']) / 2**20:.1f} MB")
    print(f"skipped {len(index['skipped'])} unreadable file(s); shard directory: {args.out}")
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from edgesmith.runs import RunDir
    from edgesmith.workflow import run_ensemble

    run_ensemble(args.run_dir, members=args.members, data_path=args.data, overrides=args.overrides)
    print(RunDir.open(args.run_dir).stage_output("ensemble", "report").read_text())
    return 0


COMMANDS = {"run": cmd_run, "train": lambda a: cmd_run(a, ("train",)), "optimize": cmd_stage,
            "export": cmd_stage, "bench": cmd_stage, "models": cmd_models, "env": cmd_env,
            "check": cmd_check, "report": cmd_report, "data": cmd_data, "ensemble": cmd_ensemble}


def _configure_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("tensorflow", "absl", "tf2onnx", "h5py", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.quiet)
    if args.trust:
        from edgesmith.safety import trust_everything

        trust_everything()
    try:
        return COMMANDS[args.command](args)
    except EdgesmithError as exc:
        print(f"edgesmith: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C during shutdown must not print a traceback
        print("edgesmith: interrupted; the run directory's manifest.json records which stages finished; "
              "repeat the command with --resume to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
