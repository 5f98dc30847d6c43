"""The lab: benchmarks of dgxtrain against plain and peer loops, and the checks of its cost
models. Not shipped with the package; run from the repository's root (python -m bench.X)."""
