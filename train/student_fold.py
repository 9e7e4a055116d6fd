"""Start a student from another student whose channel count differs (``--init-student`` across RGB and gray).

A colour camera's student becomes the start of a gray camera's (or the reverse) by folding the convolutions
that touch the image channels, as :mod:`train.prior.init_from` does for priors:

* the network's first convolution reads ``[fit(y), A†y]``, ``2·C`` channels: each half is folded on its own
  (RGB → gray: ``W_y = W_yR + W_yG + W_yB``, ``W_a = W_aR + W_aG + W_aB``), so a gray input gives the features
  the RGB network gives for that input replicated to R = G = B;
* its last convolution (``C`` outputs) is averaged over the colours (RGB → gray: ``g_gray = mean_c g_c``);
* a paper student's diffusion UNet is folded the same way (``conv_in`` summed, ``conv_out`` averaged).

For an edge student, and for a paper student whose adapter gives equal colour channels, the folded network
is exact: on a gray input it returns the mean over colours of what the source returns on that input
replicated. Otherwise it is a start, not an equivalent. Every other tensor is copied.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from train.prior.init_from import fold_input_weight, fold_output
from train.students import StudentError, load_student_weights, read_student_state, student_weights_path

# (first conv weight, last conv weight, last conv bias) of the network that sees [fit(y), A†y]
EDGE_LAYERS = ("stem.0.weight", "head.weight", "head.bias")
PAPER_LAYERS = tuple(f"adapter.{k}" for k in EDGE_LAYERS)
PRIOR_LAYERS = ("prior_net.conv_in.weight", "prior_net.conv_out.weight", "prior_net.conv_out.bias")


def foldable(source_channels: int, channels: int) -> bool:
    """Whether one channel count is a multiple of the other (RGB ↔ gray)."""
    return source_channels > 0 and channels > 0 and (source_channels % channels == 0 or channels % source_channels == 0)


def fold_refusal(source_channels: int, channels: int, architecture: dict) -> str | None:
    """Why a ``source_channels`` student of ``architecture`` cannot start a ``channels`` one, or None when it
    can (the same count, or one that folds)."""
    if source_channels == channels:
        return None
    if not foldable(source_channels, channels):
        return (f"cannot fold a {source_channels}-channel student to {channels} channels (one count must be a "
                "multiple of the other)")
    if int(architecture.get("unshuffle", 1)) != 1:
        return (f"cannot fold a student with unshuffle {architecture['unshuffle']} to another channel count "
                "(pixel-unshuffle interleaves the colours)")
    return None


def _fold_layers(state: dict[str, torch.Tensor], layers: tuple[str, str, str], source_channels: int,
                 channels: int, input_groups: int) -> None:
    first, last_w, last_b = layers
    w = state[first]
    halves = w.split(w.shape[1] // input_groups, dim=1)
    state[first] = torch.cat([fold_input_weight(h, channels) for h in halves], dim=1)
    for key in (last_w, last_b):
        state[key] = fold_output(state[key], source_channels, channels)


def fold_student_state(state: dict[str, torch.Tensor], config: dict, channels: int) -> dict[str, torch.Tensor]:
    """The weights of a student with ``config`` (``channels`` C_src) for the same network on ``channels`` C;
    a :class:`StudentError` when the counts do not fold or the network reshapes its channels (unshuffle)."""
    source = int(config.get("channels", -1))
    refusal = fold_refusal(source, channels, config.get("architecture", {}))
    if refusal is not None:
        raise StudentError(refusal)
    out = {k: v.clone() for k, v in state.items()}
    if source == channels:
        return out
    kind = config.get("kind")
    layers = {"edge": [EDGE_LAYERS], "paper": [PAPER_LAYERS, PRIOR_LAYERS]}.get(kind)
    if layers is None:
        raise StudentError(f"cannot fold a student of kind {kind!r}")
    missing = [k for group in layers for k in group if k not in out]
    if missing:
        raise StudentError(f"cannot fold the student: its weights lack {', '.join(missing)}")
    _fold_layers(out, layers[0], source, channels, input_groups=2)
    if kind == "paper":
        _fold_layers(out, layers[1], source, channels, input_groups=1)
    return out


def load_init_weights(net: nn.Module, directory: str | os.PathLike, config: dict, channels: int) -> None:
    """Fill ``net`` (a ``channels``-channel student) with the weights of the student in ``directory``
    (``config``), folded when its channel count differs."""
    if int(config.get("channels", -1)) == channels:
        load_student_weights(net, directory, config)
        return
    folded = fold_student_state(read_student_state(directory, config), config, channels)
    try:
        net.load_state_dict(folded, strict=True)
    except RuntimeError as exc:
        raise StudentError(f"{student_weights_path(directory, config)}: folded weights do not fit this network "
                           f"({exc})") from exc
