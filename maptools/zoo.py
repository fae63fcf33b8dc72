"""A zoo of real-world architectures built in code (random weights, nothing downloaded).

Each entry stands for a family of models people ship as ONNX: torchvision's MobileNetV3,
ShuffleNetV2, EfficientNet and RegNet classifiers, an FPN text detector (Resize, ConvTranspose),
a YOLO-style detector head (SiLU, Split, Concat, a DFL Softmax, box decoding), a CRNN with a
bidirectional LSTM, a small attention block with LayerNorm, and an MTCNN-style PReLU net.
:func:`export_zoo_model` exports one at an opset (11..17) with a dynamic batch axis, as
exporters do, so the tests and benchmarks quantize, convert and simulate them from the raw export.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["ZooModel", "ZOO", "build_zoo_model", "export_zoo_model"]


class FPNDetector(nn.Module):
    """DBNet-style text detector: a strided backbone, an FPN (lateral 1x1, nearest Resize + Add),
    a fused map and a head that upsamples with ConvTranspose to a probability map."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), nn.BatchNorm2d(cout), nn.ReLU())

        self.c2, self.c3, self.c4 = stage(3, width), stage(width, 2 * width), stage(2 * width, 4 * width)
        self.lat = nn.ModuleList(nn.Conv2d(c, width, 1) for c in (width, 2 * width, 4 * width))
        self.smooth = nn.Conv2d(3 * width, width, 3, padding=1)
        self.head = nn.Sequential(
            nn.BatchNorm2d(width), nn.ReLU(), nn.ConvTranspose2d(width, width // 2, 2, 2), nn.BatchNorm2d(width // 2),
            nn.ReLU(), nn.ConvTranspose2d(width // 2, 1, 2, 2), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c2 = self.c2(x)
        c3 = self.c3(c2)
        c4 = self.c4(c3)
        p4 = self.lat[2](c4)
        p3 = self.lat[1](c3) + F.interpolate(p4, scale_factor=2.0, mode="nearest")
        p2 = self.lat[0](c2) + F.interpolate(p3, scale_factor=2.0, mode="nearest")
        fused = torch.cat([p2, F.interpolate(p3, scale_factor=2.0, mode="nearest"),
                           F.interpolate(p4, scale_factor=4.0, mode="nearest")], 1)
        return self.head(self.smooth(fused))


class _ConvSiLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, s: int = 1) -> None:
        super().__init__(nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout), nn.SiLU())


class _C2f(nn.Module):
    """YOLOv8's C2f: a 1x1 conv, a Split in two, a bottleneck on one half, Concat, 1x1 conv."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.cv1, self.cv2 = _ConvSiLU(c, c, 1), _ConvSiLU(c + c // 2, c, 1)
        self.m = nn.Sequential(_ConvSiLU(c // 2, c // 2), _ConvSiLU(c // 2, c // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.cv1(x).split(x.shape[1] // 2, 1)
        return self.cv2(torch.cat([a, b, b + self.m(b)], 1))


class YOLOHead(nn.Module):
    """YOLOv8-style detector: SiLU backbone with C2f blocks, two detection scales, a DFL box head
    (Reshape, Softmax, a 1x1 conv with weights 0..15), anchor decoding (Sub/Add/Mul/Div) and the
    final Concat of boxes (pixels) with sigmoid class scores, as the real exports have."""

    reg_max, classes = 16, 4

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(_ConvSiLU(3, width, 3, 2), _ConvSiLU(width, 2 * width, 3, 2), _C2f(2 * width))
        self.down = nn.Sequential(_ConvSiLU(2 * width, 4 * width, 3, 2), _C2f(4 * width))
        self.box = nn.ModuleList(nn.Sequential(_ConvSiLU(c, width), nn.Conv2d(width, 4 * self.reg_max, 1))
                                 for c in (2 * width, 4 * width))
        self.cls = nn.ModuleList(nn.Sequential(_ConvSiLU(c, width), nn.Conv2d(width, self.classes, 1))
                                 for c in (2 * width, 4 * width))
        self.dfl = nn.Conv2d(self.reg_max, 1, 1, bias=False).requires_grad_(False)
        self.dfl.weight.data[:] = torch.arange(self.reg_max, dtype=torch.float).view(1, self.reg_max, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p3 = self.stem(x)
        p4 = self.down(p3)
        feats, anchors, strides = [], [], []
        for i, (f, stride) in enumerate(((p3, 4.0), (p4, 8.0))):
            feats.append(torch.cat([self.box[i](f), self.cls[i](f)], 1).flatten(2))
            h, w = f.shape[2], f.shape[3]
            sy, sx = torch.meshgrid(torch.arange(h, dtype=torch.float) + 0.5, torch.arange(w, dtype=torch.float) + 0.5,
                                    indexing="ij")
            anchors.append(torch.stack([sx, sy], 0).flatten(1))
            strides.append(torch.full((1, h * w), stride))
        out = torch.cat(feats, 2)
        anchor, stride = torch.cat(anchors, 1), torch.cat(strides, 1)
        box, cls = out.split([4 * self.reg_max, self.classes], 1)
        b, _, a = box.shape
        dist = self.dfl(box.view(b, 4, self.reg_max, a).transpose(2, 1).softmax(1)).view(b, 4, a)
        lt, rb = dist.chunk(2, 1)
        x1y1, x2y2 = anchor - lt, anchor + rb
        boxes = torch.cat([(x1y1 + x2y2) / 2, x2y2 - x1y1], 1) * stride
        return torch.cat([boxes, cls.sigmoid()], 1)


class CRNN(nn.Module):
    """CNN + bidirectional LSTM text recogniser (CTC head): 1x32xW grey images in, [T, N, classes] out."""

    def __init__(self, classes: int = 12, hidden: int = 24) -> None:
        super().__init__()
        self.cnn = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d((2, 1)),
            nn.Conv2d(32, 32, (4, 1)), nn.ReLU())
        self.rnn = nn.LSTM(32, hidden, bidirectional=True)
        self.fc = nn.Linear(2 * hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = self.cnn(x).squeeze(2).permute(2, 0, 1)  # [W/4, N, C]
        out, _ = self.rnn(seq)
        return self.fc(out).log_softmax(2)


class AttentionNet(nn.Module):
    """SVTR-style recogniser piece: conv patch embedding, one pre-norm transformer block
    (LayerNorm, multi-head self-attention with MatMul/Softmax, GELU MLP) and a linear head."""

    def __init__(self, dim: int = 32, heads: int = 4, classes: int = 12) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Conv2d(3, dim // 2, 3, 2, 1), nn.BatchNorm2d(dim // 2), nn.GELU(),
                                   nn.Conv2d(dim // 2, dim, 3, 2, 1), nn.BatchNorm2d(dim), nn.GELU())
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)  # [N, L, C]
        n, length, c = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(n, length, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(n, length, c))
        x = x + self.mlp(self.norm2(x))
        return self.head(self.norm3(x))


class PReLUNet(nn.Module):
    """MTCNN O-Net-style: Conv + per-channel PReLU stages, MaxPool, a Linear + PReLU, two heads."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3), nn.PReLU(16), nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.Conv2d(16, 32, 3), nn.PReLU(32), nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.Conv2d(32, 32, 3), nn.PReLU(32), nn.MaxPool2d(2, 2, ceil_mode=True),
            nn.Conv2d(32, 64, 2), nn.PReLU(64))
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64 * 3 * 3, 64), nn.PReLU(64))
        self.cls, self.box = nn.Linear(64, 2), nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.fc(self.features(x))
        return self.cls(h).softmax(1), self.box(h)


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision.models as tvm

        return getattr(tvm, name)(weights=None, num_classes=10)

    return build


@dataclass(frozen=True)
class ZooModel:
    """A zoo entry: how to build it, its input shape, its output names."""

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    outputs: tuple[str, ...] = ("output",)
    description: str = ""


ZOO: dict[str, ZooModel] = {m.name: m for m in (
    ZooModel("mobilenet_v3_small", _torchvision("mobilenet_v3_small"), (1, 3, 64, 64),
             description="HardSwish, HardSigmoid, squeeze-excitation Mul, depthwise Conv"),
    ZooModel("shufflenet_v2_x0_5", _torchvision("shufflenet_v2_x0_5"), (1, 3, 64, 64),
             description="channel shuffle (Reshape/Transpose), Split or Slice, Concat, depthwise Conv"),
    ZooModel("efficientnet_b0", _torchvision("efficientnet_b0"), (1, 3, 64, 64),
             description="SiLU (Sigmoid x Mul), squeeze-excitation, depthwise Conv"),
    ZooModel("regnet_x_400mf", _torchvision("regnet_x_400mf"), (1, 3, 64, 64),
             description="grouped Conv, residual Add"),
    ZooModel("fpn_detector", FPNDetector, (1, 3, 64, 64),
             description="FPN with nearest Resize + Add, ConvTranspose head, Sigmoid"),
    ZooModel("yolo_head", YOLOHead, (1, 3, 64, 64),
             description="SiLU, Split, Concat, DFL Softmax, box decoding, mixed-range output Concat"),
    ZooModel("crnn_lstm", CRNN, (1, 1, 32, 64), description="CNN + bidirectional LSTM, LogSoftmax"),
    ZooModel("attention_net", AttentionNet, (1, 3, 16, 32),
             description="LayerNorm, multi-head attention (MatMul, Softmax), GELU MLP"),
    ZooModel("prelu_net", PReLUNet, (1, 3, 48, 48), outputs=("prob", "box"),
             description="per-channel PReLU after Conv and Linear, ceil-mode MaxPool, two outputs"),
)}


def build_zoo_model(name: str, seed: int = 0) -> nn.Module:
    """The zoo model ``name`` in eval mode with seeded random weights (BatchNorm statistics randomised too)."""
    torch.manual_seed(seed)
    model = ZOO[name].build().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, as a trained model has
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def export_zoo_model(name: str, path: str | Path, opset: int = 13, *, dynamic_batch: bool = True,
                     seed: int = 0) -> Path:
    """Export zoo model ``name`` to ``path`` as a user's exporter would: unsimplified, at ``opset``,
    the batch axis dynamic (a symbolic ``batch`` dim) unless ``dynamic_batch=False``."""
    entry = ZOO[name]
    model = build_zoo_model(name, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    axes = {n: {0: "batch"} for n in ("input", *entry.outputs)} if dynamic_batch else None
    if name == "crnn_lstm" and axes:
        axes = {"input": {0: "batch"}, "output": {1: "batch"}}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        raw = Path(tmp) / "model.onnx"
        torch.onnx.export(model, (torch.zeros(entry.input_shape),), str(raw), input_names=["input"],
                          output_names=list(entry.outputs), opset_version=opset, dynamic_axes=axes, dynamo=False)
        path.write_bytes(raw.read_bytes())
    return path
