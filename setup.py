# Only the package list lives here: `conf/` (top level, for Hydra users) ships as `ced_lightning.conf`.
from setuptools import find_packages, setup

setup(packages=[*find_packages("src"), "ced_lightning.conf"])
