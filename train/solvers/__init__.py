"""Reconstruction methods behind one interface, ``solver(y, physics)``; see :mod:`train.solvers.base`."""

from train.solvers.base import SOLVERS, Solver, make_solver, register
from train.solvers import wiener  # noqa: F401  (registers "wiener")
from train.solvers import admm  # noqa: F401  (registers "admm")
from train.solvers import ddnm, diffpir, dps  # noqa: F401  (registers "ddnm", "diffpir", "dps")
from train import students  # noqa: F401  (registers "student")

__all__ = ["SOLVERS", "Solver", "make_solver", "register"]
