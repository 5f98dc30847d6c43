"""Who runs where: the launcher's environment, the process group, DDP, SLURM, preemption."""
