"""Command line: ``python -m irpo.report [--experiment NAME] [--filter KEY=VALUE ...]``.

Examples::

    python -m irpo.report --experiment table1 --filter dataset=arith
    python -m irpo.report --experiment beta_alpha --filter 'params.`trainer.epochs` = "1.0"'
    python -m irpo.report --tracking-uri http://mlflow:5000 --experiment irpo \\
        --filter-string "tags.method IN ('rpo', 'dpo')" --out /tmp/report

Writes report.md, report.html and PNGs into --out (default
<output_root>/reports/<experiment>) and logs them to a summary run
(tag irpo.report=1) unless --no-log-run. Exit status 2 with a one-line reason
when there is nothing to report.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from irpo.report.load import ReportError, default_tracking_uri


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m irpo.report", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: sqlite:///<$IRPO_OUTPUT_ROOT or outputs>/mlflow.db)")
    p.add_argument("--experiment", default="irpo", help="MLflow experiment name (default: irpo)")
    p.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="keep runs where KEY=VALUE (or KEY!=VALUE); a bare KEY is a tag "
                        "(method, dataset, model, beta, alpha, seed, ...) or else a param "
                        "(trainer.epochs); tags.X/params.X/metrics.X explicit; any MLflow "
                        "clause passes through; repeatable, all must hold")
    p.add_argument("--filter-string", default=None, help="an MLflow filter string, ANDed with --filter")
    p.add_argument("--metric", default="test/accuracy",
                   help="per-iteration metric of the tables (default test/accuracy)")
    p.add_argument("--group-by", action="append", default=None, metavar="FIELD",
                   help="label rows by these tags/params instead of method + variant (repeatable)")
    p.add_argument("--out", default=None, help="output folder (default <output_root>/reports/<experiment>)")
    p.add_argument("--include-unfinished", action="store_true",
                   help="also report RUNNING/FAILED/KILLED runs (partial metrics)")
    p.add_argument("--no-log-run", action="store_true",
                   help="do not log the report as a summary MLflow run")
    p.add_argument("--spot-check", type=int, default=20, metavar="N",
                   help="error analysis from the run directories: N random test responses per run "
                        "and iteration, checker agreement, MATH by level/subject (0: none)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    uri = args.tracking_uri or default_tracking_uri()
    out = Path(args.out or Path(os.environ.get("IRPO_OUTPUT_ROOT", "outputs")) / "reports"
               / args.experiment)
    from irpo.report import build_report  # after parsing: --help stays fast

    try:
        rep = build_report(uri, args.experiment, args.filter, args.filter_string, out,
                           args.metric, args.group_by, args.include_unfinished,
                           log_run=not args.no_log_run, spot_check=args.spot_check)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(rep.markdown.read_text())
    print(f"\nwrote {rep.markdown}, {rep.html} and {len(rep.pngs)} PNG files")
    if rep.summary_run_id:
        print(f"logged as MLflow run {rep.summary_run_id} (tag irpo.report=1) in "
              f"experiment {args.experiment!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
