"""ResNet (He et al. 2016, "Deep Residual Learning for Image Recognition").

    y = act(F(x) + shortcut(x))           F: two 3x3 convs (basic) or 1x1 -> 3x3 -> 1x1 (bottleneck)

A 7x7/2 convolution and a 3x3/2 max-pool (the stem) take a 224x224 image to 56x56; four stages of residual
blocks follow, each after the first halving the resolution in its first block, so the final map is 7x7
(stride 32). ResNet-18/34 stack basic blocks, ResNet-50/101/152 bottleneck blocks whose 3x3 runs at a quarter
of the block's width (256 -> 64 -> 64 -> 256). Every convolution is followed by BatchNorm (Ioffe & Szegedy
2015) and has no bias; a shortcut that changes shape is a 1x1 convolution + BatchNorm (the paper's
"option B"). BatchNorm runs on its running statistics in eval mode, which is what `pm.load` returns.

Two placements of the stride exist: the paper (and transformers' `downsample_in_bottleneck=True`) strides the
first 1x1 of a bottleneck; torchvision, timm and microsoft/resnet-50 ("ResNet v1.5") stride the 3x3.
Both are supported, as is transformers' `downsample_in_first_stage`.

Checked against transformers' `ResNetModel` / `ResNetForImageClassification` and timm's `resnet*` models
(tests/test_resnet.py). Module names follow timm's (`conv1`, `bn1`, ..., `fc` aside), so timm checkpoints
map onto ours with renames of the stage and head names only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from polymodal.config import from_dict
from polymodal.nn import activation
from polymodal.registry import Family, Layout, native_layout
from polymodal.weights.keymap import KeyMap, Rename


@dataclass(frozen=True)
class ResNetConfig:
    num_channels: int = 3
    embedding_size: int = 64  # the stem's width
    hidden_sizes: tuple[int, ...] = (256, 512, 1024, 2048)  # each stage's output width
    depths: tuple[int, ...] = (3, 4, 6, 3)  # blocks per stage
    layer_type: Literal["basic", "bottleneck"] = "bottleneck"
    hidden_act: str = "relu"  # the stem's and the block outputs' activation (transformers' meaning)
    downsample_in_first_stage: bool = False  # stride 2 in the first stage too (feature stride 64)
    downsample_in_bottleneck: bool = False  # stride in the bottleneck's first 1x1 (paper) instead of its 3x3
    num_labels: int = 0  # > 0: a linear classifier on the globally average-pooled final map
    id2label: tuple[str, ...] = ()

    def __post_init__(self):
        if len(self.hidden_sizes) != len(self.depths) or not self.depths:
            raise ValueError(f"ResNetConfig: hidden_sizes {self.hidden_sizes} and depths {self.depths} must "
                             "name the same, non-zero number of stages")
        if self.layer_type not in ("basic", "bottleneck"):
            raise ValueError(f"ResNetConfig: layer_type must be 'basic' or 'bottleneck', got {self.layer_type!r}")
        if self.layer_type == "bottleneck" and any(h % 4 for h in self.hidden_sizes):
            raise ValueError(f"ResNetConfig: bottleneck widths must be multiples of 4, got {self.hidden_sizes}")

    @property
    def feature_stride(self) -> int:
        """Total stride of the final feature map: 4 (stem) x 2 per later stage (x 2 more with
        downsample_in_first_stage); 32 for the paper's networks."""
        return 4 * 2 ** (len(self.depths) - 1 + int(self.downsample_in_first_stage))

    @property
    def out_channels(self) -> int:
        return self.hidden_sizes[-1]


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    """A bias-free convolution ("same" padding) and the BatchNorm that follows it."""
    return nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(c_out)


def projection(c_in: int, c_out: int, stride: int) -> nn.Sequential | None:
    """The paper's option-B shortcut: a strided 1x1 conv + BN where the shape changes, else identity (None)."""
    return nn.Sequential(*conv_bn(c_in, c_out, 1, stride)) if c_in != c_out or stride != 1 else None


class BasicBlock(nn.Module):
    """Two 3x3 convs (paper Fig. 5 left): (B, C_in, H, W) -> (B, C_out, H/s, W/s)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, act: str = "relu"):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(c_in, c_out, 3, stride)
        self.conv2, self.bn2 = conv_bn(c_out, c_out, 3)
        self.shortcut = projection(c_in, c_out, stride)
        self.act = activation(act)

    def forward(self, x: Tensor) -> Tensor:
        # the inner activation is always ReLU; `act` (hidden_act) is applied to the sum, as transformers does
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.act(y + (x if self.shortcut is None else self.shortcut(x)))


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 -> 1x1 expand at a quarter of the width (paper Fig. 5 right)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, act: str = "relu", stride_first: bool = False):
        super().__init__()
        width = c_out // 4
        self.conv1, self.bn1 = conv_bn(c_in, width, 1, stride if stride_first else 1)
        self.conv2, self.bn2 = conv_bn(width, width, 3, 1 if stride_first else stride)
        self.conv3, self.bn3 = conv_bn(width, c_out, 1)
        self.shortcut = projection(c_in, c_out, stride)
        self.act = activation(act)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))  # (B, C_out/4, H', W')
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))  # (B, C_out, H/s, W/s)
        return self.act(y + (x if self.shortcut is None else self.shortcut(x)))


class ResNetFeatures(nn.Module):
    """Stem and residual stages: (B, C, H, W) -> the final map (B, out_channels, H/stride, W/stride).

    Also the hybrid stem of ViT (polymodal.models.vit)."""

    def __init__(self, config: ResNetConfig):
        super().__init__()
        c = config
        self.out_channels = c.out_channels
        self.num_channels = c.num_channels
        self.conv1, self.bn1 = conv_bn(c.num_channels, c.embedding_size, 7, 2)
        self.act = activation(c.hidden_act)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        widths = (c.embedding_size, *c.hidden_sizes)
        self.stages = nn.ModuleList()
        for s, depth in enumerate(c.depths):
            stride = 2 if s > 0 or c.downsample_in_first_stage else 1
            blocks = [self._block(c, widths[s], widths[s + 1], stride)]
            blocks += [self._block(c, widths[s + 1], widths[s + 1], 1) for _ in range(depth - 1)]
            self.stages.append(nn.Sequential(*blocks))
        self.reset_parameters()

    @staticmethod
    def _block(c: ResNetConfig, c_in: int, c_out: int, stride: int) -> nn.Module:
        if c.layer_type == "basic":
            return BasicBlock(c_in, c_out, stride, c.hidden_act)
        return Bottleneck(c_in, c_out, stride, c.hidden_act, stride_first=c.downsample_in_bottleneck)

    def reset_parameters(self) -> None:
        """He et al. 2015 ("Delving Deep into Rectifiers") initialization for the convolutions, as the paper."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.num_channels:
            raise ValueError(f"expected pixel_values (B, {self.num_channels}, H, W), got {tuple(x.shape)}")
        x = self.maxpool(self.act(self.bn1(self.conv1(x))))  # (B, C0, H/4, W/4)
        for stage in self.stages:
            x = stage(x)  # each later stage halves H and W
        return x


class ResNet(nn.Module):
    """pixel_values (B, C, H, W) -> the final feature map (B, C_out, H/32, W/32) (transformers'
    `last_hidden_state`); `pooled` -> (B, C_out); `classify` -> logits (B, num_labels)."""

    def __init__(self, config: ResNetConfig):
        super().__init__()
        self.config = config
        self.features = ResNetFeatures(config)
        self.head = nn.Linear(config.out_channels, config.num_labels) if config.num_labels else None

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.features(pixel_values)

    def pooled(self, pixel_values: Tensor) -> Tensor:
        """Global average pool of the final map: (B, C_out) (transformers' `pooler_output`, flattened)."""
        return self(pixel_values).mean((2, 3))

    def classify(self, pixel_values: Tensor) -> Tensor:
        """Class logits (B, num_labels)."""
        if self.head is None:
            raise ValueError("this ResNet has no classification head (num_labels=0)")
        return self.head(self.pooled(pixel_values))


# ----------------------------------------------------------------------------------------------- presets

_BASIC, _BOTTLENECK = (64, 128, 256, 512), (256, 512, 1024, 2048)
PRESETS: dict[str, ResNetConfig] = {
    # 4 stages of 1 basic block, stride 32: milliseconds on CPU, and small enough for a hybrid ViT stem
    "resnet-tiny-test": ResNetConfig(embedding_size=8, hidden_sizes=(8, 16, 24, 32), depths=(1, 1, 1, 1),
                                     layer_type="basic", num_labels=10),
    # one basic stage on grayscale input, stride 4: the hybrid ViT stem of the vit-fashion-mnist recipe (28 -> 7)
    "resnet-stem-gray": ResNetConfig(num_channels=1, embedding_size=32, hidden_sizes=(64,), depths=(1,),
                                     layer_type="basic"),
    "resnet-18": ResNetConfig(hidden_sizes=_BASIC, depths=(2, 2, 2, 2), layer_type="basic", num_labels=1000),
    "resnet-34": ResNetConfig(hidden_sizes=_BASIC, depths=(3, 4, 6, 3), layer_type="basic", num_labels=1000),
    "resnet-50": ResNetConfig(hidden_sizes=_BOTTLENECK, depths=(3, 4, 6, 3), num_labels=1000),
    "resnet-101": ResNetConfig(hidden_sizes=_BOTTLENECK, depths=(3, 4, 23, 3), num_labels=1000),
    "resnet-152": ResNetConfig(hidden_sizes=_BOTTLENECK, depths=(3, 8, 36, 3), num_labels=1000),
}
HUB_IDS = {
    "microsoft/resnet-18": "resnet-18",
    "microsoft/resnet-34": "resnet-34",
    "microsoft/resnet-50": "resnet-50",
    "microsoft/resnet-101": "resnet-101",
    "microsoft/resnet-152": "resnet-152",
    "timm/resnet18.a1_in1k": "resnet-18",
    "timm/resnet34.a1_in1k": "resnet-34",
    "timm/resnet50.a1_in1k": "resnet-50",
    "timm/resnet50.tv_in1k": "resnet-50",
}

# ------------------------------------------------------------------------------------------ checkpoints
# transformers: `embedder.embedder.*` (stem), `encoder.stages.{s}.layers.{i}.layer.{k}.*` (the block's k-th
# conv + BN), `.shortcut.*`; each conv layer is `convolution` + `normalization`. ResNetForImageClassification
# adds a `resnet.` prefix and `classifier.1` (index 0 is a Flatten).

def _hf_key_map(c: ResNetConfig) -> KeyMap:
    p = "resnet." if c.num_labels else ""
    layer = f"{p}encoder.stages.{{s}}.layers.{{i}}"
    return KeyMap([
        Rename(f"{p}embedder.embedder.convolution.weight", "features.conv1.weight"),
        Rename(f"{p}embedder.embedder.normalization.{{n}}", "features.bn1.{n}"),
        Rename(f"{layer}.shortcut.convolution.weight", "features.stages.{s}.{i}.shortcut.0.weight"),
        Rename(f"{layer}.shortcut.normalization.{{n}}", "features.stages.{s}.{i}.shortcut.1.{n}"),
        *[Rename(f"{layer}.layer.{k}.convolution.weight", f"features.stages.{{s}}.{{i}}.conv{k + 1}.weight")
          for k in range(3)],
        *[Rename(f"{layer}.layer.{k}.normalization.{{n}}", f"features.stages.{{s}}.{{i}}.bn{k + 1}.{{n}}")
          for k in range(3)],
        Rename("classifier.1.{n}", "head.{n}"),
    ])


def _labels(raw_names: dict | list | None, n: int) -> tuple[str, ...]:
    """n class names from transformers' `id2label` ({"0": name}) or timm's `label_names` (a list or a dict)."""
    items = raw_names.items() if isinstance(raw_names, dict) else enumerate(raw_names or [])
    names = {str(k): v for k, v in items}
    return tuple(names.get(str(i), f"LABEL_{i}") for i in range(n))


def _read_hf(raw: dict, shapes: dict) -> ResNetConfig:
    n = shapes["classifier.1.weight"][0] if "classifier.1.weight" in shapes else 0
    return from_dict(ResNetConfig, raw, num_labels=n, id2label=_labels(raw.get("id2label"), n))


def _write_hf(c: ResNetConfig) -> dict:
    out = {
        "model_type": "resnet",
        "architectures": ["ResNetForImageClassification" if c.num_labels else "ResNetModel"],
        "num_channels": c.num_channels, "embedding_size": c.embedding_size,
        "hidden_sizes": list(c.hidden_sizes), "depths": list(c.depths), "layer_type": c.layer_type,
        "hidden_act": c.hidden_act, "downsample_in_first_stage": c.downsample_in_first_stage,
        "downsample_in_bottleneck": c.downsample_in_bottleneck,
    }
    if c.num_labels:
        names = c.id2label or _labels(None, c.num_labels)
        out["id2label"] = {str(i): name for i, name in enumerate(names)}
        out["label2id"] = {name: i for i, name in enumerate(names)}
    return out


# timm: our names are timm's but for `layer{s+1}` (our `stages.{s}`), `downsample` (our `shortcut`) and `fc`
# (our `head`). The stem of timm's plain ResNets is always 64 wide, and there are always four stages.
def _timm_key_map(c: ResNetConfig) -> KeyMap:
    per_stage = [
        rule
        for s in range(len(c.depths))
        for rule in (
            Rename(f"layer{s + 1}.{{i}}.downsample.{{rest*}}", f"features.stages.{s}.{{i}}.shortcut.{{rest*}}"),
            Rename(f"layer{s + 1}.{{rest*}}", f"features.stages.{s}.{{rest*}}"),
        )
    ]
    return KeyMap([
        Rename("conv1.weight", "features.conv1.weight"),
        Rename("bn1.{n}", "features.bn1.{n}"),
        *per_stage,
        Rename("fc.{n}", "head.{n}"),
    ])


_TIMM_NAMES = {
    ("basic", (2, 2, 2, 2)): "resnet18",
    ("basic", (3, 4, 6, 3)): "resnet34",
    ("bottleneck", (3, 4, 6, 3)): "resnet50",
    ("bottleneck", (3, 4, 23, 3)): "resnet101",
    ("bottleneck", (3, 8, 36, 3)): "resnet152",
}


def _read_timm(raw: dict, shapes: dict) -> ResNetConfig:
    arch = raw.get("architecture")
    stem = shapes.get("conv1.weight")
    plain = stem is not None and len(stem) == 4 and stem[-1] == 7 and "bn1.running_mean" in shapes
    if not plain or "layer2.0.downsample.2.weight" in shapes:
        raise ValueError(f"timm architecture {arch!r} is not a plain ResNet (7x7 stem, BatchNorm, 1x1 "
                         "projection shortcuts); polymodal reads resnet18/34/50/101/152-style models only")
    bottleneck = "layer1.0.conv3.weight" in shapes
    last = "conv3" if bottleneck else "conv2"
    stages = range(1, 1 + len({k.split(".")[0] for k in shapes if k.startswith("layer")}))
    depths = tuple(len({k.split(".")[1] for k in shapes if k.startswith(f"layer{s}.")}) for s in stages)
    hidden = tuple(shapes[f"layer{s}.0.{last}.weight"][0] for s in stages)
    if bottleneck and any(shapes[f"layer{s}.0.conv2.weight"][:2] != (h // 4, h // 4)
                          for s, h in zip(stages, hidden)):
        raise ValueError(f"timm architecture {arch!r} has wide or grouped bottlenecks (ResNeXt / Wide ResNet), "
                         "which this family does not hold")
    n = shapes["fc.weight"][0] if "fc.weight" in shapes else 0
    return ResNetConfig(
        num_channels=stem[1], embedding_size=stem[0], hidden_sizes=hidden, depths=depths,
        layer_type="bottleneck" if bottleneck else "basic", num_labels=n,
        id2label=_labels(raw.get("label_names"), n) if raw.get("label_names") else (),
    )


def _write_timm(c: ResNetConfig) -> dict:
    if (len(c.depths) != 4 or c.embedding_size != 64 or c.hidden_act != "relu" or c.downsample_in_first_stage
            or c.downsample_in_bottleneck):
        raise ValueError("timm's ResNet layout holds 4 stages, a 64-wide stem, ReLU and the stride in the 3x3 "
                         "only; save this model in transformers' or polymodal's layout instead")
    expansion = 4 if c.layer_type == "bottleneck" else 1
    arch = _TIMM_NAMES.get((c.layer_type, c.depths), "resnet50" if expansion == 4 else "resnet18")
    out = {
        "architecture": arch, "num_classes": c.num_labels, "num_features": c.out_channels, "global_pool": "avg",
        "model_args": {"layers": list(c.depths), "channels": [h // expansion for h in c.hidden_sizes],
                       "in_chans": c.num_channels, "num_classes": c.num_labels, "global_pool": "avg"},
        "pretrained_cfg": {"input_size": [c.num_channels, 224, 224], "num_classes": c.num_labels,
                           "first_conv": "conv1", "classifier": "fc", "mean": [0.485, 0.456, 0.406],
                           "std": [0.229, 0.224, 0.225], "crop_pct": 0.875, "interpolation": "bilinear"},
    }
    if c.id2label:
        out["label_names"] = list(c.id2label)
    return out


FAMILY = Family(
    name="resnet",
    model=ResNet,
    layouts={
        "transformers": Layout("transformers", _read_hf, _write_hf, _hf_key_map),
        "timm": Layout("timm", _read_timm, _write_timm, _timm_key_map),
        "polymodal": native_layout("resnet", ResNetConfig),
    },
    presets=PRESETS,
    hub_ids=HUB_IDS,
    description="ResNet-18/34/50/101/152 (basic and bottleneck blocks; v1 and v1.5 strides)",
    tasks=("image-classification",),
)
