"""Reconstruction methods behind one interface, ``solver(y, physics)``; see :mod:`train.solvers.base`."""

from train import students  # noqa: F401  (registers "student")
from train.solvers import (  # noqa: F401  (importing a method module registers it)
    admm,
    ddnm,
    diffpir,
    dps,
    fista,
    tikhonov,
    wiener,
)
from train.solvers.base import SOLVERS, Solver, make_solver, register

__all__ = ["SOLVERS", "Solver", "make_solver", "register"]
