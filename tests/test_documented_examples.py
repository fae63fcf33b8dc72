"""The two documented examples (seed-quantization docs), run as written but for paths and DEVICE."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from maptools import read_manifest, read_quantinfo


@pytest.fixture
def workdir(tmp_path, monkeypatch, resnet18):
    (tmp_path / "onnx_models").mkdir()
    shutil.copy(resnet18, tmp_path / "onnx_models" / "simp-resnet18.onnx")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_random_calibration_example(workdir) -> None:
    from maptools.quantization import quantize

    INPUT_SHAPES     = {'input': [1, 3, 224, 224]}  # noqa: E221
    CALIB_STEPS      = 128  # noqa: E221
    DEVICE           = 'cpu'  # noqa: E221
    ONNX_PATH        = 'onnx_models/simp-resnet18.onnx'  # noqa: E221

    quantize(
        INPUT_SHAPES,
        DEVICE,
        ONNX_PATH,
        mapname='resnet18',
        calibset=None,
        calib_steps=CALIB_STEPS
    )
    for name in ("quantinfo.pkl", "quantparams.pkl", "quant_model.onnx"):
        assert (workdir / "mapsave" / "resnet18" / name).is_file()
    assert read_manifest("resnet18")["calib_steps_used"] == 128
    assert len(read_quantinfo("resnet18")) == 49


def test_dataset_calibration_example(workdir) -> None:
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (workdir / "calib" / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(workdir / "calib" / cls / f"{i}.png")

    import torch  # noqa: F401
    from maptools.quantization import quantize
    import torchvision.transforms as transforms
    import torchvision as tv

    trans = transforms.Compose([
        transforms.Resize([224, 224]),
        transforms.ToTensor(),
        transforms.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    ])

    # load the calibration set from a folder
    print("Preparing calibration dataset ...")
    dataset = tv.datasets.ImageFolder(root=str(workdir / "calib"), transform=trans)
    calibset = [{'input': torch.unsqueeze(sample, dim=0)} for sample, _ in dataset]
    print(f"Calibration dataset prepared, number of samples: {len(calibset)}")

    INPUT_SHAPES     = {'input': [1, 3, 224, 224]}  # noqa: E221
    CALIB_STEPS      = 128  # noqa: E221
    DEVICE           = 'cpu'  # noqa: E221
    ONNX_PATH        = 'onnx_models/simp-resnet18.onnx'  # noqa: E221

    quantize(INPUT_SHAPES, DEVICE, ONNX_PATH, mapname='resnet18',
             calibset=calibset, calib_steps=CALIB_STEPS)

    manifest = read_manifest("resnet18")
    assert manifest["calibration"]["kind"] == "samples" and manifest["calib_steps_used"] == 10
    assert any("all 10 samples" in n for n in manifest["notes"])
