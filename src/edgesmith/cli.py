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
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set train.head_epochs=1 (repeatable)")
    p.add_argument("--stages", default="train,optimize,export,bench", help="comma-separated stages to run")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train stage alone: a recipe into a new run directory")
    p.add_argument("recipe")
    p.add_argument("--data")
    p.add_argument("--out")
    p.add_argument("--force", action="store_true")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _add_stage(sub: argparse._SubParsersAction, stage: str, help_text: str) -> None:
    p = sub.add_parser(stage, help=help_text)
    p.add_argument("run_dir", help="run directory made by `edgesmith run` or `edgesmith train`")
    p.add_argument("--data", help="data folder, if it moved since the run was made")


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
    return parser


def _load(args: argparse.Namespace):
    from edgesmith.recipe import apply_overrides, load_recipe

    recipe = load_recipe(args.recipe)
    return apply_overrides(recipe, args.overrides) if args.overrides else recipe


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
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from edgesmith.workflow import run_stage

    entry = run_stage(args.command, args.run_dir, data_path=args.data)
    print(json.dumps({"stage": args.command, "outputs": {k: v["path"] for k, v in entry["outputs"].items()},
                      "metrics": entry["metrics"]}, indent=2, default=str))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from edgesmith.zoo import list_backbones

    print(f"{'name':<20} {'size':>5}  {'preprocess':<10} {'imagenet':<8} description")
    for b in list_backbones():
        print(f"{b.name:<20} {b.default_size:>5}  {b.preprocess:<10} {'yes' if b.has_imagenet else 'no':<8} {b.description}")
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    from edgesmith.bench import environment

    print(json.dumps(environment(), indent=2))
    return 0


COMMANDS = {"run": cmd_run, "train": lambda a: cmd_run(a, ("train",)), "optimize": cmd_stage,
            "export": cmd_stage, "bench": cmd_stage, "models": cmd_models, "env": cmd_env}


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
