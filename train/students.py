"""NSDD students: one network pass from a lensless measurement to an image.

A student takes ``(y, A†y)`` stacked on channels (``2C`` inputs) and a network ``g`` maps them to ``C``
channels. Two objectives:

- ``nullspace`` (NSDD): ``x̂ = A†y + (I − A†A) g(y, A†y)``. The range part comes from the measurement.
  With the **truncated** pseudo-inverse (``projector="truncated"``, circular model) ``I − A†A`` is an exact
  projector: ``A x̂`` does not depend on ``g`` on the kept frequencies, and ``‖A x̂ − y‖`` equals the truncated
  Wiener residual plus what ``g`` puts on the frequencies below the threshold (where ``|H| ≤ √λ``). With the
  **Tikhonov** pseudo-inverse (default) ``I − A†A = λ/(|H|²+λ)`` is not a projector, so ``g`` changes
  ``A x̂`` on every frequency where λ is not negligible against ``|H|²`` — for a large λ that is most of
  them, and the null-space and ``full`` students then differ little.
- ``full`` (ablation): ``x̂ = g(y, A†y)``.

``A†`` and ``I − A†A`` are :meth:`train.physics.LenslessOperator.A_dagger` and ``null_project``; the kind of
pseudo-inverse and λ are part of the student (``config.json``: ``projector``, ``lam``).

Grids: ``A†y`` lives on the scene grid. For the circular model ``y`` has the same size; for the crop
model ``y`` (sensor grid) is centre zero-padded and/or centre-cropped per axis to the scene grid
(:func:`fit_to_grid`, the same offsets as :func:`nsdd_edge.optics.fit_to`) before stacking.

Networks:

- ``edge``: :class:`EdgeUNet`, a compact encoder-decoder with skips built only from Conv2d, nearest
  Resize, Concat, Add and an activation (ReLU/LeakyReLU/SiLU) — it exports cleanly to ONNX/TensorRT.
  Input sides must be divisible by ``2**depth``.
- ``paper``: :class:`PaperNet`, as in the NSDD paper: a small UNet ``g_φ`` maps the ``2C`` inputs to
  ``C`` channels, the pretrained diffusion UNet ``g_θ`` (fine-tuned) is evaluated at a fixed timestep
  ``t*`` on ``x_t = 2 g_φ − 1`` and its ε prediction is turned into the clean estimate
  ``x0 = (x_t − √(1−ᾱ_t*) ε) / √ᾱ_t*``; ``g = (x0 + 1) / 2`` (back to [0, 1]).

A trained student is a directory (diffusers-like ``save_pretrained`` layout): ``config.json`` +
``model.safetensors``; :func:`load_student` returns a :class:`StudentSolver` (registered as
``"student"``) that refuses a physics with another PSF or geometry than the one it was trained for.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nsdd_edge.atomic import atomic_write_bytes, atomic_write_json
from nsdd_edge.bundle import BundleError, check_support_taper, parse_support
from train.physics import LenslessOperator, center_crop, center_pad, fit_to_grid
from train.solvers.base import Solver, register

Objective = Literal["nullspace", "full"]
OBJECTIVES = ("nullspace", "full")
KINDS = ("edge", "paper")
STUDENT_FORMAT = "nsdd-student"
STUDENT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class StudentError(ValueError):
    """A student directory or configuration that is missing, corrupted or does not fit the physics."""


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def student_inputs(y: torch.Tensor, physics: LenslessOperator,
                   x_dagger: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(concat(fit(y), A†y), A†y)``: the ``(N, 2C, *scene_shape)`` network input and ``A†y`` (``x_dagger``:
    ``A†y`` computed before, e.g. cached by a training loop that sees the same ``y`` many times)."""
    if y.ndim != 4:
        raise ValueError(f"measurement y must be a batch (N, C, H, W), got shape {tuple(y.shape)}")
    if x_dagger is None:
        x_dagger = physics.A_dagger(y)
    return torch.cat([fit_to_grid(y, physics.scene_shape), x_dagger], dim=1), x_dagger


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------

ACTIVATIONS = {"relu": lambda: nn.ReLU(inplace=False), "leaky_relu": lambda: nn.LeakyReLU(0.1),
               "silu": lambda: nn.SiLU()}


def _act(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise StudentError(f"unknown activation {name!r}; use {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class _ConvBlock(nn.Sequential):
    """``n`` × (3×3 conv → activation); the first conv may have stride 2 (downsampling). ``separable``: each
    3×3 conv is depthwise (one filter per channel) followed by a 1×1 pointwise conv (≈ 9/c_out of the cost)."""

    def __init__(self, c_in: int, c_out: int, n: int, activation: str, stride: int = 1, separable: bool = False):
        layers: list[nn.Module] = []
        for k in range(n):
            ci, st = (c_in if k == 0 else c_out), (stride if k == 0 else 1)
            if separable:
                layers += [nn.Conv2d(ci, ci, 3, stride=st, padding=1, groups=ci), nn.Conv2d(ci, c_out, 1)]
            else:
                layers += [nn.Conv2d(ci, c_out, 3, stride=st, padding=1)]
            layers.append(_act(activation))
        super().__init__(*layers)


class EdgeUNet(nn.Module):
    """Compact UNet ``(N, C_in, H, W) → (N, C_out, H, W)`` for TensorRT.

    Level ``k`` (``0 … depth``) has ``min(width·2^k, max_width)`` channels; the encoder downsamples with
    stride-2 3×3 convolutions, the decoder upsamples ×2 (nearest Resize), concatenates the skip and
    applies ``blocks`` 3×3 convolutions; a 1×1 convolution gives the output. With ``skip_input`` the
    last ``C_out`` input channels (``A†y``) are added to the output: ``g = A†y + head(…)``.

    Lean variants (for a latency budget): ``unshuffle = r`` runs the whole UNet at ``1/r`` resolution on
    ``r²``× the channels (pixel-unshuffle in, pixel-shuffle out: ONNX SpaceToDepth/DepthToSpace or
    Reshape/Transpose), ``separable`` makes every 3×3 convolution depthwise + 1×1.
    """

    def __init__(self, in_channels: int, out_channels: int, width: int = 32, depth: int = 4,
                 max_width: int = 192, blocks: int = 2, activation: str = "silu", skip_input: bool = False,
                 unshuffle: int = 1, separable: bool = False):
        super().__init__()
        if depth < 0 or width < 1 or blocks < 1 or unshuffle < 1:
            raise StudentError(f"EdgeUNet: need depth >= 0, width >= 1, blocks >= 1, unshuffle >= 1 "
                               f"(got {depth}, {width}, {blocks}, {unshuffle})")
        if skip_input and in_channels < out_channels:
            raise StudentError("EdgeUNet: skip_input needs in_channels >= out_channels")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.depth, self.skip_input = int(depth), bool(skip_input)
        self.unshuffle = int(unshuffle)
        r2 = self.unshuffle ** 2
        widths = [min(width * 2 ** k, max_width) for k in range(depth + 1)]
        self.stem = _ConvBlock(in_channels * r2, widths[0], blocks, activation, separable=False)
        self.down = nn.ModuleList(_ConvBlock(widths[k], widths[k + 1], blocks, activation, stride=2,
                                             separable=separable) for k in range(depth))
        self.up = nn.ModuleList(_ConvBlock(widths[k + 1] + widths[k], widths[k], blocks, activation,
                                           separable=separable) for k in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], out_channels * r2, 1)

    @property
    def multiple(self) -> int:
        """Input sides must be multiples of ``2**depth · unshuffle``."""
        return 2 ** self.depth * self.unshuffle

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise StudentError(f"EdgeUNet expects (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % self.multiple or w % self.multiple:
            factor = f"2^{self.depth}" + (f" · {self.unshuffle} (unshuffle)" if self.unshuffle > 1 else "")
            raise StudentError(f"EdgeUNet of depth {self.depth}: input size {h}x{w} is not divisible by "
                               f"{factor} = {self.multiple}; use a scene size that is, or a smaller depth")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        r = self.unshuffle
        skips = [self.stem(F.pixel_unshuffle(x, r) if r > 1 else x)]
        for block in self.down:
            skips.append(block(skips[-1]))
        h = skips.pop()
        for block in self.up:
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = block(torch.cat([h, skips.pop()], dim=1))
        out = self.head(h)
        if r > 1:
            out = F.pixel_shuffle(out, r)
        if self.skip_input:
            out = out + x[:, self.in_channels - self.out_channels:]
        return out


class PaperNet(nn.Module):
    """NSDD paper student network: ``g = (x0(g_θ, t*) + 1) / 2`` with ``x_t = 2 g_φ(y, A†y) − 1``.

    ``x0 = (x_t − √(1−ᾱ_t*) ε_θ(x_t, t*)) / √ᾱ_t*``; ``g_φ`` is a small :class:`EdgeUNet` and ``g_θ`` the
    diffusion network (``net(x, t) -> ε`` or an object with ``.sample``), both trained.
    """

    def __init__(self, adapter: EdgeUNet, prior_net: nn.Module, t_fixed: int, alpha_bar: float):
        super().__init__()
        if not 0.0 < alpha_bar <= 1.0:
            raise StudentError(f"PaperNet: ᾱ at t*={t_fixed} must be in (0, 1], got {alpha_bar}")
        self.adapter = adapter
        self.prior_net = prior_net
        self.t_fixed = int(t_fixed)
        self.alpha_bar = float(alpha_bar)

    @property
    def multiple(self) -> int:
        """Input sides must be multiples of the adapter's and of the diffusion UNet's (:func:`unet_multiple`)."""
        return math.lcm(self.adapter.multiple, unet_multiple(self.prior_net))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_t = 2.0 * self.adapter(x) - 1.0
        t = torch.full((x.shape[0],), self.t_fixed, dtype=torch.long, device=x.device)
        out = self.prior_net(x_t, t)
        eps = out.sample if hasattr(out, "sample") else out
        x0 = (x_t - math.sqrt(1.0 - self.alpha_bar) * eps) / math.sqrt(self.alpha_bar)
        return 0.5 * (x0 + 1.0)


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# ----------------------------------------------------------------------------------------------
# The student: network + objective + physics
# ----------------------------------------------------------------------------------------------


def check_taper(taper: Any, support: Sequence[int] | None) -> int:
    """``support_taper``: an integer ≥ 0, below half the support window's shorter side; 0 without a window. The
    bundle's rule (:func:`nsdd_edge.bundle.check_support_taper`), its error as :class:`StudentError`."""
    try:
        return check_support_taper(taper, None if support is None else (int(support[0]), int(support[-1])))
    except BundleError as exc:
        raise StudentError(str(exc)) from None


def support_window(support: Sequence[int] | None, taper: int) -> np.ndarray | None:
    """The raised-cosine window ``w`` on the support (``None`` without a taper): one formula with the camera
    profile's soft support (:func:`nsdd_edge.camera.support_mask`)."""
    if support is None or taper <= 0:
        return None
    from nsdd_edge.camera import support_mask

    shape = (int(support[0]), int(support[1]))
    return support_mask(shape, shape, int(taper))


class Student(nn.Module):
    """``x̂ = A†y + (I − A†A) g(y, A†y)`` (``nullspace``) or ``x̂ = g(y, A†y)`` (``full``).

    ``support_shape``: the scenes occupy a known centred window of the scene grid (simulated scenes are
    zero-padded to the sensor): ``g`` then runs on the centre crop of its inputs and is zero-padded back,
    ``g = P_support g_net(C_support(y, A†y))``, which costs the network only the support's pixels.

    ``support_taper`` τ > 0 (px): ``g = P_support (w ⊙ g_net(C_support(y, A†y)))`` with the raised-cosine window
    ``w`` of :func:`nsdd_edge.camera.support_mask` (1 inside, ``½(1 − cos(π d/τ))`` within τ of the window's edge):
    ``g`` fades out instead of stopping at a box edge (real scenes a little larger than the window).

    ``g`` may run under autocast (bf16 on a GPU); the physics (FFTs) always runs in float32.
    """

    def __init__(self, net: nn.Module, objective: Objective = "nullspace",
                 support_shape: Sequence[int] | None = None, support_taper: int = 0):
        super().__init__()
        if objective not in OBJECTIVES:
            raise StudentError(f"unknown objective {objective!r}; use {' or '.join(OBJECTIVES)}")
        self.net = net
        self.objective = objective
        self.support_shape = tuple(int(v) for v in support_shape) if support_shape else None
        self.support_taper = check_taper(support_taper, self.support_shape)
        window = support_window(self.support_shape, self.support_taper)
        self.register_buffer("_window", None if window is None else torch.from_numpy(window), persistent=False)

    def forward(self, y: torch.Tensor, physics: LenslessOperator, return_parts: bool = False,
                x_dagger: torch.Tensor | None = None):
        inputs, x_dagger = student_inputs(y, physics, x_dagger)
        if self.support_shape is not None:  # g sees and fills only the scene's known support; black outside
            g = self.net(center_crop(inputs, self.support_shape)).float()
            if self._window is not None:
                g = g * self._window
            g = center_pad(g, physics.scene_shape)
        else:
            g = self.net(inputs).float()
        with torch.autocast(device_type=y.device.type, enabled=False):
            x_hat = x_dagger + physics.null_project(g) if self.objective == "nullspace" else g
        return (x_hat, x_dagger) if return_parts else x_hat


def default_architecture(kind: str, objective: Objective) -> dict:
    """Default architecture settings (edge: ≈2–4 M parameters at 3 channels)."""
    if kind == "edge":
        return {"width": 32, "depth": 4, "max_width": 192, "blocks": 2, "activation": "silu",
                "skip_input": objective == "full"}
    if kind == "paper":
        return {"width": 16, "depth": 2, "max_width": 64, "blocks": 2, "activation": "silu", "t_fixed": 50}
    raise StudentError(f"unknown student kind {kind!r}; use {' or '.join(KINDS)}")


def _edge_kwargs(arch: dict) -> dict:
    keys = ("width", "depth", "max_width", "blocks", "activation", "skip_input", "unshuffle", "separable")
    return {k: arch[k] for k in keys if k in arch}


def build_edge_net(channels: int, arch: dict) -> EdgeUNet:
    return EdgeUNet(2 * channels, channels, **_edge_kwargs(arch))


def _prior_alpha_bar(prior: Any, t_fixed: int) -> float:
    ac = getattr(prior, "alphas_cumprod", None)
    if ac is None:
        raise StudentError("the diffusion prior has no alphas_cumprod schedule")
    if not 0 <= t_fixed < len(ac):
        raise StudentError(f"t_fixed={t_fixed} outside the prior's schedule [0, {len(ac) - 1}]")
    return float(ac[t_fixed])


def build_paper_net(channels: int, arch: dict, prior: Any) -> PaperNet:
    """Paper student network around ``prior.net`` (a :class:`~train.prior.base.DiffusionPrior`)."""
    prior_channels = getattr(prior, "channels", channels)
    if prior_channels != channels:
        raise StudentError(f"the diffusion prior works on {prior_channels} channels, the data has {channels}")
    adapter = EdgeUNet(2 * channels, channels, **{**_edge_kwargs(arch), "skip_input": True})
    t_fixed = int(arch.get("t_fixed", 50))
    # the student owns a copy of g_θ: fine-tuning it (or loading a student's weights into it) must never
    # change the prior it came from (which a caller may go on using, e.g. for the DDNM+ teacher)
    return PaperNet(adapter, copy.deepcopy(prior.net), t_fixed, _prior_alpha_bar(prior, t_fixed))


def prior_architecture(config: dict) -> Any:
    """The diffusion prior a paper student was built on, for its architecture and schedule: rebuilt from the
    prior config recorded in the student's ``config.json`` (the fine-tuned weights are the student's own),
    else (a diffusers or older record) loaded from the recorded prior directory."""
    record = config.get("prior") or {}
    recorded = record.get("config") if isinstance(record.get("config"), dict) else {}
    from train.prior.io import NETWORKS, PriorError, prior_from_config

    if recorded.get("_class_name") in NETWORKS and {"architecture", "scheduler"} <= set(recorded):

        try:
            return prior_from_config(recorded, "config.json 'prior'")
        except PriorError as exc:
            raise StudentError(f"paper student: {exc}") from None
    if not record.get("dir"):
        raise StudentError("a paper student needs a diffusion prior (pass prior= or set config['prior'])")
    return load_prior_dir(record["dir"])


def load_prior_dir(prior_dir: str | os.PathLike) -> Any:
    """The diffusion prior of a directory through :func:`train.prior.io.load_prior` (imported lazily)."""
    try:
        from train.prior.io import load_prior
    except ImportError as exc:
        raise StudentError(f"the paper student needs train.prior.io.load_prior, which is unavailable: {exc}") from exc
    try:
        return load_prior(prior_dir)
    except ValueError as exc:  # PriorError: missing/corrupted prior directory
        raise StudentError(f"diffusion prior {prior_dir}: {exc}") from exc


# ----------------------------------------------------------------------------------------------
# Configuration, saving and loading
# ----------------------------------------------------------------------------------------------


def physics_record(physics: LenslessOperator) -> dict:
    """What a student records about the operator it was trained for."""
    return {"psf_sha256": physics.psf_hash, "geometry": physics.geometry.to_dict(), "lam": physics.lam,
            "projector": physics.projector}


def make_config(kind: str, objective: Objective, channels: int, physics: LenslessOperator,
                architecture: dict | None = None, support_shape: Sequence[int] | None = None,
                support_taper: int = 0, **extra: Any) -> dict:
    """A student ``config.json`` (kind, architecture, objective, channels, sizes, support and its taper, PSF hash,
    geometry, λ); ``support_shape`` None: ``g`` covers the whole scene grid."""
    check_taper(support_taper, support_shape)
    arch = {**default_architecture(kind, objective), **(architecture or {})}
    cfg = {"format": STUDENT_FORMAT, "version": STUDENT_VERSION, "kind": kind, "objective": objective,
           "architecture": arch, "channels": int(channels), "in_channels": 2 * int(channels),
           "scene_shape": list(physics.scene_shape), "sensor_shape": list(physics.sensor_shape),
           "support_shape": [int(v) for v in support_shape] if support_shape is not None else None,
           "support_taper": int(support_taper), **physics_record(physics), "step": 0}
    cfg.update(extra)
    return cfg


def unet_multiple(net: Any) -> int:
    """A diffusion UNet's ``2^(levels − 1)``: what its input sides must be multiples of. Our UNet
    (``cfg.channel_mults``), an ADM UNet (``cfg.channel_mult``) or a diffusers UNet (``config.block_out_channels``);
    1 for a network that says nothing."""
    cfg = getattr(net, "cfg", None)
    levels = getattr(cfg, "channel_mults", None) or getattr(cfg, "channel_mult", None)
    if levels is None:
        levels = getattr(getattr(net, "config", None), "block_out_channels", None)
    return 2 ** (len(levels) - 1) if levels else 1


def input_multiple(kind: str, architecture: dict, prior: Any | None = None) -> int:
    """What a student's input sides must be multiples of, from its settings (the built network's ``multiple``):
    ``2^depth · unshuffle``, and for a paper student also its diffusion UNet's (:func:`unet_multiple`)."""
    arch = {**default_architecture(kind, "nullspace"), **architecture}
    multiple = 2 ** int(arch["depth"]) * int(arch.get("unshuffle", 1))
    if kind == "paper" and prior is not None:
        multiple = math.lcm(multiple, unet_multiple(getattr(prior, "net", None)))
    return multiple


def build_student(config: dict, prior: Any | None = None) -> Student:
    """A freshly initialised :class:`Student` from a config (``prior`` for the ``paper`` kind)."""
    kind, ch = config.get("kind"), int(config["channels"])
    arch = config.get("architecture", {})
    if kind == "edge":
        net: nn.Module = build_edge_net(ch, arch)
    elif kind == "paper":
        if prior is None:
            prior = prior_architecture(config)
        net = build_paper_net(ch, arch, prior)
    else:
        raise StudentError(f"unknown student kind {kind!r}; use {' or '.join(KINDS)}")
    multiple = net.multiple
    scene = config["scene_shape"]
    try:  # the one rule for support windows (bundles and exported graphs use it too)
        support = parse_support(config.get("support_shape"), (int(scene[0]), int(scene[1])))
    except BundleError as exc:
        raise StudentError(str(exc)) from None
    h, w = support if support is not None else scene
    if h % multiple or w % multiple:
        what = "support" if support is not None else "scene size"
        raise StudentError(f"{what} {h}x{w} is not divisible by 2^depth = {multiple} "
                           f"(depth {arch.get('depth')}); lower the depth or change the {what}")
    return wrap_student(net, {**config, "support_shape": support})


def wrap_student(net: nn.Module, config: dict) -> Student:
    """The :class:`Student` around ``net`` that a config describes (objective, support window, taper)."""
    return Student(net, config.get("objective", "nullspace"), config.get("support_shape"),
                   config.get("support_taper", 0))


def save_student(directory: str | os.PathLike, net: nn.Module, config: dict, *, fp16: bool = False) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (the ``g`` network's weights; fp16 to ship)."""
    from safetensors.torch import save

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float16 if fp16 and v.is_floating_point() else v.dtype).contiguous()
             for k, v in net.state_dict().items()}
    cfg = {**config, "weights": {"file": WEIGHTS_NAME, "dtype": "float16" if fp16 else "float32",
                                 "parameters": count_parameters(net)}}
    atomic_write_bytes(out / WEIGHTS_NAME, save(state, metadata={"format": STUDENT_FORMAT}))
    atomic_write_json(out / CONFIG_NAME, cfg, indent=2, sort_keys=True)
    return out


def read_student_config(directory: str | os.PathLike) -> dict:
    d = Path(directory)
    path = d / CONFIG_NAME
    if not d.is_dir():
        raise StudentError(f"{d}: no such student directory")
    if not path.exists():
        raise StudentError(f"{d}: not a student directory (no {CONFIG_NAME})")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StudentError(f"{path}: invalid JSON ({exc})") from exc
    if cfg.get("format") != STUDENT_FORMAT:
        raise StudentError(f"{path}: format is {cfg.get('format')!r}, expected {STUDENT_FORMAT!r}")
    for key in ("kind", "objective", "channels", "scene_shape", "psf_sha256", "geometry", "lam"):
        if key not in cfg:
            raise StudentError(f"{path}: missing key {key!r}")
    return cfg


def student_weights_path(directory: str | os.PathLike, config: dict) -> Path:
    """The weights file a student directory's config names (``model.safetensors`` by default)."""
    d = Path(directory)
    wpath = d / config.get("weights", {}).get("file", WEIGHTS_NAME)
    if not wpath.exists():
        raise StudentError(f"{d}: weights file {wpath.name} is missing")
    return wpath


def read_student_state(directory: str | os.PathLike, config: dict) -> dict[str, torch.Tensor]:
    """The directory's weights as a state dict, floating tensors as float32; a named error when unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    wpath = student_weights_path(directory, config)
    try:
        state = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as exc:
        raise StudentError(f"{wpath}: unreadable safetensors ({exc})") from exc
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def load_student_weights(net: nn.Module, directory: str | os.PathLike, config: dict) -> None:
    """Fill ``net`` (built from ``config``) with the directory's weights, as float32; a named error when the
    file is unreadable or does not fit the architecture."""
    wpath = student_weights_path(directory, config)
    state = read_student_state(directory, config)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise StudentError(f"{wpath}: weights do not match the architecture in {CONFIG_NAME} ({exc})") from exc


def load_student(directory: str | os.PathLike, *, device: str | torch.device = "cpu", prior: Any | None = None,
                 clip: bool = False) -> StudentSolver:
    """Load a student directory as a :class:`StudentSolver` (``.net`` is ``g``, float32, eval mode).

    ``prior``: for a ``paper`` student, a prior object whose ``.net`` has the architecture to fill (default:
    ``load_prior(config['prior']['dir'])``).
    """
    d = Path(directory)
    cfg = read_student_config(d)
    student = build_student(cfg, prior=prior)
    load_student_weights(student.net, d, cfg)
    student.net.eval()
    return StudentSolver(student=student, config=cfg, device=str(device), clip=clip, path=str(d))


@register("student")
class StudentSolver(Solver):
    """A distilled student as a solver: ``x̂ = student(y, physics)`` in one network pass (NFE 1).

    The PSF and geometry of ``physics`` must be the ones the student was trained for; its ``A†`` and
    ``I − A†A`` always use the student's own λ (recorded in ``config.json``), whatever λ ``physics`` has.
    Build with :func:`load_student` or ``make_solver("student", path=DIR)``.
    """

    nfe = 1

    def __init__(self, path: str | None = None, *, student: Student | None = None, config: dict | None = None,
                 device: str = "cpu", clip: bool = False, batch_size: int = 8, prior: Any | None = None):
        if student is None:
            if path is None:
                raise StudentError("student solver: give path=DIR (a directory written by nsdd-train distill)")
            loaded = load_student(path, device=device, prior=prior, clip=clip)
            student, config = loaded._student, loaded.config
        self.path = path
        self.device = device
        self.clip = clip
        self.batch_size = int(batch_size)
        self._student = student.to(device).eval()
        self.config = dict(config or {})
        self.objective = self._student.objective
        self.kind = self.config.get("kind")

    @property
    def net(self) -> nn.Module:
        """The network ``g``: ``(N, 2C, H, W) → (N, C, H, W)``."""
        return self._student.net

    @property
    def student(self) -> Student:
        return self._student

    def check_physics(self, physics: LenslessOperator) -> None:
        """Refuse an operator with another PSF or geometry than the student was trained for."""
        where = f"student {self.path}" if self.path else "student"
        want_hash = self.config.get("psf_sha256")
        if want_hash and physics.psf_hash != want_hash:
            raise StudentError(f"{where} was trained for PSF sha256 {want_hash[:12]}…, the operator's PSF is "
                               f"{physics.psf_hash[:12]}…: retrain (nsdd-train distill) for this PSF")
        want_geo = self.config.get("geometry")
        if want_geo and physics.geometry.to_dict() != want_geo:
            raise StudentError(f"{where} was trained for geometry {want_geo}, the operator has "
                               f"{physics.geometry.to_dict()}")
        ch = self.config.get("channels")
        if ch is not None and physics.channels not in (1, ch):
            raise StudentError(f"{where} works on {ch} channels, the PSF has {physics.channels}")

    def student_physics(self, physics: LenslessOperator) -> LenslessOperator:
        """``physics`` with the student's own λ and pseudo-inverse kind: ``A†`` and ``I − A†A`` are part of the
        student (students written before the choice existed used Tikhonov)."""
        lam = self.config.get("lam")
        projector = self.config.get("projector", "tikhonov")
        same_lam = lam is None or math.isclose(float(lam), physics.lam, rel_tol=1e-9)
        if same_lam and projector == physics.projector:
            return physics
        return physics.with_lam(physics.lam if lam is None else float(lam), projector)

    @torch.no_grad()
    def __call__(self, y: torch.Tensor, physics: LenslessOperator) -> torch.Tensor:
        self.check_physics(physics)
        ch = self.config.get("channels")
        if ch is not None and y.shape[1] != ch:
            raise StudentError(f"student expects {ch}-channel measurements, got shape {tuple(y.shape)}")
        dev = torch.device(self.device)
        phys = self.student_physics(physics).to(dev)
        outs = []
        for k in range(0, y.shape[0], self.batch_size):
            x = self._student(y[k : k + self.batch_size].to(dev, torch.float32), phys)
            outs.append(x.clamp(0, 1) if self.clip else x)
        return torch.cat(outs).to(y.device)
