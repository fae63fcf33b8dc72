"""Example models built in code (no downloads): ResNet18 with random weights and a small CNN."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from maptools.errors import ModelError
from maptools.maps.folder import atomic_write

__all__ = ["SmallCNN", "export_onnx", "resnet18_onnx", "small_cnn_onnx", "example_model", "EXAMPLES",
           "EXAMPLE_PREFIX", "RESNET18_SHAPES", "SMALL_CNN_SHAPES"]

RESNET18_SHAPES = {"input": [1, 3, 224, 224]}
SMALL_CNN_SHAPES = {"input": [1, 3, 32, 32]}


class SmallCNN(nn.Module):
    """Conv-BN-ReLU x3 with a residual add, pooling and a linear head; 32x32 RGB in, 10 logits out."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stem(x))
        x = torch.relu(x + self.block(x))
        return self.head(self.down(x))


def export_onnx(module: nn.Module, path: Path, shapes: dict[str, list[int]], simplify: bool = True) -> Path:
    """Export ``module`` (eval mode) to ONNX opset 13 with the TorchScript exporter, optionally prepared
    (:func:`maptools.prepare.prepare_model`: onnxsim, BatchNorm folded, nodes named)."""
    from maptools.prepare import prepare_model

    module = module.eval()
    args = tuple(torch.zeros(s) for s in shapes.values())
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad():
            torch.onnx.export(module, args, str(raw), input_names=list(shapes), output_names=["output"],
                              opset_version=13, dynamo=False)
        if simplify:
            prepare_model(raw, path, shapes)
        else:
            path.write_bytes(raw.read_bytes())
    return path


def resnet18_onnx(path: str | Path, seed: int = 0, simplify: bool = True) -> Path:
    """torchvision ResNet18 with seeded random weights (nothing downloaded), exported to ``path``."""
    from torchvision.models import resnet18

    torch.manual_seed(seed)
    return export_onnx(resnet18(weights=None), Path(path), RESNET18_SHAPES, simplify)


def small_cnn_onnx(path: str | Path, seed: int = 0, model: nn.Module | None = None, simplify: bool = True) -> Path:
    """:class:`SmallCNN` (seeded random weights unless ``model`` is given), exported to ``path``."""
    torch.manual_seed(seed)
    return export_onnx(model or SmallCNN(), Path(path), SMALL_CNN_SHAPES, simplify)


#: Built-in example models, addressable as ``example:<name>`` wherever a model path is taken.
EXAMPLES = {"resnet18": (resnet18_onnx, RESNET18_SHAPES), "small_cnn": (small_cnn_onnx, SMALL_CNN_SHAPES)}
EXAMPLE_PREFIX = "example:"


def example_model(spec: str, folder: str | Path) -> Path:
    """Path of built-in example ``example:<name>`` under ``folder``, exported there once (seed 0, unsimplified)."""
    name = spec.removeprefix(EXAMPLE_PREFIX)
    if name not in EXAMPLES:
        raise ModelError(f"unknown example model {spec!r}.",
                         f"use one of: {', '.join(EXAMPLE_PREFIX + n for n in EXAMPLES)}, or a path to an ONNX file.")
    target = Path(folder) / f"{name}.onnx"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = EXAMPLES[name][0](Path(tmp) / target.name, simplify=False)
            atomic_write(target, built.read_bytes())
    return target
