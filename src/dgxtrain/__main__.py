"""`python -m dgxtrain [overrides]`, under torchrun or srun too: the Hydra entry point."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

import hydra
from omegaconf import DictConfig

from dgxtrain import config, errors
from dgxtrain.checkpoint import CheckpointError
from dgxtrain.distributed import preempt
from dgxtrain.distributed.env import env_rank, register_resolvers, shared_run_id
from dgxtrain.distributed.preempt import Requeue

EXIT_CONFIG_ERROR = 2
EXIT_NON_FINITE = 3
EXIT_DATA_ERROR = 4

config.register_configs()
register_resolvers()


@contextlib.contextmanager
def _exit_codes() -> Iterator[None]:
    """A bad setting becomes one line, printed by rank 0 only, and a distinct exit code."""
    main = env_rank() == 0
    try:
        yield
    except Requeue as e:  # reported by train(), before any rank exits
        if main:
            logging.getLogger("dgxtrain").warning("%s", e)
        sys.exit(preempt.EXIT_REQUEUE)
    except CheckpointError as e:
        if main:
            sys.stderr.write(f"dgxtrain: checkpoint error: {e}\n")
            preempt.report_exit("checkpoint_error", detail=str(e))
        sys.exit(EXIT_CONFIG_ERROR)
    except errors.DataError as e:
        if main:
            sys.stderr.write(f"dgxtrain: data error: {e}\n")
            preempt.report_exit("data_error", detail=str(e))
        sys.exit(EXIT_DATA_ERROR)
    except FloatingPointError as e:
        if main:
            logging.getLogger("dgxtrain").error("%s", e)
            preempt.report_exit("non_finite", detail=str(e))
        sys.exit(EXIT_NON_FINITE)
    except Exception as e:
        line = errors.describe_error(e)
        if line is None:
            raise
        if main:
            sys.stderr.write(f"dgxtrain: config error: {line}\n")
            preempt.report_exit("config_error", detail=line)
        sys.exit(EXIT_CONFIG_ERROR)
    if main:
        preempt.report_exit("done")


# conf/ as installed with the package (setup.py ships it as dgxtrain.conf).
@hydra.main(version_base="1.3", config_path="pkg://dgxtrain.conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> float:
    from dgxtrain.loop.train import train

    # Handled here, not in main(): Hydra would first print its own line about the job.
    with _exit_codes():
        return train(cfg)["eval_loss"]  # the value a Hydra sweeper minimises


def main() -> None:
    # Composition errors (unknown key, wrong type, missing group option) must reach
    # _exit_codes instead of Hydra's multi-line printer.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    if {"-m", "--multirun"} & set(sys.argv[1:]):
        # Sweep jobs, on SLURM too, resolve hydra.sweep.dir themselves: they must get the
        # submitting process's run id, not their own job's (sbatch passes the environment).
        os.environ.setdefault("DGXTRAIN_RUN_ID", shared_run_id())
    with _exit_codes():
        _hydra_main()


if __name__ == "__main__":
    main()
