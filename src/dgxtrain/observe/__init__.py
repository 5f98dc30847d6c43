"""What a run shows: logs, metrics files, W&B, timings."""
