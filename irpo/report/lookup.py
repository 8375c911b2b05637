"""Print a field of the newest finished run matching filters (for the sweep scripts).

    python -m irpo.report.lookup --experiment table1 --filter method=sft \\
        --filter dataset=arith --filter seed=0 --field tags.run_dir

prints e.g. ``/work/outputs/runs/table1-arith-sft-1a2b3c4d5e``. A two-step
study uses it to start one run from another's checkpoint. Exit status 2, with
the experiment and filter named, when no run matches; several matches are
fine (the newest wins) but reported on stderr.
"""

from __future__ import annotations

import argparse
import sys

from irpo.report.load import ReportError, default_tracking_uri, filter_string, find_runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m irpo.report.lookup")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--experiment", required=True)
    p.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--field", default="tags.run_dir", help="tags.X or params.X (default tags.run_dir)")
    args = p.parse_args(argv)
    uri = args.tracking_uri or default_tracking_uri()
    try:
        runs = find_runs(uri, args.experiment, args.filter)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    where = f"experiment {args.experiment!r} at {uri}, filter {filter_string(args.filter)!r}"
    if runs.empty:
        print(f"error: no finished run in {where}", file=sys.stderr)
        return 2
    if args.field not in runs or runs[args.field].isna().iloc[0]:
        print(f"error: the newest run in {where} has no {args.field}", file=sys.stderr)
        return 2
    if len(runs) > 1:
        print(f"note: {len(runs)} runs match {where}; using the newest, {runs.index[0]}",
              file=sys.stderr)
    print(runs[args.field].iloc[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
