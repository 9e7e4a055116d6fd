"""The solver interface: ``solver(y, physics) -> x̂`` for every reconstruction method.

Each method is a class with a ``name``, keyword settings in ``__init__`` and ``__call__(y, physics)``
taking a batch ``y`` of shape ``(N, C, *sensor_shape)`` and returning ``(N, C, *scene_shape)``.
Methods register themselves so the command line and the evaluation report can build them by name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from train.physics import LenslessOperator

SOLVERS: dict[str, type[Solver]] = {}


class Solver:
    """Base class of reconstruction methods (see the module docstring)."""

    name: str = "solver"
    #: network calls per image (0 for classical methods); diffusion solvers set it after a run
    nfe: int = 0

    def __call__(self, y: torch.Tensor, physics: LenslessOperator) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def settings(self) -> dict:
        """The method's settings, recorded next to its outputs."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and isinstance(
            v, (int, float, str, bool, type(None), list, tuple))}


def register(name: str) -> Callable[[type[Solver]], type[Solver]]:
    def deco(cls: type[Solver]) -> type[Solver]:
        cls.name = name
        SOLVERS[name] = cls
        return cls
    return deco


def make_solver(name: str, **kwargs) -> Solver:
    """Build a registered solver by name (``wiener``, ``admm``, ``ddnm``, ``dps``, ``diffpir``, …)."""
    if name not in SOLVERS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(SOLVERS))}")
    return SOLVERS[name](**kwargs)
