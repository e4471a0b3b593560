"""LeNet-5 (LeCun, Bottou, Bengio & Haffner 1998, "Gradient-based learning applied to document recognition").

    32x32 -C1-> 6@28x28 -S2-> 6@14x14 -C3-> 16@10x10 -S4-> 16@5x5 -C5-> 120 -F6-> 84 -RBF-> 10

As in section II.B of the paper:
* C1, C3, C5 are 5x5 convolutions (C5 sees all of S4's 5x5 maps, so it amounts to a full connection).
* S2, S4 subsample: each unit adds its 2x2 inputs, multiplies the sum by a trainable coefficient and adds a
  trainable bias, one pair per map.
* C3 is partially connected (Table I): each of its 16 maps sees 3, 4 or all 6 of S2's maps, which breaks the
  symmetry between maps and keeps the connection count down (1,516 parameters instead of 2,416).
* Every unit up to F6 is squashed by the scaled tanh f(a) = 1.7159 tanh(2a/3) (Appendix A), chosen so that
  f(+-1) = +-1.
* The output layer has one Euclidean RBF unit per class, y_i = sum_j (x_j - w_ij)^2, whose centers w_i are
  fixed +1/-1 vectors: stylized 7x12 bitmaps of the digits (ours are drawn below: '#' = +1, '.' = -1, like
  the paper's Fig. 3, not copied from it). The class score is -y_i, so the largest logit is the nearest center.
* Weights start uniform in +-2.4 / fan-in (Appendix C).

Options for a modern reading: `connection="full"` (C3 sees every S2 map) and `output="linear"` (a linear
softmax classifier instead of the RBF units). The total is 60,000 trainable parameters, as the paper states
(tests/test_lenet.py checks it). No reference implementation exists to compare against; the tests check the
connection table, gradients, training and the save/load round trip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.processing.image import ImageProcessor
from polymodal.registry import Family, native_layout


@dataclass(frozen=True)
class LeNetConfig:
    num_classes: int = 10
    num_channels: int = 1
    image_size: int = 32  # 12 + 4k (k >= 1) so that both subsamplings halve an even map: 16, 20, ..., 32
    connection: Literal["table", "full"] = "table"  # C3: the paper's Table I, or every S2 map
    output: Literal["rbf", "linear"] = "rbf"  # the paper's Euclidean RBF units, or a linear classifier
    id2label: tuple[str, ...] = ()  # class names, in class order; empty: LABEL_i

    def __post_init__(self):
        if self.id2label and len(self.id2label) != self.num_classes:
            raise ValueError(f"LeNetConfig: id2label names {len(self.id2label)} classes, but num_classes is "
                             f"{self.num_classes}")
        if self.connection not in ("table", "full"):
            raise ValueError(f"LeNetConfig: connection must be 'table' or 'full', got {self.connection!r}")
        if self.output not in ("rbf", "linear"):
            raise ValueError(f"LeNetConfig: output must be 'rbf' or 'linear', got {self.output!r}")
        if self.image_size < 16 or (self.image_size - 12) % 4:
            raise ValueError(f"LeNetConfig: image_size must be 16, 20, 24, 28, 32, ... (12 + 4k), got "
                             f"{self.image_size}")
        if self.output == "rbf" and not 1 <= self.num_classes <= len(DIGITS):
            raise ValueError(f"LeNetConfig: the RBF output has centers for {len(DIGITS)} digit classes, not "
                             f"num_classes={self.num_classes}; use output='linear'")

    @property
    def s4_size(self) -> int:
        """Side of S4's maps, and so C5's kernel (5 at 32x32)."""
        return ((self.image_size - 4) // 2 - 4) // 2


# Table I: the S2 maps (0-5) that each C3 map (0-15) sees. Six maps see 3 contiguous maps, six see 4
# contiguous, three see 4 discontinuous ones, and the last sees all six.
C3_TABLE: tuple[tuple[int, ...], ...] = (
    (0, 1, 2), (1, 2, 3), (2, 3, 4), (3, 4, 5), (4, 5, 0), (5, 0, 1),
    (0, 1, 2, 3), (1, 2, 3, 4), (2, 3, 4, 5), (3, 4, 5, 0), (4, 5, 0, 1), (5, 0, 1, 2),
    (0, 1, 3, 4), (1, 2, 4, 5), (0, 2, 3, 5),
    (0, 1, 2, 3, 4, 5),
)

# The RBF centers: digits 0-9 as 7 wide x 12 high bitmaps, side by side ('#' = +1, '.' = -1).
DIGITS_ART = """
.......  .......  .......  .......  .......  .......  .......  .......  .......  .......
..###..  ...#...  ..###..  .#####.  ....##.  #######  ..####.  #######  .#####.  .#####.
.#...#.  ..##...  .#...#.  #.....#  ...#.#.  #......  .#.....  ......#  #.....#  #.....#
#.....#  .#.#...  #.....#  ......#  ..#..#.  #......  #......  .....#.  #.....#  #.....#
#.....#  ...#...  ......#  ......#  .#...#.  ######.  #......  .....#.  #.....#  #.....#
#.....#  ...#...  .....#.  ..####.  #....#.  ......#  #.####.  ....#..  .#####.  #....##
#.....#  ...#...  ....#..  ......#  #######  ......#  ##....#  ....#..  #.....#  .####.#
#.....#  ...#...  ...#...  ......#  .....#.  ......#  #.....#  ...#...  #.....#  ......#
#.....#  ...#...  ..#....  ......#  .....#.  ......#  #.....#  ...#...  #.....#  ......#
.#...#.  ...#...  .#.....  #.....#  .....#.  #.....#  #.....#  ..#....  #.....#  .....#.
..###..  .#####.  #######  .#####.  .....#.  .#####.  .#####.  ..#....  .#####.  .####..
.......  .......  .......  .......  .......  .......  .......  .......  .......  .......
"""
DIGITS: tuple[str, ...] = tuple(
    "".join(row.split()[d] for row in DIGITS_ART.strip().splitlines()) for d in range(10)
)  # 10 strings of 84 characters, row by row


def digit_centers(num_classes: int = 10, device: torch.device | str | None = None) -> Tensor:
    """The fixed RBF centers (num_classes, 84): +1 where a digit's bitmap is inked, -1 elsewhere."""
    rows = [[1.0 if ch == "#" else -1.0 for ch in DIGITS[d]] for d in range(num_classes)]
    return torch.tensor(rows, device=device)


def squash(a: Tensor) -> Tensor:
    """The paper's squashing function f(a) = A tanh(S a) with A = 1.7159, S = 2/3 (Appendix A)."""
    return 1.7159 * torch.tanh(a * (2.0 / 3.0))


class Subsampling(nn.Module):
    """S2 / S4: (B, C, H, W) -> (B, C, H/2, W/2), each map's 2x2 sums times its coefficient plus its bias."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels))
        self.bias = nn.Parameter(torch.empty(channels))

    def forward(self, x: Tensor) -> Tensor:
        sums = 4 * F.avg_pool2d(x, 2)  # the sum of each non-overlapping 2x2 block
        return sums * self.weight[:, None, None] + self.bias[:, None, None]


class TableConv(nn.Conv2d):
    """A convolution in which output map k sees only the input maps `table[k]` (C3, Table I).

    The full weight is stored and multiplied by a fixed 0/1 mask, so unconnected weights never act and never
    receive a gradient; the mask is rebuilt from the table, never stored in a checkpoint."""

    def __init__(self, table: tuple[tuple[int, ...], ...], in_channels: int, kernel_size: int):
        super().__init__(in_channels, len(table), kernel_size)
        self.table = table
        self.register_buffer("mask", self._mask(), persistent=False)

    def _mask(self, device=None) -> Tensor:
        mask = torch.zeros(len(self.table), self.in_channels, 1, 1, device=device)
        for k, inputs in enumerate(self.table):
            mask[k, list(inputs)] = 1.0
        return mask

    def materialize(self, device) -> None:
        """Called by the loader after building on the meta device: rebuild the mask."""
        self.mask = self._mask(device)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.mask.to(self.weight.dtype), self.bias)


class EuclideanRBF(nn.Module):
    """(B, 84) -> (B, num_classes) = minus the squared Euclidean distance to each class's fixed center."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("centers", digit_centers(num_classes), persistent=False)

    def materialize(self, device) -> None:
        self.centers = digit_centers(self.num_classes, device)

    def forward(self, x: Tensor) -> Tensor:
        return -((x[:, None, :] - self.centers.to(x.dtype)) ** 2).sum(-1)  # (B, N, 84) -> (B, N)


class LeNet(nn.Module):
    """pixel_values (B, C, 32, 32) -> class logits (B, num_classes) (for RBF outputs: minus the distances)."""

    def __init__(self, config: LeNetConfig):
        super().__init__()
        self.config = c = config
        self.c1 = nn.Conv2d(c.num_channels, 6, 5)
        self.s2 = Subsampling(6)
        self.c3 = TableConv(C3_TABLE, 6, 5) if c.connection == "table" else nn.Conv2d(6, 16, 5)
        self.s4 = Subsampling(16)
        self.c5 = nn.Conv2d(16, 120, c.s4_size)  # spans all of S4: a full connection at the paper's size
        self.f6 = nn.Linear(120, 84)
        self.output = EuclideanRBF(c.num_classes) if c.output == "rbf" else nn.Linear(84, c.num_classes)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Uniform in +-2.4 / F_i, F_i the number of inputs of the unit (Appendix C)."""
        for m in (self.c1, self.s2, self.c3, self.s4, self.c5, self.f6, self.output):
            if isinstance(m, EuclideanRBF):
                continue  # fixed centers
            out = m.weight.shape[0]
            if isinstance(m, TableConv):
                fan_in = m.mask.sum((1, 2, 3)) * m.weight[0, 0].numel()  # 75, 100 or 150 per C3 map
            else:
                fan_in = torch.full((out,), 4.0 if isinstance(m, Subsampling) else float(m.weight[0].numel()))
            bound = 2.4 / fan_in  # (out,)
            m.weight.uniform_(-1.0, 1.0).mul_(bound.view(out, *[1] * (m.weight.ndim - 1)))
            m.bias.uniform_(-1.0, 1.0).mul_(bound)
            if isinstance(m, TableConv):
                m.weight.mul_(m.mask)  # unconnected weights stay zero

    def forward(self, pixel_values: Tensor) -> Tensor:
        c, x = self.config, pixel_values
        if x.ndim != 4 or tuple(x.shape[1:]) != (c.num_channels, c.image_size, c.image_size):
            raise ValueError(f"expected pixel_values (B, {c.num_channels}, {c.image_size}, {c.image_size}), "
                             f"got {tuple(x.shape)}")
        x = squash(self.c1(x))  # (B, 6, 28, 28)
        x = squash(self.s2(x))  # (B, 6, 14, 14)
        x = squash(self.c3(x))  # (B, 16, 10, 10)
        x = squash(self.s4(x))  # (B, 16, 5, 5)
        x = squash(self.c5(x)).flatten(1)  # (B, 120)
        x = squash(self.f6(x))  # (B, 84)
        return self.output(x)  # (B, num_classes)

    classify = forward  # every image classifier answers `classify(pixel_values)`


# ----------------------------------------------------------------------------------------------- presets

PRESETS: dict[str, LeNetConfig] = {
    "lenet-tiny-test": LeNetConfig(image_size=16, num_classes=4),
    "lenet-5": LeNetConfig(),
    "lenet-5-linear": LeNetConfig(connection="full", output="linear"),
}

# ------------------------------------------------------------------------------------------ checkpoints
# No reference library holds LeNet-5: polymodal's own layout only (config.json with model_type
# "polymodal-lenet" and our tensor names).


FAMILY = Family(
    name="lenet",
    model=LeNet,
    layouts={"polymodal": native_layout("lenet", LeNetConfig)},
    presets=PRESETS,
    description="LeNet-5 (1998): Table I partial connections, trainable subsampling, Euclidean RBF output",
    image_processor=lambda c: ImageProcessor.lenet(),
    tasks=("image-classification",),
)
