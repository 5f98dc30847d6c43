"""The package layout pyproject.toml cannot state: conf/ stays at the top of the repository
and ships inside the wheel as dgxtrain.conf (its YAML files are package data)."""

from setuptools import find_packages, setup

setup(packages=[*find_packages("src"), "dgxtrain.conf"],
      package_dir={"": "src", "dgxtrain.conf": "conf"},
      package_data={"dgxtrain.conf": ["**/*.yaml"]})
