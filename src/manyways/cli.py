"""The ``manyways`` command: one sub-command per stage, plus config, model and experiment tools.

Every stage command takes a config YAML and ``key=value`` overrides::

    manyways config show configs/tiny_cpu.yaml generate.samples=2
    manyways prepare-model
    manyways generate configs/tiny_cpu.yaml            # then verify, score, select, ...
    manyways pipeline configs/tiny_cpu.yaml            # every stage of one arm, in order
    manyways experiment configs/tiny_cpu.yaml          # every arm, compared in one report
    manyways experiment configs/tiny_cpu.yaml --jobs 2 # two stage runs at once (one per core)

Logging is configured here and only here (:func:`setup_logging`, also in an experiment's worker
processes).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from manyways import __version__

log = logging.getLogger("manyways")

STAGES = (
    "generate",
    "verify",
    "score",
    "select",
    "midtrain",
    "rl",
    "evaluate",
    "validity",
    "analyze",
    "report",
)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML (e.g. configs/tiny_cpu.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, dotted keys")
    p.add_argument("--overwrite", action="store_true", help="replace outputs made with a different config")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="manyways", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"manyways {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    cfg = sub.add_parser("config", help="inspect configs").add_subparsers(
        dest="config_command", required=True
    )
    show = cfg.add_parser("show", help="print the resolved config")
    show.add_argument("config")
    show.add_argument("overrides", nargs="*", metavar="key=value")

    prep = sub.add_parser("prepare-model", help="de-quantize the embedded default model into the cache")
    prep.add_argument("--force", action="store_true", help="rebuild even when the cache is complete")

    for name in STAGES:
        _add_config_args(sub.add_parser(name, help=f"run the {name} stage"))
    _add_config_args(sub.add_parser("pipeline", help="run every stage of one arm in order"))
    exp_cmd = sub.add_parser("experiment", help="run every arm of the config and compare them")
    _add_config_args(exp_cmd)
    exp_cmd.add_argument(
        "--plan",
        action="store_true",
        help="print each arm's stages, sizes, tokens and GPU-hours; run nothing",
    )
    exp_cmd.add_argument(
        "--rehearse",
        action="store_true",
        help="run the config on this CPU with tiny stand-ins for Hub models and data (manyways.rehearsal)",
    )
    exp_cmd.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="stage runs at once, in worker processes (default: experiment.jobs; the demo's is 2)",
    )
    exp_cmd.add_argument(
        "--rehearse-scale", type=int, default=None, help="rehearsal: divisor of question counts"
    )

    peek = sub.add_parser("peek", help="answer a few problems under two heuristics and verify them")
    _add_config_args(peek)
    peek.add_argument("--problems", type=int, default=3)

    exp = sub.add_parser("export", help="export RL / mid-training data for verl, OpenRLHF, TRL")
    _add_config_args(exp)
    exp.add_argument("--out", type=Path, default=None, help="output directory (default <run>/export)")

    serve = sub.add_parser("serve", help="an OpenAI-compatible server wrapping a back-end")
    _add_config_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    return parser


def setup_logging(level: int, worker: bool = False) -> None:
    """The command's logging; an experiment's worker processes (``worker``) name themselves."""
    name = " [%(processName)s]" if worker else ""
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s{name} %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "transformers", "torch", "ray"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def quiet_library_bars() -> None:
    """--no-progress also silences transformers' and datasets' own bars."""
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    try:
        import datasets
        import transformers

        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
    except ImportError:
        pass


def _load(args: argparse.Namespace):  # noqa: ANN202
    from manyways.config import load_config

    return load_config(args.config, args.overrides)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may come after options (`... --overwrite a.b=1`): argparse leaves those over
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from manyways.artifacts import ArtifactError
    from manyways.config import ConfigError

    try:
        return _dispatch(args)
    except (ConfigError, ArtifactError, FileNotFoundError, ValueError, RuntimeError, ImportError) as exc:
        log.debug("failed", exc_info=True)
        print(f"manyways: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("manyways: interrupted; finished shards are kept, rerun to resume", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "config":
        from manyways.config import dump_config

        print(dump_config(_load(args)), end="")
        return 0
    if args.command == "prepare-model":
        from manyways.models import prepare_default_model

        print(prepare_default_model(force=args.force))
        return 0
    from manyways import pipeline

    cfg = _load(args)
    progress = not args.no_progress
    if not progress:
        quiet_library_bars()
    if args.command in STAGES:
        manifest = pipeline.run_stage(args.command, cfg, overwrite=args.overwrite, show_progress=progress)
        if "summary" in manifest:
            print(manifest["summary"])
    elif args.command == "pipeline":
        pipeline.run_all(cfg, overwrite=args.overwrite, show_progress=progress)
    elif args.command == "experiment" and args.plan:
        from manyways.plan import format_plan, project

        print(format_plan(project(cfg)))
    elif args.command == "experiment" and args.rehearse:
        from manyways.rehearsal import Scale, rehearse

        print(rehearse(cfg, scale=Scale(questions=args.rehearse_scale), overwrite=args.overwrite)["report"])
    elif args.command == "experiment":
        from manyways.experiment import run_experiment

        result = run_experiment(cfg, overwrite=args.overwrite, show_progress=progress, jobs=args.jobs)
        print(result["summary"])
        print(f"\nreport: {result['report']}")
    elif args.command == "peek":
        from manyways.peek import format_peek, peek

        print(format_peek(peek(cfg, n_problems=args.problems)))
    elif args.command == "export":
        from manyways.exports import export_all

        for path in export_all(cfg, args.out):
            print(path)
    elif args.command == "serve":
        from manyways.backends.config import make_backend
        from manyways.serve import run_server

        run_server(make_backend(cfg.generate.backend, cfg.model.name), host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
