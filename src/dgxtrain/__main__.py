"""`python -m dgxtrain [overrides]`, under torchrun or srun too: the Hydra entry point."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

import hydra
from omegaconf import DictConfig

from dgxtrain import config, ending
from dgxtrain.distributed import preempt
from dgxtrain.distributed.env import env_rank, register_resolvers, shared_run_id
from dgxtrain.distributed.preempt import Requeue

config.register_configs()
register_resolvers()


@contextlib.contextmanager
def _exit_codes() -> Iterator[None]:
    """A failure is one line and a distinct exit code (ending.py). Told already on the
    rendezvous board if the ranks had met; before that every rank meets it alike (a bad
    setting), and rank 0 alone prints it."""
    rank = env_rank()
    try:
        yield
    except ending.Reported as e:
        sys.exit(e.code)
    except Requeue as e:  # reported by train(), before any rank exits
        if rank == 0:
            logging.getLogger("dgxtrain").warning("%s", e)
        sys.exit(preempt.EXIT_REQUEUE)
    except Exception as e:
        code = ending.tell(e, rank)
        if code is None:
            raise
        sys.exit(code)
    if rank == 0:
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
