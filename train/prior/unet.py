"""The ε-prediction UNet of the diffusion prior (DDPM/ADM style, own implementation, no diffusers).

``UNet(config)(x_t, t) -> ε̂`` with ``x_t`` of shape ``(N, C, H, W)`` in [−1, 1]-scaled diffusion space and
``t`` the (integer or real) timestep. Layout::

    conv_in → [ResBlock × num_res_blocks (+ attention at the chosen resolutions), Downsample] per level
            → ResBlock, Attention, ResBlock (middle)
            → [ResBlock × (num_res_blocks + 1) on concat(h, skip) (+ attention), Upsample] per level
            → GroupNorm, SiLU, conv_out (zero-initialised)

ResBlock: ``h = conv(SiLU(GN(x))) + W·emb(t)``; ``out = skip(x) + conv(dropout(SiLU(GN(h))))``.
Time embedding: sinusoid ``[cos(t ω_k), sin(t ω_k)]``, ``ω_k = 10000^(−k/(d/2))``, then a 2-layer MLP.
``attention_resolutions`` are feature-map sizes in pixels for an input of ``image_size`` pixels (16 means
"attend where the feature map is 16×16"); other input sizes reuse the same layers. H and W must be
multiples of ``2^(len(channel_mults) − 1)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

CLASS_NAME = "NSDDUNet"


@dataclass
class UNetConfig:
    """Architecture of :class:`UNet`; JSON-able through :meth:`to_dict` / :meth:`from_dict`."""

    in_channels: int = 3
    out_channels: int = 3
    image_size: int = 64
    base_channels: int = 64
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 2, 2])
    num_res_blocks: int = 2
    attention_resolutions: list[int] = field(default_factory=lambda: [16])
    num_heads: int = 4
    dropout: float = 0.1
    mid_attention: bool = True
    norm_group_channels: int = 4  # GroupNorm: at least this many channels per group, at most 32 groups

    def __post_init__(self):
        self.channel_mults = [int(m) for m in self.channel_mults]
        self.attention_resolutions = [int(r) for r in self.attention_resolutions]
        problems = []
        if self.in_channels < 1 or self.out_channels < 1:
            problems.append("in_channels and out_channels must be >= 1")
        if self.base_channels < 1:
            problems.append(f"base_channels must be >= 1 (got {self.base_channels})")
        if not self.channel_mults or any(m < 1 for m in self.channel_mults):
            problems.append(f"channel_mults must be a non-empty list of positive ints (got {self.channel_mults})")
        if self.num_res_blocks < 1:
            problems.append(f"num_res_blocks must be >= 1 (got {self.num_res_blocks})")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1) (got {self.dropout})")
        if self.num_heads < 1:
            problems.append(f"num_heads must be >= 1 (got {self.num_heads})")
        if self.norm_group_channels < 1:
            problems.append(f"norm_group_channels must be >= 1 (got {self.norm_group_channels})")
        factor = 2 ** (len(self.channel_mults) - 1)
        if self.image_size < 1 or self.image_size % factor:
            problems.append(f"image_size {self.image_size} must be a positive multiple of {factor} "
                            f"(2^(levels-1) for {len(self.channel_mults)} levels)")
        else:
            levels = [self.image_size // 2 ** i for i in range(len(self.channel_mults))]
            stray = [r for r in self.attention_resolutions if r not in levels]
            if stray:
                problems.append(f"attention_resolutions {stray} are not feature-map sizes of this network "
                                f"(image_size {self.image_size} gives {levels})")
        if problems:
            raise ValueError("invalid UNet config: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, config: dict) -> UNetConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"invalid UNet config: unknown keys {unknown} (known: {sorted(known)})")
        return cls(**config)


def group_count(channels: int, max_groups: int = 32, min_group_size: int = 4) -> int:
    """GroupNorm groups: the most groups ≤ ``max_groups`` that divide ``channels`` with ≥ ``min_group_size``
    channels each (as GroupNorm(32) on 128 channels). One-channel groups (instance norm) would erase each
    feature's spatial mean, so the network could not move an image's mean colour (samples would stay grey)."""
    limit = max(1, min(max_groups, channels // min_group_size))
    return max(g for g in range(1, limit + 1) if channels % g == 0)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t ω_k), sin(t ω_k)]``, ``ω_k = max_period^(−k/half)``; shape ``(N, dim)``."""
    half = dim // 2
    omega = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * omega[None]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Time-conditioned residual block: GN → SiLU → conv, + Linear(emb), GN → SiLU → dropout → conv."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, group_channels: int = 4):
        super().__init__()
        self.norm1 = nn.GroupNorm(group_count(in_ch, min_group_size=group_channels), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(group_count(out_ch, min_group_size=group_channels), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H·W positions: ``x + proj(softmax(QKᵀ/√d) V)``."""

    def __init__(self, channels: int, num_heads: int, group_channels: int = 4):
        super().__init__()
        heads = max(h for h in range(1, min(num_heads, channels) + 1) if channels % h == 0)
        self.num_heads = heads
        self.norm = nn.GroupNorm(group_count(channels, min_group_size=group_channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, self.num_heads, c // self.num_heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(n, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Stage(nn.Module):
    """A ResBlock optionally followed by attention (one unit of the down / up paths)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, attention: bool, num_heads: int,
                 group_channels: int = 4):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_dim, dropout, group_channels)
        self.attn = Attention(out_ch, num_heads, group_channels) if attention else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.res(x, emb)
        return self.attn(x) if self.attn is not None else x


class UNet(nn.Module):
    """ε-network ``forward(x, t) -> ε̂`` (same shape as ``x``'s spatial size, ``out_channels`` channels)."""

    def __init__(self, config: UNetConfig | dict | None = None, **overrides):
        super().__init__()
        if config is None:
            config = UNetConfig(**overrides)
        elif isinstance(config, dict):
            config = UNetConfig.from_dict({**config, **overrides})
        elif overrides:
            config = UNetConfig.from_dict({**config.to_dict(), **overrides})
        self.cfg = config
        base = config.base_channels
        emb_dim = 4 * base
        gc = config.norm_group_channels
        self.time_mlp = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(config.in_channels, base, 3, padding=1)

        attn_at = set(config.attention_resolutions)
        levels = len(config.channel_mults)
        self.down = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        skips = [base]
        ch, res = base, config.image_size
        for level, mult in enumerate(config.channel_mults):
            stages = nn.ModuleList()
            for _ in range(config.num_res_blocks):
                stages.append(_Stage(ch, base * mult, emb_dim, config.dropout, res in attn_at, config.num_heads, gc))
                ch = base * mult
                skips.append(ch)
            self.down.append(stages)
            if level < levels - 1:
                self.downsamplers.append(Downsample(ch))
                skips.append(ch)
                res //= 2
            else:
                self.downsamplers.append(nn.Identity())

        self.mid1 = ResBlock(ch, ch, emb_dim, config.dropout, gc)
        self.mid_attn = Attention(ch, config.num_heads, gc) if config.mid_attention else nn.Identity()
        self.mid2 = ResBlock(ch, ch, emb_dim, config.dropout, gc)

        self.up = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mults))):
            stages = nn.ModuleList()
            for _ in range(config.num_res_blocks + 1):
                stages.append(_Stage(ch + skips.pop(), base * mult, emb_dim, config.dropout, res in attn_at,
                                     config.num_heads, gc))
                ch = base * mult
            self.up.append(stages)
            if level > 0:
                self.upsamplers.append(Upsample(ch))
                res *= 2
            else:
                self.upsamplers.append(nn.Identity())
        self.norm_out = nn.GroupNorm(group_count(ch, min_group_size=gc), ch)
        self.conv_out = _zero(nn.Conv2d(ch, config.out_channels, 3, padding=1))

    @property
    def config(self) -> dict:
        """The JSON-able architecture dict (``UNet(net.config)`` rebuilds the same network)."""
        return self.cfg.to_dict()

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """ε̂ = net(x, t); ``t`` a number, a 0-d tensor or an ``(N,)`` tensor (integer or real timesteps)."""
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"UNet expects (N, {self.cfg.in_channels}, H, W) input, got {tuple(x.shape)}")
        factor = 2 ** (len(self.cfg.channel_mults) - 1)
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"UNet input H, W = {tuple(x.shape[-2:])} must be multiples of {factor}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_mlp(timestep_embedding(t, self.cfg.base_channels).to(x.dtype))
        h = self.conv_in(x)
        skips = [h]
        for stages, downsample in zip(self.down, self.downsamplers):
            for stage in stages:
                h = stage(h, emb)
                skips.append(h)
            if not isinstance(downsample, nn.Identity):
                h = downsample(h)
                skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for stages, upsample in zip(self.up, self.upsamplers):
            for stage in stages:
                h = stage(torch.cat([h, skips.pop()], dim=1), emb)
            h = upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# =====================================================================================================
# OpenAI guided-diffusion / ADM UNet (Dhariwal & Nichol 2021), to run released checkpoints such as the
# DPS/DiffPIR FFHQ model ``ffhq_10m.pt``. Module names follow the checkpoint's state-dict keys
# (``input_blocks.N.M``, ``middle_block``, ``output_blocks``, ``out``), so ``load_state_dict`` works as is.
# =====================================================================================================
ADM_CLASS_NAME = "ADMUNet"


@dataclass
class ADMConfig:
    """guided-diffusion ``create_model`` arguments; ``attention_resolutions`` in pixels, as there."""

    image_size: int = 256
    in_channels: int = 3
    model_channels: int = 128
    out_channels: int = 6
    num_res_blocks: int = 1
    attention_resolutions: list[int] = field(default_factory=lambda: [16])
    channel_mult: list[float] = field(default_factory=lambda: [1, 1, 2, 2, 4, 4])
    dropout: float = 0.0
    num_heads: int = 4
    num_head_channels: int = 64
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    use_new_attention_order: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, config: dict) -> ADMConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"invalid ADM config: unknown keys {unknown} (known: {sorted(known)})")
        return cls(**config)


class _GroupNorm32(nn.GroupNorm):
    """ADM normalisation: GroupNorm(32) computed in float32."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


class _TimestepSequential(nn.Sequential):
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, _ADMResBlock) else layer(x)
        return x


class _ADMUpsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.use_conv = use_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.use_conv else x


class _ADMDownsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class _ADMResBlock(nn.Module):
    """ADM ResBlock; with ``use_scale_shift_norm``: ``h = GN(h)(1 + s) + b`` with ``(s, b) = W·SiLU(emb)``."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_scale_shift_norm: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(_GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = _ADMUpsample(channels, False), _ADMUpsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = _ADMDownsample(channels, False), _ADMDownsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, (2 if use_scale_shift_norm else 1)
                                                             * out_channels))
        self.out_layers = nn.Sequential(_GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[2](self.h_upd(self.in_layers[:2](x)))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class _ADMAttention(nn.Module):
    """ADM attention over H·W; ``legacy`` order splits heads before q/k/v (QKVAttentionLegacy)."""

    def __init__(self, channels: int, num_heads: int, num_head_channels: int, new_order: bool):
        super().__init__()
        self.num_heads = num_heads if num_head_channels == -1 else channels // num_head_channels
        if channels % self.num_heads:
            raise ValueError(f"ADM attention: {channels} channels not divisible into {self.num_heads} heads")
        self.new_order = new_order
        self.norm = _GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        length, heads, ch = qkv.shape[-1], self.num_heads, c // self.num_heads
        if self.new_order:
            q, k, v = (part.reshape(b * heads, ch, length) for part in qkv.chunk(3, dim=1))
        else:
            q, k, v = qkv.reshape(b * heads, 3 * ch, length).split(ch, dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        h = self.proj_out(out.transpose(1, 2).reshape(b, c, length))
        return (x + h).reshape(b, c, *spatial)


class ADMUNet(nn.Module):
    """guided-diffusion ``UNetModel`` (unconditional): ``forward(x, t)`` → ``out_channels`` maps (ε, then the
    variance interpolation when ``learn_sigma``)."""

    def __init__(self, config: ADMConfig | dict | None = None, **overrides):
        super().__init__()
        if config is None:
            config = ADMConfig(**overrides)
        elif isinstance(config, dict):
            config = ADMConfig.from_dict({**config, **overrides})
        self.cfg = config
        mc = config.model_channels
        emb_dim = 4 * mc
        attention_ds = {config.image_size // r for r in config.attention_resolutions}
        heads_up = config.num_heads if config.num_heads_upsample == -1 else config.num_heads_upsample

        def attention(ch: int, heads: int) -> _ADMAttention:
            return _ADMAttention(ch, heads, config.num_head_channels, config.use_new_attention_order)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        ch = int(config.channel_mult[0] * mc)
        self.input_blocks = nn.ModuleList([_TimestepSequential(nn.Conv2d(config.in_channels, ch, 3, padding=1))])
        skips, ds = [ch], 1
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [_ADMResBlock(ch, emb_dim, config.dropout, int(mult * mc),
                                                        config.use_scale_shift_norm)]
                ch = int(mult * mc)
                if ds in attention_ds:
                    layers.append(attention(ch, config.num_heads))
                self.input_blocks.append(_TimestepSequential(*layers))
                skips.append(ch)
            if level != len(config.channel_mult) - 1:
                self.input_blocks.append(_TimestepSequential(
                    _ADMResBlock(ch, emb_dim, config.dropout, ch, config.use_scale_shift_norm, down=True)
                    if config.resblock_updown else _ADMDownsample(ch, True)))
                skips.append(ch)
                ds *= 2
        self.middle_block = _TimestepSequential(
            _ADMResBlock(ch, emb_dim, config.dropout, use_scale_shift_norm=config.use_scale_shift_norm),
            attention(ch, config.num_heads),
            _ADMResBlock(ch, emb_dim, config.dropout, use_scale_shift_norm=config.use_scale_shift_norm))
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(config.channel_mult))[::-1]:
            for i in range(config.num_res_blocks + 1):
                layers = [_ADMResBlock(ch + skips.pop(), emb_dim, config.dropout, int(mc * mult),
                                       config.use_scale_shift_norm)]
                ch = int(mc * mult)
                if ds in attention_ds:
                    layers.append(attention(ch, heads_up))
                if level and i == config.num_res_blocks:
                    layers.append(_ADMResBlock(ch, emb_dim, config.dropout, ch, config.use_scale_shift_norm, up=True)
                                  if config.resblock_updown else _ADMUpsample(ch, True))
                    ds //= 2
                self.output_blocks.append(_TimestepSequential(*layers))
        self.out = nn.Sequential(_GroupNorm32(ch), nn.SiLU(),
                                 _zero(nn.Conv2d(ch, config.out_channels, 3, padding=1)))

    @property
    def config(self) -> dict:
        return self.cfg.to_dict()

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(x.dtype))
        h, skips = x, []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)
