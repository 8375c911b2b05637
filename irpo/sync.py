"""Publish run directories to MLflow: ``python -m irpo.sync RUN_DIR [RUN_DIR ...]``.

The run directory is the record (irpo.record); this republishes it into any
tracking URI, adding only what the MLflow run does not hold yet, so a run done
with ``tracking=none``, on a machine without the server, or during an outage
can be added afterwards, and a second sync changes nothing. A run in progress
is refused (its driver publishes it). Examples::

    python -m irpo.sync outputs/runs/arith-rpo-1a2b3c4d5e
    python -m irpo.sync outputs/runs/* --tracking-uri http://mlflow.internal:5000

Without ``--tracking-uri`` the run's own ``tracking.tracking_uri`` is used, or
the sqlite store of the output root the run directory is in.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from irpo.record import RUN_SUMMARY, run_record
from irpo.rundir import config_hash
from irpo.runlock import RunInProgress, RunLock
from irpo.tracking import (
    MLflowTracker,
    TrackingUnavailable,
    default_tracking_uri,
    flatten,
    read_tracking_file,
    run_label,
    run_tags,
    write_tracking_file,
)

log = logging.getLogger("irpo.sync")


@dataclass
class SyncSettings:
    """The tracker's settings for a sync: fail at once when the server does not answer."""

    flush_timeout_s: float
    timeout_s: float = 10.0
    retries: int = 2
    retry_every_s: float = 5.0
    on_unavailable: str = "fail"


def sync_run(run_dir: Path, uri: str | None, experiment: str | None, timeout_s: float) -> str:
    """Publish one run directory; returns a one-line account. Raises on failure."""
    run_dir = run_dir.resolve()
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ValueError(f"{run_dir}: not a run directory (no config.yaml)")
    raw = OmegaConf.load(config_file)
    resolved = OmegaConf.to_container(raw, resolve=True)
    output_root = run_dir.parent.parent  # <output_root>/runs/<name>
    uri = uri or resolved["tracking"].get("tracking_uri") or default_tracking_uri(str(output_root))
    experiment = experiment or resolved["tracking"]["experiment_name"]
    with RunLock(run_dir):
        state = read_tracking_file(run_dir)
        if "tags" not in state:  # a run made before tracking.json: derive them now
            state["tags"] = run_tags(resolved, run_dir, config_hash(raw))
            write_tracking_file(run_dir, state)
        tracker = MLflowTracker(uri, experiment, output_root / "mlartifacts", SyncSettings(timeout_s))
        tracker.connect()
        tracker.start(run_dir, flatten(resolved), state["tags"], run_label(resolved))
        record = run_record(run_dir)
        tracker.publish(record)
        finished = (run_dir / RUN_SUMMARY).exists()
        artifacts = [p for p in (run_dir / "config.yaml", run_dir / "summary.md") if p.exists()]
        if not tracker.finish("FINISHED" if finished else "KILLED", artifacts):
            raise TrackingUnavailable(f"{run_dir}: MLflow at {uri} did not take every metric "
                                      f"within {timeout_s:g} s; run the sync again")
    return (f"{run_dir.name}: {len(record)} metric values recorded, {tracker.sent} newly published "
            f"to MLflow run {tracker.run_id} ({'finished' if finished else 'unfinished'}) at {uri}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m irpo.sync", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", type=Path, help="run directories (outputs/runs/<name>)")
    p.add_argument("--tracking-uri", help="where to publish (default: the run's own store)")
    p.add_argument("--experiment", help="MLflow experiment (default: the run's tracking.experiment_name)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait per run (default 600)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    failed = 0
    for run_dir in args.run_dirs:
        try:
            print(sync_run(run_dir, args.tracking_uri, args.experiment, args.timeout))
        except (ValueError, OSError, RunInProgress, TrackingUnavailable) as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
