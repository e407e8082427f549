"""The ``optimkit`` command: ``list``, ``bench``, ``speed``, ``report``.

Bad input (unknown names, unusable paths, a corrupt database) prints one line
``optimkit: error: ...`` on stderr and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

DEFAULT_OUT = "optimkit-results"
DB_NAME = "bench.sqlite"


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        raise _UsageError(f"{message} (see '{self.prog} --help')")


def _err(message: str) -> None:
    print(f"optimkit: error: {' '.join(str(message).split())}", file=sys.stderr)


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from .bench.protocol import SUITES

    parser = _Parser(prog="optimkit", description="optimkit: training optimizers for PyTorch. "
                     "Benchmark them on your machine with 'optimkit bench --suite quick'.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("list", help="list optimizers, workloads and suites")
    p.add_argument("what", nargs="?", default="all", choices=["all", "optimizers", "workloads", "suites"])
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("bench", help="benchmark optimizers: tuning, time to target, profiles, report",
                       description="Tune and evaluate optimizers on workloads; results go to a SQLite "
                                   "database (resumable: rerun the same command to continue) and a report.")
    p.add_argument("--suite", choices=sorted(SUITES), default="quick",
                   help="preset of workloads, optimizers and protocol (default: quick)")
    p.add_argument("--optimizers", nargs="+", metavar="SPEC",
                   help="optimizer specs, comma or space separated: NAME[:key=value,...], "
                        "e.g. adamw sgd:momentum=0.9 (default: the suite's list)")
    p.add_argument("--workloads", nargs="+", metavar="NAME", help="workloads (default: the suite's)")
    p.add_argument("--out", default=None, help=f"report directory (default: ./{DEFAULT_OUT})")
    p.add_argument("--db", default=None, help=f"results database (default: OUT/{DB_NAME})")
    p.add_argument("--search", choices=["grid", "tpe"], default=None,
                   help="learning-rate search: log-spaced grid or Optuna TPE (default: grid)")
    p.add_argument("--trials", type=int, default=None, help="tuning trials per optimizer and workload")
    p.add_argument("--tune-seeds", type=int, default=None, metavar="N", help="number of tuning seeds")
    p.add_argument("--eval-seeds", type=int, default=None, metavar="N", help="number of held-out seeds")
    p.add_argument("--track", choices=["external", "self", "both"], default=None,
                   help="external tuning, self-tuning (defaults only) or both (default: both)")
    p.add_argument("--lr-range", default=None, metavar="LO,HI",
                   help="tuned lr range as multiples of each optimizer's default lr (default: 0.1,316.2)")
    p.add_argument("--budget-scale", type=float, default=None, help="multiply every step budget")
    p.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="run trials here (local) or as Ray tasks (ray)")
    p.add_argument("--jobs", type=int, default=1, help="parallel trials (local: worker processes)")
    p.add_argument("--ray-address", default=None,
                   help="address of an existing Ray cluster (default: start Ray locally)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per trial (default: 1)")
    p.add_argument("--new-run", action="store_true",
                   help="start a new run even if the database holds one with the same settings")
    p.add_argument("--no-report", action="store_true", help="do not write the report")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.set_defaults(func=cmd_bench)

    sub.add_parser("speed", help="step-time and memory benchmark of optimizers (and installed peers)",
                   add_help=False)

    p = sub.add_parser("report", help="write the Markdown/HTML report of a bench run")
    p.add_argument("--db", default=None, help=f"results database (default: ./{DEFAULT_OUT}/{DB_NAME})")
    p.add_argument("--out", default=None, help="report directory (default: the database's directory)")
    p.add_argument("--run", type=int, default=None, help="run id (default: the latest)")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.set_defaults(func=cmd_report)
    return parser


# --------------------------------------------------------------------------- helpers
def _ensure_out_dir(path: str) -> str:
    from .bench.protocol import BenchError

    if os.path.exists(path) and not os.path.isdir(path):
        raise BenchError(f"output path {path} is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise BenchError(f"cannot create output directory {path}: {exc.strerror or exc}") from None
    if not os.path.isdir(path):
        raise BenchError(f"output path {path} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".optimkit-write-test-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise BenchError(f"output directory {path} is not writable: {exc.strerror or exc}") from None
    return path


def _print_json(obj) -> None:
    from .bench.report import _json_safe

    print(json.dumps(_json_safe(obj), indent=1, sort_keys=True))


# --------------------------------------------------------------------------- list
def cmd_list(args) -> int:
    import optimkit

    from .bench.protocol import SUITES
    from .bench.workloads import WORKLOADS

    data: dict = {}
    if args.what in ("all", "optimizers"):
        data["optimizers"] = []
        for name in optimkit.available():
            info = optimkit.info(name)
            data["optimizers"].append({"name": name, "family": info.family, "state_bytes": info.state_bytes,
                                       "lr": info.defaults.get("lr"), "paper": info.paper})
    if args.what in ("all", "workloads"):
        data["workloads"] = [{"name": w.name, "kind": w.kind, "metric": w.metric, "target": w.target,
                              "steps": w.steps, "eval_every": w.eval_every, "data": w.data_source,
                              "description": w.description} for w in WORKLOADS.values()]
    if args.what in ("all", "suites"):
        data["suites"] = [{"name": n, "workloads": list(s.workloads), "optimizers": list(s.optimizers),
                           "search": s.search, "trials": s.n_trials, "tune_seeds": len(s.tune_seeds),
                           "eval_seeds": len(s.eval_seeds), "description": s.description}
                          for n, s in SUITES.items()]
    if args.json:
        _print_json(data)
        return 0
    if "optimizers" in data:
        print(f"optimizers ({len(data['optimizers'])}):")
        w = max((len(o["name"]) for o in data["optimizers"]), default=4)
        for o in data["optimizers"]:
            lr = f"lr={o['lr']:g}" if isinstance(o["lr"], (int, float)) else ""
            print(f"  {o['name']:<{w}}  {o['family']:<16} {o['state_bytes']:>5g} B/param  {lr}")
    if "workloads" in data:
        print("workloads:")
        w = max(len(x["name"]) for x in data["workloads"])
        for x in data["workloads"]:
            print(f"  {x['name']:<{w}}  {x['metric']} <= {x['target']:g} within {x['steps']} steps; "
                  f"{x['description']}")
    if "suites" in data:
        print("suites:")
        for s in data["suites"]:
            print(f"  {s['name']:<8}  {s['description']}")
            print(f"  {'':<8}  workloads: {', '.join(s['workloads'])}")
            print(f"  {'':<8}  optimizers: {', '.join(s['optimizers'])}")
    return 0


# --------------------------------------------------------------------------- bench
def _resolve_config(args):
    from .bench.protocol import (SUITES, BenchConfig, BenchError, OptimizerSpec,
                                 parse_optimizer_list)
    from .bench.workloads import get_workload

    suite = SUITES[args.suite]
    skipped: list[str] = []
    if args.optimizers:
        specs = [OptimizerSpec.parse(s) for s in parse_optimizer_list(args.optimizers)]
    else:
        specs = []
        for text in suite.optimizers:
            try:
                specs.append(OptimizerSpec.parse(text))
            except BenchError:
                skipped.append(text)
    if args.workloads:
        workloads = parse_optimizer_list(args.workloads)  # comma or space separated
        for w in workloads:
            try:
                get_workload(w)
            except KeyError as exc:
                raise BenchError(exc.args[0]) from None
    else:
        workloads = list(suite.workloads)
    tracks = suite.tracks if args.track in (None, "both") else (args.track,)
    lr_range = None
    if args.lr_range:
        try:
            lo, hi = (float(x) for x in args.lr_range.split(","))
        except ValueError:
            raise BenchError(f"--lr-range must be LO,HI (two numbers), got {args.lr_range!r}") from None
        lr_range = (lo, hi)
    for flag, value in (("--tune-seeds", args.tune_seeds), ("--eval-seeds", args.eval_seeds)):
        if value is not None and value < 1:
            raise BenchError(f"{flag} must be at least 1, got {value}")
    kwargs = {}
    if lr_range:
        kwargs["lr_range"] = lr_range
    if args.budget_scale is not None:
        kwargs["budget_scale"] = args.budget_scale
    overridden = any(v is not None for v in (args.optimizers, args.workloads, args.search, args.trials,
                                             args.tune_seeds, args.eval_seeds, args.lr_range,
                                             args.budget_scale)) or args.track not in (None, "both")
    return BenchConfig(
        suite="custom" if overridden else args.suite,
        workloads=workloads, optimizers=specs,
        search=args.search or suite.search,
        n_trials=args.trials if args.trials is not None else suite.n_trials,
        tune_seeds=tuple(range(args.tune_seeds)) if args.tune_seeds else suite.tune_seeds,
        eval_seeds=tuple(1000 + i for i in range(args.eval_seeds)) if args.eval_seeds else suite.eval_seeds,
        tracks=tuple(tracks), skipped=skipped, **kwargs)


def cmd_bench(args) -> int:
    from .bench.engine import run_bench
    from .bench.protocol import BenchError
    from .bench.report import format_summary_table, summarize, summary_json, write_report
    from .bench.store import Store

    if args.jobs < 1:
        raise BenchError(f"--jobs must be at least 1, got {args.jobs}")
    if args.threads < 1:
        raise BenchError(f"--threads must be at least 1, got {args.threads}")
    out = _ensure_out_dir(args.out or DEFAULT_OUT)
    db = args.db or os.path.join(out, DB_NAME)
    cfg = _resolve_config(args)
    progress = not args.quiet
    if cfg.skipped and progress:
        print(f"note: skipping {', '.join(cfg.skipped)} (not registered in this optimkit)", file=sys.stderr)
    store = Store(db)
    try:
        if progress:
            print(f"optimkit bench: {len(cfg.optimizers)} optimizers x {len(cfg.workloads)} workloads "
                  f"({', '.join(cfg.workloads)}); results: {db}", file=sys.stderr)
        outcome = run_bench(cfg, store, backend=args.backend, jobs=args.jobs, address=args.ray_address,
                            new_run=args.new_run, progress=progress, threads=args.threads)
        if progress and outcome.how == "complete" and outcome.ran == 0:
            print(f"note: run {outcome.run_id} with these settings is already complete in {db} "
                  "(use --new-run to run it again)", file=sys.stderr)
        elif progress and outcome.reused:
            print(f"resumed run {outcome.run_id}: {outcome.reused} finished trials kept, "
                  f"{outcome.ran} run now", file=sys.stderr)
        report = None
        if args.no_report:
            summary = summarize(store, outcome.run_id)
        else:
            report = write_report(store, out, outcome.run_id)
            summary = report["summary"]
    finally:
        store.close()
    result = {"run_id": outcome.run_id, "db": db, "out": out, "how": outcome.how, "ran": outcome.ran,
              "reused": outcome.reused, "seconds": round(outcome.seconds, 2), "skipped": cfg.skipped,
              "errors": outcome.errors,
              "report": None if report is None else {"markdown": report["markdown"], "html": report["html"],
                                                     "figures": report["figures"]},
              "scores": {t: d["scores"] for t, d in summary_json(summary)["tracks"].items()}}
    if args.json:
        _print_json(result)
        return 0
    print(format_summary_table(summary))
    print(f"{outcome.ran} trials run, {outcome.reused} reused, in {outcome.seconds:.0f} s; "
          f"results database: {db}")
    if report:
        print(f"report: {report['markdown']} (self-contained HTML: {report['html']})")
    return 0


# --------------------------------------------------------------------------- report
def cmd_report(args) -> int:
    from .bench.report import format_summary_table, summary_json, write_report
    from .bench.store import Store

    db = args.db or os.path.join(DEFAULT_OUT, DB_NAME)
    store = Store(db, create=False)
    try:
        out = _ensure_out_dir(args.out or os.path.dirname(os.path.abspath(db)))
        report = write_report(store, out, args.run)
    finally:
        store.close()
    if args.json:
        s = summary_json(report["summary"])
        _print_json({"run_id": s["run"]["run_id"], "markdown": report["markdown"], "html": report["html"],
                     "figures": report["figures"], "scores": {t: d["scores"] for t, d in s["tracks"].items()}})
        return 0
    print(format_summary_table(report["summary"]))
    print(f"report: {report['markdown']} (self-contained HTML: {report['html']})")
    return 0


# --------------------------------------------------------------------------- speed
def cmd_speed(argv: list[str]) -> int:
    try:
        from .bench import speed
    except ImportError as exc:
        if getattr(exc, "name", None) in (None, "optimkit.bench.speed") or "optimkit.bench.speed" in str(exc):
            _err("the speed benchmark is not available in this installation (optimkit.bench.speed is missing)")
            return 2
        raise
    try:
        return int(speed.main(argv) or 0)
    except SystemExit as exc:  # argparse inside speed: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from .bench.protocol import BenchError

    try:
        if argv and argv[0] == "speed":
            return cmd_speed(argv[1:])
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help
            return int(exc.code or 0)
        if args.version:
            import optimkit

            print(f"optimkit {optimkit.__version__}")
            return 0
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except _UsageError as exc:
        _err(exc)
        return 2
    except BenchError as exc:
        _err(exc)
        return 2
    except KeyboardInterrupt:
        print("\noptimkit: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except Exception as exc:  # noqa: BLE001 - last resort: one line, traceback on request
        if os.environ.get("OPTIMKIT_DEBUG"):
            raise
        _err(f"internal error: {type(exc).__name__}: {exc} (set OPTIMKIT_DEBUG=1 for the traceback)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
