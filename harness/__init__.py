"""Track the spectrum of the generalized Gauss-Newton matrix of a neural net while it trains.

Importing this package is cheap: torch, BackPACK, Hydra and MLflow are imported by the
submodules that need them.
"""

__version__ = "0.1.0"
