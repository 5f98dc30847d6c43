"""Checkpoints that survive anything: store.py writes, verifies, finds and prunes them on
storage; choice.py picks the one to resume from; state.py says what goes in and restores it."""

from dgxtrain.checkpoint.choice import choose
from dgxtrain.checkpoint.state import contents, restore
from dgxtrain.checkpoint.store import (
                                       CheckpointError,
                                       Chosen,
                                       find_latest,
                                       finish_pruning,
                                       load_file,
                                       manifest,
                                       prune,
                                       root_of,
                                       save,
                                       verify,
)

__all__ = ["Chosen", "CheckpointError", "choose", "contents", "find_latest", "finish_pruning",
           "load_file", "manifest", "prune", "restore", "root_of", "save", "verify"]
