"""``nsdd-train prior --init-from PRIOR_DIR``: start a prior from another prior's weights.

The new network has the source's architecture except, possibly, its channel counts (an RGB face prior
becomes the start of a grayscale one). Where the channels differ the first and last convolutions are folded:

* input conv ``W_in`` (``base × C_src × k × k``): ``C_src = g·C`` → the sum over each group of ``g`` source
  channels (RGB → gray: ``W_gray = W_R + W_G + W_B``, so a gray image gives the features the RGB network
  gives for that image replicated to R = G = B); ``C = g·C_src`` → each source channel repeated ``g`` times
  and divided by ``g`` (gray → RGB: an R = G = B input gives the gray network's features).
* output conv (ε, then the learned-variance channels when the network has them: ``out = k·in``): per output
  group of ``C_src`` channels, the mean over the group (RGB → gray: ``ε_gray = mean(ε_R, ε_G, ε_B)``);
  gray → RGB repeats the channel. Weights and biases alike, so the folded output is exactly that mean.

The new prior may also have another ``--size`` (the UNet is convolutional: a 64 px face prior starts a 128 px
one). Its self-attention then stays at the same levels of the network (attention at 16 px of a 64 px network is at
32 px of a 128 px one), so every tensor keeps its shape.

Every other tensor is copied. The source is recorded as ``{"path", "sha256", "channels", "image_size"}`` (sha256
of its ``model.safetensors``) in the new prior's ``config.json`` (``training.init_from``) and in its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from train.prior.io import CLASS_NAME, CONFIG_NAME, SCHEDULER_NAME, WEIGHTS_NAME, PriorError
from train.prior.unet import UNetConfig

INPUT_CONV = "conv_in"
OUTPUT_CONV = "conv_out"
# training settings that a --init-from source fixes (its architecture and noise schedule)
ARCHITECTURE_SETTINGS = ("size", "pad_to", "base_channels", "channel_mults", "num_res_blocks",
                         "attention_resolutions", "num_heads", "dropout")
SCHEDULE_SETTINGS = {"num_train_timesteps": "num_train_timesteps", "beta_start": "beta_start",
                     "beta_end": "beta_end"}
# architecture fields that may differ between the source and the new prior (dropout holds no weights; the
# image size may change when the attention stays at the same levels, see check_compatible)
FOLDABLE_FIELDS = ("in_channels", "out_channels", "dropout", "image_size", "attention_resolutions")


def rescaled_attention(attention_resolutions: list[int], source_size: int, size: int,
                       source_path: str | Path) -> list[int]:
    """The source's attention feature-map sizes for a ``size`` px network: the same levels, ``r · size / source``."""
    if any(r * size % source_size for r in attention_resolutions):
        raise PriorError(f"--init-from {source_path}: --size {size} puts the source's attention at "
                         f"{attention_resolutions} px of {source_size} px between levels; choose a size for "
                         f"which r × size / {source_size} is a whole number of pixels")
    return [r * size // source_size for r in attention_resolutions]


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read(path: Path, name: str) -> dict:
    try:
        return json.loads((path / name).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PriorError(f"--init-from {path}: cannot read {name} ({exc})") from exc


def read_init_source(path: str | Path) -> tuple[UNetConfig, dict, dict]:
    """The source prior's architecture, the training settings it implies (architecture and schedule, under the
    names of ``nsdd-train prior``'s flags) and its provenance record ``{"path", "sha256", "channels"}``."""
    path = Path(path).resolve()
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise PriorError(f"--init-from {path}: not a prior directory of ours ({CONFIG_NAME} and {WEIGHTS_NAME})")
    config = _read(path, CONFIG_NAME)
    if config.get("_class_name") != CLASS_NAME:
        raise PriorError(f"--init-from {path}: a {config.get('_class_name')!r} network; nsdd-train prior trains "
                         f"{CLASS_NAME!r} networks only")
    try:
        arch = UNetConfig.from_dict(config["architecture"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PriorError(f"--init-from {path}: unusable architecture in {CONFIG_NAME} ({exc})") from exc
    if arch.out_channels != arch.in_channels:
        raise PriorError(f"--init-from {path}: {arch.out_channels} output channels for {arch.in_channels} input "
                         "channels (a learned variance); nsdd-train prior trains ε-only networks")
    schedule = _read(path, SCHEDULER_NAME) if (path / SCHEDULER_NAME).exists() else {}
    if schedule.get("beta_schedule", "linear") != "linear" or schedule.get("prediction_type", "epsilon") != "epsilon":
        raise PriorError(f"--init-from {path}: schedule {schedule.get('beta_schedule')!r}/"
                         f"{schedule.get('prediction_type')!r}; nsdd-train prior trains linear-β ε-prediction")
    trained = config.get("training", {}).get("settings", {})
    settings = {"size": trained.get("size", arch.image_size), "pad_to": trained.get("pad_to"),
                "base_channels": arch.base_channels, "channel_mults": list(arch.channel_mults),
                "num_res_blocks": arch.num_res_blocks, "attention_resolutions": list(arch.attention_resolutions),
                "num_heads": arch.num_heads, "dropout": arch.dropout}
    settings.update({ours: schedule[theirs] for ours, theirs in SCHEDULE_SETTINGS.items() if theirs in schedule})
    provenance = {"path": str(path), "sha256": file_sha256(path / WEIGHTS_NAME), "channels": arch.in_channels,
                  "image_size": arch.image_size}
    return arch, settings, provenance


def check_compatible(source: UNetConfig, target: UNetConfig, source_path: str | Path) -> None:
    """PriorError unless ``target`` is ``source`` up to :data:`FOLDABLE_FIELDS`, foldable channel counts and an
    image size whose attention sits at the source's levels."""
    a, b = source.to_dict(), target.to_dict()
    differ = [f"{k} {b[k]!r} (source: {a[k]!r})" for k in a if k not in FOLDABLE_FIELDS and a[k] != b[k]]
    if sorted(r * b["image_size"] for r in a["attention_resolutions"]) != sorted(
            r * a["image_size"] for r in b["attention_resolutions"]):  # r_a / size_a = r_b / size_b, level by level
        differ.append(f"attention_resolutions {b['attention_resolutions']!r} at image_size {b['image_size']} "
                      f"(source: {a['attention_resolutions']!r} at {a['image_size']}; the attention must stay at "
                      "the same levels)")
    for name, src, dst in (("in_channels", source.in_channels, target.in_channels),
                           ("out_channels", source.out_channels, target.out_channels)):
        if src % dst and dst % src:
            differ.append(f"{name} {dst} (source: {src}; one must be a multiple of the other)")
    if source.out_channels * target.in_channels != target.out_channels * source.in_channels:
        differ.append(f"output groups {target.out_channels}/{target.in_channels} (source: "
                      f"{source.out_channels}/{source.in_channels})")
    if differ:
        raise PriorError(f"--init-from {source_path}: the architecture does not match the source prior's: "
                         + "; ".join(differ) + " (only the channel counts and --size may differ; drop those flags)")


def fold_input_weight(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """Input conv weight ``(O, C_src, k, k)`` → ``(O, channels, k, k)``: sum over groups of source channels, or
    repeat each source channel and divide by the repeat count."""
    src = weight.shape[1]
    if src == channels:
        return weight.clone()
    if src % channels == 0:
        return weight.reshape(weight.shape[0], channels, src // channels, *weight.shape[2:]).sum(dim=2)
    return weight.repeat_interleave(channels // src, dim=1) / (channels // src)


def fold_output(tensor: torch.Tensor, source_channels: int, channels: int) -> torch.Tensor:
    """Output conv weight ``(out, …)`` or bias ``(out,)`` with ``out = k·source_channels`` → ``k·channels``
    rows: per group of ``source_channels`` rows, the mean over each fold, or each row repeated."""
    if source_channels == channels:
        return tensor.clone()
    groups = tensor.shape[0] // source_channels
    grouped = tensor.reshape(groups, source_channels, *tensor.shape[1:])
    if source_channels % channels == 0:
        fold = source_channels // channels
        folded = grouped.reshape(groups, channels, fold, *tensor.shape[1:]).mean(dim=2)
    else:
        folded = grouped.repeat_interleave(channels // source_channels, dim=1)
    return folded.reshape(groups * channels, *tensor.shape[1:])


def fold_state_dict(state: dict[str, torch.Tensor], source: UNetConfig, target: UNetConfig,
                    source_path: str | Path = "source prior") -> dict[str, torch.Tensor]:
    """The source's weights for a ``target`` network (see the module docstring); PriorError on a mismatch."""
    check_compatible(source, target, source_path)
    out = {k: v.clone() for k, v in state.items()}
    out[f"{INPUT_CONV}.weight"] = fold_input_weight(state[f"{INPUT_CONV}.weight"], target.in_channels)
    for key in (f"{OUTPUT_CONV}.weight", f"{OUTPUT_CONV}.bias"):
        out[key] = fold_output(state[key], source.in_channels, target.in_channels)
    return out


def load_folded_weights(path: str | Path, source: UNetConfig, target: UNetConfig) -> dict[str, torch.Tensor]:
    """The source prior's ``model.safetensors`` (float32) folded for ``target``."""
    from safetensors.torch import load_file

    weights = Path(path) / WEIGHTS_NAME
    try:
        state = {k: v.float() for k, v in load_file(str(weights)).items()}
    except Exception as exc:  # safetensors raises its own error types
        raise PriorError(f"--init-from {weights}: unreadable safetensors file ({exc})") from exc
    return fold_state_dict(state, source, target, path)


def settings_with_source(given: dict, source_settings: dict, source_path: str | Path) -> dict:
    """``source_settings`` overridden by the explicit flags ``given``; an explicit architecture or schedule
    flag that differs from the source's is a PriorError (``--channels`` and ``--dropout`` may differ, and
    ``--size`` when neither pads: the attention then moves with it to the same levels)."""
    source_settings = dict(source_settings)
    size = given.get("size", source_settings["size"])
    if size != source_settings["size"] and source_settings.get("pad_to") is None and given.get("pad_to") is None:
        source_settings["attention_resolutions"] = rescaled_attention(
            source_settings["attention_resolutions"], source_settings["size"], size, source_path)
        source_settings["size"] = size
    clashes = [f"--{k.replace('_', '-')} {given[k]!r} (source: {v!r})" for k, v in source_settings.items()
               if k in given and k != "dropout" and given[k] != v]
    if clashes:
        padded = source_settings.get("pad_to") is not None or given.get("pad_to") is not None
        why = (" (--size may differ only when neither the source prior nor this run pads with --pad-to: a padded "
               "frame keeps the network's size; drop those flags)" if padded and size != source_settings["size"]
               else " (only the channel counts and --size may differ; drop those flags)")
        raise PriorError(f"--init-from {source_path}: the architecture does not match the source prior's: "
                         + "; ".join(clashes) + why)
    return {**source_settings, **given}
