"""dgxtrain: data-parallel training on every GPU of a DGX node, and on many nodes."""

__version__ = "0.1.0"
