"""Saving and loading diffusion priors as diffusers-style directories.

Our format (written by :func:`save_prior` and by ``nsdd-train prior``)::

    config.json             {"_class_name": "NSDDUNet", "architecture": {UNetConfig}, "image_size", "channels", ...}
    model.safetensors       the (EMA) weights; float16 allowed on disk, loaded as float32 (or ``dtype``)
    scheduler_config.json   {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type"}

:func:`load_prior` also reads diffusers ``UNet2DModel`` directories (``config.json`` with ``_class_name:
"UNet2DModel"``, ``diffusion_pytorch_model.safetensors`` or ``.bin``, the scheduler config in
``scheduler/scheduler_config.json`` or beside the model) when diffusers is installed, e.g. a local copy
of google/ddpm-ema-celebahq-256 (the root of the repository or its ``unet/`` folder).
OpenAI guided-diffusion / ADM checkpoints (a ``.pt`` state dict such as the DPS/DiffPIR ``ffhq_10m.pt``)
load into :class:`train.prior.unet.ADMUNet`: the architecture is read off the weights' shapes; what the
weights cannot tell (``image_size``, attention heads) comes from an optional sidecar ``NAME.json`` with
guided-diffusion's ``create_model`` flags (default: the create_model size for the number of levels, 64
channels per head, the legacy attention order), the schedule from a sidecar ``scheduler_config.json`` or
guided-diffusion's ``linear`` schedule (``diffusion_steps`` / ``noise_schedule`` in NAME.json).
``save_prior`` writes an ADM prior as a directory like ours (``_class_name: "ADMUNet"``).
The noise schedule always comes from the prior's own (scheduler) config.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from nsdd_edge import atomic
from nsdd_edge.atomic import atomic_write_bytes
from train.prior.base import DiffusionPrior, linear_alphas_cumprod
from train.prior.unet import ADM_CLASS_NAME, CLASS_NAME, ADMConfig, ADMUNet, UNet, UNetConfig

NETWORKS = {CLASS_NAME: (UNet, UNetConfig), ADM_CLASS_NAME: (ADMUNet, ADMConfig)}
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
SCHEDULER_NAME = "scheduler_config.json"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
FORMAT_VERSION = 1


class PriorError(ValueError):
    """A path that is not a usable diffusion prior; the message names the path and what is wrong."""


def default_schedule(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> dict:
    """The DDPM linear-β ε-prediction scheduler config."""
    return {"num_train_timesteps": int(num_train_timesteps), "beta_start": float(beta_start),
            "beta_end": float(beta_end), "beta_schedule": "linear", "prediction_type": "epsilon"}


def alphas_cumprod_from_schedule(schedule: dict, source: str | Path = "scheduler config") -> torch.Tensor:
    """``ᾱ_t`` (float64) for a diffusers-style scheduler config.

    ``linear``: β linear in [β_start, β_end]; ``scaled_linear``: √β linear; ``squaredcos_cap_v2``:
    ``ᾱ(s) = cos²((s + 0.008)/1.008 · π/2)``, ``β_t = min(1 − ᾱ((t+1)/T)/ᾱ(t/T), 0.999)``.
    Only ``prediction_type: "epsilon"`` is accepted.
    """
    prediction = schedule.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise PriorError(f"{source}: prediction_type {prediction!r} is not supported (only 'epsilon')")
    if schedule.get("trained_betas") is not None:
        betas = torch.tensor(schedule["trained_betas"], dtype=torch.float64)
        return torch.cumprod(1.0 - betas, dim=0)
    try:
        steps = int(schedule.get("num_train_timesteps", 1000))
        beta_start = float(schedule.get("beta_start", 1e-4))
        beta_end = float(schedule.get("beta_end", 0.02))
    except (TypeError, ValueError) as exc:
        raise PriorError(f"{source}: invalid schedule numbers ({exc})") from exc
    kind = schedule.get("beta_schedule", "linear")
    if kind == "linear":
        return linear_alphas_cumprod(steps, beta_start, beta_end)
    if kind == "scaled_linear":
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2
        return torch.cumprod(1.0 - betas, dim=0)
    if kind == "squaredcos_cap_v2":
        def abar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = torch.tensor([min(1 - abar((i + 1) / steps) / abar(i / steps), 0.999) for i in range(steps)],
                             dtype=torch.float64)
        return torch.cumprod(1.0 - betas, dim=0)
    raise PriorError(f"{source}: beta_schedule {kind!r} is not supported "
                     "(linear, scaled_linear, squaredcos_cap_v2)")


# ---- atomic file writes (the mechanism: nsdd_edge.atomic) -------------------------------------------
def atomic_write_json(path: Path, obj) -> None:
    """JSON with sorted keys, indent 2 and a final newline, written atomically (the prior's config files)."""
    atomic.atomic_write_json(path, obj, indent=2, sort_keys=True)


# ---- save ---------------------------------------------------------------------------------------------
def save_prior(prior_or_net: DiffusionPrior | UNet, path: str | Path, config: dict | None = None,
               schedule: dict | None = None, *, dtype: torch.dtype = torch.float32,
               extra: dict | None = None) -> Path:
    """Write a prior directory (see the module docstring); each file is replaced atomically.

    ``config``: the UNet architecture (default: the network's own ``config``); ``schedule``: the scheduler
    config (default: the prior's ``config["scheduler"]`` or the DDPM linear schedule); ``dtype``: on-disk
    weight dtype (float32 or float16); ``extra``: JSON-able notes stored under ``"training"`` in config.json.
    """
    from safetensors.torch import save as save_bytes

    net = prior_or_net.net if isinstance(prior_or_net, DiffusionPrior) else prior_or_net
    if isinstance(net, EpsilonOnly):
        net = net.net
    class_name = next((name for name, (cls, _) in NETWORKS.items() if type(net) is cls), None)
    if class_name is None:
        raise TypeError(f"save_prior writes {CLASS_NAME}/{ADM_CLASS_NAME} networks; got {type(net).__name__} "
                        "(save diffusers models with their own save_pretrained)")
    config_cls = NETWORKS[class_name][1]
    architecture = config_cls.from_dict(dict(config if config is not None else net.config)).to_dict()
    if architecture != net.config:
        raise ValueError("save_prior: config does not describe this network "
                         f"(given {architecture}, network has {net.config})")
    if schedule is None:
        schedule = (prior_or_net.config.get("scheduler") if isinstance(prior_or_net, DiffusionPrior) else None)
        schedule = schedule or default_schedule()
    schedule = {**default_schedule(), **schedule}
    alphas_cumprod_from_schedule(schedule)  # validate before writing anything
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"save_prior: unsupported weight dtype {dtype}")

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
             for k, v in net.state_dict().items()}
    atomic_write_bytes(path / WEIGHTS_NAME, save_bytes(state, metadata={"format": "pt"}))
    atomic_write_json(path / SCHEDULER_NAME, schedule)
    atomic_write_json(path / CONFIG_NAME, {
        "_class_name": class_name,
        "_format_version": FORMAT_VERSION,
        "architecture": architecture,
        "image_size": architecture["image_size"],
        "channels": architecture["in_channels"],
        "weights_dtype": str(dtype).replace("torch.", ""),
        "training": dict(extra or {}),
    })
    return path


# ---- load ---------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PriorError(f"{path}: invalid JSON ({exc})") from exc
    except OSError as exc:
        raise PriorError(f"{path}: cannot read ({exc})") from exc
    if not isinstance(data, dict):
        raise PriorError(f"{path}: expected a JSON object")
    return data


def load_prior(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> DiffusionPrior:
    """Load a prior (our directory, a diffusers ``UNet2DModel`` directory or a guided-diffusion ``.pt``) as an
    eval-mode :class:`DiffusionPrior` whose ``eps`` returns the ε channels only."""
    path = Path(path)
    if not path.exists():
        raise PriorError(f"{path}: no such prior directory")
    if path.is_file():
        if path.suffix in (".pt", ".pth"):
            prior = _load_adm_checkpoint(path)
            prior.net.to(device=device, dtype=dtype)
            return prior.to(device=device).eval()
        raise PriorError(f"{path}: a prior is a directory with {CONFIG_NAME} (or a guided-diffusion .pt "
                         f"checkpoint), not a {path.suffix or 'suffix-less'} file")
    config_path = path / CONFIG_NAME
    if not config_path.exists():
        if (path / "unet" / CONFIG_NAME).exists():
            return load_prior(path / "unet", device=device, dtype=dtype)
        found = sorted(p.name for p in path.iterdir())[:10]
        raise PriorError(f"{path}: not a diffusion prior (no {CONFIG_NAME}; found {found or 'nothing'})")
    config = _read_json(config_path)
    class_name = config.get("_class_name")
    if class_name in NETWORKS:
        prior = _load_nsdd(path, config)
    elif class_name == "UNet2DModel":
        prior = _load_diffusers(path, config)
    else:
        raise PriorError(f"{config_path}: _class_name {class_name!r} is not a supported prior "
                         f"({CLASS_NAME!r}, {ADM_CLASS_NAME!r} or diffusers 'UNet2DModel')")
    prior.net.to(device=device, dtype=dtype)
    return prior.to(device=device).eval()  # ᾱ stays float64


def prior_from_config(config: dict, source: str = "prior config", schedule_source: str | Path | None = None
                      ) -> DiffusionPrior:
    """An untrained :class:`DiffusionPrior` of the architecture and noise schedule a prior's config records
    (``config.json`` of our format with its ``"scheduler"`` entry, as ``load_prior`` stores in ``.config``).

    A paper student's ``model.safetensors`` holds the fine-tuned prior network, so the student needs only
    this to be rebuilt: its directory does not depend on the prior directory it started from.
    """
    if config.get("_class_name") not in NETWORKS:
        raise PriorError(f"{source}: _class_name {config.get('_class_name')!r} is not one of {sorted(NETWORKS)}")
    if "architecture" not in config:
        raise PriorError(f"{source}: missing 'architecture'")
    if "scheduler" not in config:
        raise PriorError(f"{source}: missing 'scheduler' (the noise schedule)")
    net_cls, config_cls = NETWORKS[config["_class_name"]]
    try:
        net = net_cls(config_cls.from_dict(config["architecture"]))
    except (TypeError, ValueError) as exc:
        raise PriorError(f"{source}: {exc}") from exc
    alphas_cumprod = alphas_cumprod_from_schedule(config["scheduler"], schedule_source or f"{source} 'scheduler'")
    arch = net.cfg
    eps_net = EpsilonOnly(net, arch.in_channels) if arch.out_channels != arch.in_channels else net
    return DiffusionPrior(eps_net, alphas_cumprod, image_size=arch.image_size, channels=arch.in_channels,
                          config=dict(config))


def _load_nsdd(path: Path, config: dict) -> DiffusionPrior:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if "architecture" not in config:
        raise PriorError(f"{path / CONFIG_NAME}: missing 'architecture'")
    weights = path / WEIGHTS_NAME
    if not weights.exists():
        raise PriorError(f"{path}: missing {WEIGHTS_NAME} (the network weights)")
    schedule_path = path / SCHEDULER_NAME
    if not schedule_path.exists():
        raise PriorError(f"{path}: missing {SCHEDULER_NAME} (the noise schedule)")
    schedule = _read_json(schedule_path)
    prior = prior_from_config({**config, "scheduler": schedule, "path": str(path)}, str(path / CONFIG_NAME),
                              schedule_path)
    net = prior.net.net if isinstance(prior.net, EpsilonOnly) else prior.net
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise PriorError(f"{weights}: unreadable safetensors file ({exc})") from exc
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise PriorError(f"{weights}: weights do not match config.json's architecture "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong[:5]})")
    net.load_state_dict({k: v.float() for k, v in state.items()})
    return prior


class EpsilonOnly(torch.nn.Module):
    """Keep the first ``channels`` output channels (ε) of a network that also predicts a variance."""

    def __init__(self, net: torch.nn.Module, channels: int):
        super().__init__()
        self.net = net
        self.channels = channels

    def full_output(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Every output channel: ε, then the variance interpolation ``v`` in [−1, 1] (``learned_range``)."""
        out = self.net(x, t)
        return out.sample if hasattr(out, "sample") else out

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.full_output(x, t)[:, : self.channels]


def _load_diffusers(path: Path, config: dict) -> DiffusionPrior:
    try:
        from diffusers import UNet2DModel
    except ImportError as exc:
        raise PriorError(f"{path}: a diffusers UNet2DModel directory needs the 'diffusers' package "
                         f"(pip install diffusers; {exc})") from exc
    if not any((path / name).exists() for name in DIFFUSERS_WEIGHTS):
        raise PriorError(f"{path}: missing {DIFFUSERS_WEIGHTS[0]} or {DIFFUSERS_WEIGHTS[1]}")
    candidates = [path / "scheduler" / SCHEDULER_NAME, path / SCHEDULER_NAME,
                  path.parent / "scheduler" / SCHEDULER_NAME]
    schedule_path = next((p for p in candidates if p.exists()), None)
    if schedule_path is None:
        raise PriorError(f"{path}: no scheduler config (looked for "
                         f"{', '.join(str(p) for p in candidates)}); the noise schedule must come with the model")
    schedule = _read_json(schedule_path)
    alphas_cumprod = alphas_cumprod_from_schedule(schedule, schedule_path)
    try:
        unet = UNet2DModel.from_pretrained(str(path), local_files_only=True, torch_dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as exc:
        raise PriorError(f"{path}: diffusers could not load the UNet2DModel ({exc})") from exc
    in_ch, out_ch = int(unet.config.in_channels), int(unet.config.out_channels)
    net = EpsilonOnly(unet, in_ch) if out_ch != in_ch else unet
    size = unet.config.sample_size
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    return DiffusionPrior(net, alphas_cumprod, image_size=size, channels=in_ch,
                          config={**dict(unet.config), "_class_name": "UNet2DModel", "scheduler": schedule,
                                  "path": str(path)})


# ---- OpenAI guided-diffusion / ADM checkpoints ---------------------------------------------------------
ADM_FLAG_NAMES = {"num_channels": "model_channels"}
ADM_DEFAULT_SIZES = {7: 512, 6: 256, 5: 128, 4: 64}  # guided-diffusion create_model: levels -> image_size


def _adm_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, pickle with code objects, not a torch file
        raise PriorError(f"{path}: not a readable torch state dict ({type(exc).__name__}: {exc})") from exc
    if isinstance(state, dict) and not any(torch.is_tensor(v) for v in state.values()):
        state = next((state[k] for k in ("ema", "state_dict", "model") if isinstance(state.get(k), dict)), state)
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise PriorError(f"{path}: expected a state dict of tensors (a guided-diffusion checkpoint)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def infer_adm_config(state: dict[str, torch.Tensor], flags: dict | None = None,
                     source: str | Path = "checkpoint") -> ADMConfig:
    """ADM architecture from the weights' shapes; ``flags`` (create_model names) supply and override the rest."""
    flags = {ADM_FLAG_NAMES.get(k, k): v for k, v in (flags or {}).items()}
    try:
        mc = int(state["time_embed.0.weight"].shape[1])
        in_ch = int(state["input_blocks.0.0.weight"].shape[1])
        out_ch = int(state["out.2.weight"].shape[0])
    except KeyError as exc:
        raise PriorError(f"{source}: not a guided-diffusion UNet state dict (no {exc.args[0]})") from exc
    blocks_in = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("input_blocks."))
    blocks_out = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("output_blocks."))
    up_layers = {}  # output block index -> the upsampling layer's keys
    for k in state:
        if k.startswith("output_blocks."):
            _, j, m, *rest = k.split(".")
            if m != "0" and rest[0] not in ("norm", "qkv", "proj_out"):
                up_layers.setdefault(int(j), set()).add(rest[0])
    levels = len(up_layers) + 1
    if blocks_out % levels or blocks_in != blocks_out:
        raise PriorError(f"{source}: unexpected guided-diffusion block layout ({blocks_in} input, {blocks_out} output "
                         f"blocks, {levels} levels)")
    nrb = blocks_out // levels - 1
    resblock_updown = any("in_layers" in keys for keys in up_layers.values())
    mults, attention_levels = [], []
    for level in range(levels):
        first = 1 + level * (nrb + 1)
        mults.append(state[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0] / mc)
        if f"input_blocks.{first}.1.qkv.weight" in state:
            attention_levels.append(level)
    mults = [int(m) if float(m).is_integer() else float(m) for m in mults]
    scale_shift = bool(state["input_blocks.1.0.emb_layers.1.weight"].shape[0]
                       == 2 * state["input_blocks.1.0.out_layers.3.weight"].shape[0])
    image_size = int(flags.get("image_size", ADM_DEFAULT_SIZES.get(levels, 2 ** (levels + 2))))
    inferred = {"image_size": image_size, "in_channels": in_ch, "model_channels": mc, "out_channels": out_ch,
                "num_res_blocks": nrb, "attention_resolutions": [image_size // 2 ** lv for lv in attention_levels],
                "channel_mult": mults, "use_scale_shift_norm": scale_shift, "resblock_updown": resblock_updown}
    settings = {**inferred, "num_heads": 4, "num_head_channels": 64, "num_heads_upsample": -1}
    for key in ("num_heads", "num_head_channels", "num_heads_upsample", "use_new_attention_order", "dropout"):
        if key in flags:
            settings[key] = flags[key]
    clashes = {k: (flags[k], v) for k, v in inferred.items() if k in flags and k != "image_size"
               and _normalise_flag(k, flags[k]) != v}
    if "learn_sigma" in flags and bool(flags["learn_sigma"]) != (out_ch == 2 * in_ch):
        clashes["learn_sigma"] = (flags["learn_sigma"], out_ch == 2 * in_ch)
    if clashes:
        raise PriorError(f"{source}: the sidecar flags disagree with the weights: "
                         + ", ".join(f"{k} {a!r} (weights: {b!r})" for k, (a, b) in clashes.items()))
    try:
        return ADMConfig.from_dict(settings)
    except (TypeError, ValueError) as exc:
        raise PriorError(f"{source}: {exc}") from exc


def _normalise_flag(key: str, value):
    """guided-diffusion writes lists as strings ("16,8", "1,1,2,2,4,4")."""
    if key in ("attention_resolutions", "channel_mult") and isinstance(value, str):
        value = [float(v) for v in value.split(",") if v.strip()]
    if key in ("attention_resolutions", "channel_mult") and isinstance(value, (int, float)):
        value = [value]
    if isinstance(value, list):
        value = [int(v) if float(v).is_integer() else float(v) for v in value]
    return value


def _load_adm_checkpoint(path: Path) -> DiffusionPrior:
    state = _adm_state_dict(path)
    sidecar = path.with_suffix(".json")
    flags = _read_json(sidecar) if sidecar.exists() else {}
    if flags.get("channel_mult") == "":
        flags.pop("channel_mult")
    flags = {k: v for k, v in flags.items() if k not in ("model_path", "class_cond", "use_checkpoint", "use_fp16")}
    config = infer_adm_config(state, flags, path)
    net = ADMUNet(config)
    try:
        net.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as exc:
        raise PriorError(f"{path}: weights do not fit the inferred ADM architecture ({exc})") from exc
    schedule_path = path.parent / SCHEDULER_NAME
    if schedule_path.exists():
        schedule = _read_json(schedule_path)
    else:  # guided-diffusion get_named_beta_schedule: linear scaled by 1000/T, or the cosine schedule
        steps = int(flags.get("diffusion_steps", 1000))
        kind = flags.get("noise_schedule", "linear")
        if kind not in ("linear", "cosine"):
            raise PriorError(f"{sidecar}: noise_schedule {kind!r} is not supported (linear, cosine)")
        scale = 1000 / steps
        schedule = {**default_schedule(steps, scale * 1e-4, scale * 0.02),
                    "beta_schedule": "linear" if kind == "linear" else "squaredcos_cap_v2"}
    alphas_cumprod = alphas_cumprod_from_schedule(schedule, schedule_path if schedule_path.exists() else path)
    eps_net = EpsilonOnly(net, config.in_channels) if config.out_channels != config.in_channels else net
    return DiffusionPrior(eps_net, alphas_cumprod, image_size=config.image_size, channels=config.in_channels,
                          config={"_class_name": ADM_CLASS_NAME, "architecture": config.to_dict(),
                                  "scheduler": schedule, "path": str(path), "flags": flags})
