"""LPIPS-Alex v0.1 (Zhang et al., CVPR 2018) in plain torch: no torchvision, no ``lpips`` package.

``d(x0, x1) = Σ_l mean_{h,w} ‖ w_l ⊙ (f̂_l(x0) − f̂_l(x1)) ‖²`` where ``f_l`` are the AlexNet conv1–conv5
activations (after ReLU) of the scaled input ``(x' − shift) / scale``, ``f̂_l = f_l / (‖f_l‖₂ + 1e-10)``
is unit-normalised over channels, and ``w_l`` are the learned 1×1 linear heads (``linK.model.1.weight``).

Inputs of :meth:`LPIPS.forward` are images in **[0, 1]** (``(N, 3, H, W)``, or 1 channel, repeated to 3);
they are mapped to the network's ``[−1, 1]`` range internally (``x' = 2x − 1``), as the official
``lpips.LPIPS(...)(x0, x1, normalize=True)`` does. Use ``inputs_in_minus1_1=True`` for ``[−1, 1]`` inputs.
The network needs images of at least 31×31 pixels (two stride-2 max-pools after a stride-4 conv).

Weights (a full state dict with keys ``net.sliceK.N.*`` and ``linK.model.1.weight``) come from, in order:
the ``weights`` argument, the ``NSDD_LPIPS_WEIGHTS`` environment variable, or the usual download (the
torchvision AlexNet backbone via ``torch.hub.load_state_dict_from_url`` + the linear heads shipped inside
the ``lpips`` package, located without importing it since it imports torchvision).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

#: environment variable naming a full LPIPS-Alex v0.1 state dict (``.pth``)
WEIGHTS_ENV = "NSDD_LPIPS_WEIGHTS"
#: torchvision's ImageNet AlexNet (the LPIPS v0.1 backbone), fetched only when no weights file is given
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
#: ScalingLayer constants of the official implementation: ``(x' − shift) / scale`` with ``x' ∈ [−1, 1]``
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
CHANNELS = (64, 192, 384, 256, 256)
#: AlexNet ``features`` index of each conv layer, grouped as the official slices 1–5
_ALEX_CONV_INDEX = (0, 3, 6, 8, 10)
MIN_SIZE = 31


class LPIPSWeightsError(RuntimeError):
    """The LPIPS weights could not be found or loaded; the message lists the ways to provide them."""


def _alex_slices() -> nn.ModuleList:
    """AlexNet conv1–conv5 (+ReLU, max-pools in between) named like the official ``sliceK`` modules."""
    layers = {
        0: nn.Conv2d(3, 64, 11, stride=4, padding=2), 1: nn.ReLU(),
        2: nn.MaxPool2d(3, 2), 3: nn.Conv2d(64, 192, 5, padding=2), 4: nn.ReLU(),
        5: nn.MaxPool2d(3, 2), 6: nn.Conv2d(192, 384, 3, padding=1), 7: nn.ReLU(),
        8: nn.Conv2d(384, 256, 3, padding=1), 9: nn.ReLU(),
        10: nn.Conv2d(256, 256, 3, padding=1), 11: nn.ReLU(),
    }
    bounds = ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12))
    slices = []
    for lo, hi in bounds:
        s = nn.Sequential()
        for i in range(lo, hi):
            s.add_module(str(i), layers[i])
        slices.append(s)
    return nn.ModuleList(slices)


class _AlexTrunk(nn.Module):
    def __init__(self):
        super().__init__()
        for k, s in enumerate(_alex_slices(), start=1):
            self.add_module(f"slice{k}", s)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for k in range(1, 6):
            x = getattr(self, f"slice{k}")(x)
            feats.append(x)
        return feats


class _LinearHead(nn.Module):
    """``Dropout`` (inactive in eval) + a 1×1 conv without bias: ``model.1.weight`` as in the official file."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _unit_normalize(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """``f / (‖f‖₂ over channels + eps)``."""
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """LPIPS-Alex v0.1 distance; ``forward(x0, x1)`` returns one distance per pair, shape ``(N,)``."""

    def __init__(self, weights: str | os.PathLike | dict | None = None):
        super().__init__()
        self.net = _AlexTrunk()
        for k, c in enumerate(CHANNELS):
            self.add_module(f"lin{k}", _LinearHead(c))
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        state, self.weights_source = resolve_weights(weights)
        self.load_state_dict(state, strict=True)
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def layer_distances(self, x0: torch.Tensor, x1: torch.Tensor,
                        inputs_in_minus1_1: bool = False) -> list[torch.Tensor]:
        """Per-layer terms ``mean_{h,w} w_l·(f̂_l(x0) − f̂_l(x1))²``, each of shape ``(N,)``."""
        a, b = (self._prepare(x, inputs_in_minus1_1) for x in (x0, x1))
        if a.shape != b.shape:
            raise ValueError(f"LPIPS: images differ in shape: {tuple(x0.shape)} vs {tuple(x1.shape)}")
        n = a.shape[0]
        feats = self.net(torch.cat([a, b], dim=0))
        out = []
        for k, f in enumerate(feats):
            f0, f1 = _unit_normalize(f[:n]), _unit_normalize(f[n:])
            d = getattr(self, f"lin{k}")((f0 - f1) ** 2)
            out.append(d.mean(dim=(1, 2, 3)))
        return out

    def forward(self, x0: torch.Tensor, x1: torch.Tensor, inputs_in_minus1_1: bool = False) -> torch.Tensor:
        """LPIPS distance of images in [0, 1] (or [−1, 1] with ``inputs_in_minus1_1``), shape ``(N,)``."""
        return torch.stack(self.layer_distances(x0, x1, inputs_in_minus1_1), dim=0).sum(dim=0)

    def _prepare(self, x: torch.Tensor, inputs_in_minus1_1: bool) -> torch.Tensor:
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"LPIPS: expected images (N, 3, H, W) or (N, 1, H, W), got {tuple(x.shape)}")
        if min(x.shape[-2:]) < MIN_SIZE:
            raise ValueError(f"LPIPS: images of size {tuple(x.shape[-2:])} are too small for AlexNet "
                             f"(need at least {MIN_SIZE}x{MIN_SIZE})")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        p = next(self.parameters())
        x = x.to(device=p.device, dtype=p.dtype)
        if not inputs_in_minus1_1:
            x = 2 * x - 1
        return (x - self.shift) / self.scale


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------


def _load_file(path: Path) -> dict:
    if not path.is_file():
        raise LPIPSWeightsError(f"{path}: LPIPS weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or not a state dict
        raise LPIPSWeightsError(f"{path}: cannot load LPIPS weights ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict):
        raise LPIPSWeightsError(f"{path}: expected a state dict, got {type(state).__name__}")
    return _check_state(state, str(path))


def _check_state(state: dict, source: str) -> dict:
    want = set(LPIPS_KEYS)
    have = set(state)
    if want != have:
        missing, extra = sorted(want - have), sorted(have - want)
        raise LPIPSWeightsError(f"{source}: not an LPIPS-Alex v0.1 state dict (missing {missing[:4]}, "
                                f"unexpected {extra[:4]}); expected keys net.sliceK.N.* and linK.model.1.weight")
    return state


def _lpips_package_heads() -> Path | None:
    """``lpips/weights/v0.1/alex.pth`` of an installed ``lpips`` package, found without importing it."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "weights" / "v0.1" / "alex.pth"
        if p.is_file():
            return p
    return None


def _download_state() -> dict:
    heads_path = _lpips_package_heads()
    if heads_path is None:
        raise LPIPSWeightsError("the lpips package (which ships the v0.1 linear heads) is not installed")
    heads = torch.load(heads_path, map_location="cpu", weights_only=True)
    alex = torch.hub.load_state_dict_from_url(ALEXNET_URL, map_location="cpu", progress=True)
    state = {}
    for k, idx in enumerate(_ALEX_CONV_INDEX, start=1):
        for part in ("weight", "bias"):
            state[f"net.slice{k}.{idx}.{part}"] = alex[f"features.{idx}.{part}"]
    for k in range(len(CHANNELS)):
        state[f"lin{k}.model.1.weight"] = heads[f"lin{k}.model.1.weight"]
    return _check_state(state, f"{ALEXNET_URL} + {heads_path}")


def resolve_weights(weights: str | os.PathLike | dict | None = None) -> tuple[dict, str]:
    """The LPIPS state dict and where it came from: argument, ``$NSDD_LPIPS_WEIGHTS``, or download."""
    if isinstance(weights, dict):
        return _check_state(weights, "state dict argument"), "state dict argument"
    if weights is not None:
        return _load_file(Path(weights)), str(weights)
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        return _load_file(Path(env)), f"${WEIGHTS_ENV}={env}"
    try:
        return _download_state(), f"{ALEXNET_URL} + lpips package heads"
    except Exception as exc:
        raise LPIPSWeightsError(
            f"LPIPS weights unavailable ({type(exc).__name__}: {exc}). Provide a full LPIPS-Alex v0.1 "
            f"state dict (keys net.sliceK.N.*, linK.model.1.weight) with the weights argument "
            f"(--lpips-weights on the command line) or the {WEIGHTS_ENV} environment variable, or install "
            f"the 'lpips' package and allow torch.hub to download {ALEXNET_URL}") from exc


LPIPS_KEYS = tuple(
    [f"net.slice{k}.{idx}.{part}" for k, idx in enumerate(_ALEX_CONV_INDEX, start=1) for part in ("weight", "bias")]
    + [f"lin{k}.model.1.weight" for k in range(len(CHANNELS))])

_CACHE: dict[tuple[str, str], LPIPS] = {}


def get_lpips(weights: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> LPIPS:
    """A cached :class:`LPIPS` for ``weights`` on ``device`` (built once per process)."""
    key = (str(weights or os.environ.get(WEIGHTS_ENV, "")), str(device))
    if key not in _CACHE:
        _CACHE[key] = LPIPS(weights).to(device)
    return _CACHE[key]
