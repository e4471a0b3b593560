"""Positional encodings: sine-cosine (Vaswani et al. 2017; 2-D as in MAE), learned 2-D (ViT paper, App. D.4),
interpolation of learned grids to new resolutions (ViT's fine-tuning at higher resolution), and rotary
embeddings (Su et al. 2021, RoPE) with Qwen2-VL's multimodal variant (M-RoPE: temporal / height / width positions
over sections of the frequencies, Wang et al. 2024, "Qwen2-VL", sec. 2.1)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sincos_1d(positions: Tensor, dim: int, base: float = 10000.0) -> Tensor:
    """(N,) positions -> (N, dim): [sin(p * w_i) ..., cos(p * w_i) ...] with w_i = base^(-2i/dim)."""
    if dim % 2:
        raise ValueError(f"sine-cosine encoding needs an even dim, got {dim}")
    omega = 1.0 / base ** (torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None]  # (N, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d(h: int, w: int, dim: int, base: float = 10000.0) -> Tensor:
    """Fixed 2-D encoding for an h x w grid -> (h*w, dim): half the channels encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"2-D sine-cosine encoding needs dim divisible by 4, got {dim}")
    rows = torch.arange(h).repeat_interleave(w)  # row index of each patch in raster order
    cols = torch.arange(w).repeat(h)
    return torch.cat([sincos_1d(rows, dim // 2, base), sincos_1d(cols, dim // 2, base)], dim=1)


class LearnedPosition2D(nn.Module):
    """ViT's "2-D" variant: learned row and column embeddings of D/2 each, concatenated per patch."""

    def __init__(self, grid: tuple[int, int], dim: int):
        super().__init__()
        if dim % 2:
            raise ValueError(f"2-D learned positions need an even dim, got {dim}")
        self.row = nn.Parameter(torch.zeros(grid[0], dim // 2))
        self.col = nn.Parameter(torch.zeros(grid[1], dim // 2))

    def forward(self, h: int, w: int) -> Tensor:
        """-> (h*w, D); other grid sizes than the trained one are interpolated linearly."""
        row, col = self.row, self.col
        if h != row.shape[0]:
            row = F.interpolate(row.T[None], size=h, mode="linear", align_corners=False)[0].T
        if w != col.shape[0]:
            col = F.interpolate(col.T[None], size=w, mode="linear", align_corners=False)[0].T
        return torch.cat([row[:, None].expand(h, w, -1), col[None].expand(h, w, -1)], dim=-1).reshape(h * w, -1)


def interpolate_pos_2d(pos: Tensor, old_hw: tuple[int, int], new_hw: tuple[int, int], mode: str = "bicubic") -> Tensor:
    """Resample a learned (N, D) grid of patch positions from old_hw to new_hw -> (h*w, D).

    ViT fine-tunes at higher resolution by "2-D interpolation of the pre-trained position embeddings
    according to their location in the original image" (Dosovitskiy et al. 2020, sec. 3.2)."""
    if tuple(old_hw) == tuple(new_hw):
        return pos
    D = pos.shape[-1]
    grid = pos.reshape(1, old_hw[0], old_hw[1], D).permute(0, 3, 1, 2).float()  # (1, D, h, w)
    grid = F.interpolate(grid, size=new_hw, mode=mode, align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(new_hw[0] * new_hw[1], D).to(pos.dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x_i, x_{i+Dh/2}) by the position's angle ("rotate half" layout of the HF checkpoints).

    x (B, H, T, Dh); cos, sin broadcastable to it."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class RoPE(nn.Module):
    """Rotary position embedding tables (Su et al. 2021): positions (B, T) -> (cos, sin) each (B, T, Dh).

    scaling: a Hugging Face `rope_scaling` dict for longer contexts: {"rope_type": "linear", "factor": f}
    (positions divided by f) or {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"} (Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth
    blend between). The inverse frequencies are recomputed (not loaded), so they never appear in a checkpoint.

    M-RoPE (Qwen2-VL): {"rope_type": "mrope", "mrope_section": [s_t, s_h, s_w]} with s_t + s_h + s_w = Dh/2. Positions
    (3, B, T) then hold each token's (temporal, height, width) ids, and frequency slot i takes its angle from the
    axis of the section it falls in (the first s_t slots from the temporal ids, the next s_h from the height ids,
    ...), as transformers' Qwen2-VL rotary embedding does; positions (B, T) are the same ids on all three axes,
    which is plain RoPE."""

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: dict | None = None):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.scaling = dict(scaling or {})
        kind = self.scaling.get("rope_type", self.scaling.get("type", "default"))
        if kind not in ("default", "linear", "llama3", "mrope"):
            raise ValueError(f"rope scaling {kind!r} is not supported; supported: default, linear, llama3, mrope")
        self.kind = kind
        self.mrope_section = _mrope_section(self.scaling.get("mrope_section"), head_dim)
        if kind == "mrope" and self.mrope_section is None:
            raise ValueError("rope_type 'mrope' needs an mrope_section (three sizes summing to head_dim / 2)")
        # Built on the meta device (as the loader does), the table stays empty until `materialize`: arithmetic on
        # meta tensors imports torch._dynamo on first use, ~2 s of every load.
        on_meta = torch.get_default_device().type == "meta"
        inv_freq = torch.empty((head_dim + 1) // 2, dtype=torch.float32) if on_meta else self._inv_freq()
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _inv_freq(self, device=None) -> Tensor:
        steps = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / self.theta ** (steps / self.head_dim)
        if self.kind == "linear":
            return inv_freq / self.scaling["factor"]
        if self.kind == "llama3":
            s = self.scaling
            factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
            context = s["original_max_position_embeddings"]
            wavelen = 2 * math.pi / inv_freq
            slowed = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
            smooth = (context / wavelen - low) / (high - low)
            blended = (1 - smooth) * slowed / factor + smooth * slowed
            medium = (wavelen >= context / high) & (wavelen <= context / low)
            return torch.where(medium, blended, slowed)
        return inv_freq

    def materialize(self, device) -> None:
        """Called by the loader after building on the meta device: recompute the non-persistent table."""
        self.inv_freq = self._inv_freq(device)

    def forward(self, positions: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """positions (B, T), or (3, B, T) for M-RoPE -> (cos, sin) each (B, T, Dh)."""
        angles = positions[..., None].float() * self.inv_freq  # (B, T, Dh/2) or (3, B, T, Dh/2)
        if positions.dim() == 3:
            if self.mrope_section is None or positions.shape[0] != len(self.mrope_section):
                raise ValueError(f"positions of shape {tuple(positions.shape)} need M-RoPE (rope_type 'mrope' with "
                                 f"a 3-entry mrope_section); this RoPE takes (batch, length)")
            # slot i reads the angle of its section's axis: static slices, nothing read back (a captured decode step)
            sections = angles.split(self.mrope_section, dim=-1)
            angles = torch.cat([part[axis] for axis, part in enumerate(sections)], dim=-1)  # (B, T, Dh/2)
        emb = torch.cat([angles, angles], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _mrope_section(section, head_dim: int) -> list[int] | None:
    """A config's `mrope_section` checked: three positive sizes summing to head_dim / 2 (None: not M-RoPE)."""
    if section is None:
        return None
    if (not isinstance(section, (list, tuple)) or len(section) != 3
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in section)):
        raise ValueError(f"mrope_section must be three positive integers, got {section!r}")
    if sum(section) != head_dim // 2:
        raise ValueError(f"mrope_section {list(section)} sums to {sum(section)}, but the head dimension {head_dim} "
                         f"has {head_dim // 2} rotary frequencies")
    return list(section)


def grid_size(n_patches: int) -> tuple[int, int]:
    """The square grid holding n patches (a learned grid is square unless stated otherwise)."""
    side = math.isqrt(n_patches)
    if side * side != n_patches:
        raise ValueError(f"{n_patches} position embeddings do not form a square grid")
    return side, side
