# dgxtrain's Hydra configs. This directory ships inside the wheel as the package
# dgxtrain.conf (setup.py maps it), so `python -m dgxtrain` finds its configs wherever it is
# installed: hydra.main reads them as pkg://dgxtrain.conf.
