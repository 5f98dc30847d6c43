"""Will DDP scale there? A step's time on 1 to 1024 GPUs from one device's compute and the
all-reduce's bandwidth: model.py (the cost model), bandwidth.py (published DGX figures and
measured curves), __main__.py (measure, predict, check: python -m dgxtrain.scaling)."""
