"""Entry point: ``python -m irpo.main [overrides]`` (Hydra app over conf/).

Composes the config, converts it to the typed schemas of irpo.config (a
misspelt key or wrong type fails here, before anything runs), checks the
cross-field rules, and runs or resumes the experiment. With ``-m`` every sweep
point is one experiment, e.g.

    python -m irpo.main -m method=rpo,dpo beta=0.05,0.1,0.5

Returns the final test accuracy, so Hydra sweepers can optimise it.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from irpo.config import ConfigError, register_configs, to_config
from irpo.config_rules import validate

log = logging.getLogger("irpo")
register_configs()


def _match_threads_to_allocation() -> None:
    """Inside a SLURM job use the CPUs it was given, not every core of the node:
    oversubscribed OpenMP threads spin and slow CPU work down by an order of magnitude."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(int(cpus))


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(raw: DictConfig) -> float:
    from irpo.driver import StageError, run  # heavy imports after composition succeeded
    from irpo.tracking import TrackingUnavailable

    _match_threads_to_allocation()
    try:
        cfg = to_config(raw)
        validate(cfg)
        return run(cfg, raw)["final_test_accuracy"]
    except (ConfigError, StageError, TrackingUnavailable) as e:
        log.error("%s", e)
        sys.exit(f"error: {e}")
    except Exception:
        # In a SLURM job Hydra hands the exception back to the submitting process; the
        # job's own log must say why the run stopped too.
        log.exception("the run failed")
        raise


if __name__ == "__main__":
    main()
