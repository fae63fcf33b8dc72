"""Shared fixtures: models built in code, quantized once per test session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from maptools.conversion import convert
from maptools.examples import RESNET18_SHAPES, SMALL_CNN_SHAPES, export_onnx, resnet18_onnx, small_cnn_onnx
from maptools.quantization import QuantizationResult, quantize

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Small batches run 10x faster on one thread than on a busy 2-core machine's pool."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def small_cnn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_cnn_onnx(tmp_path_factory.mktemp("models") / "small_cnn.onnx")


@pytest.fixture(scope="session")
def resnet18(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return resnet18_onnx(tmp_path_factory.mktemp("models") / "simp-resnet18.onnx")


@pytest.fixture(scope="session")
def small_result(small_cnn: Path, tmp_path_factory: pytest.TempPathFactory) -> QuantizationResult:
    return quantize(SMALL_CNN_SHAPES, "cpu", small_cnn, mapname="small", calib_steps=16,
                    output_root=tmp_path_factory.mktemp("out"))


@pytest.fixture(scope="session")
def resnet_result(resnet18: Path, tmp_path_factory: pytest.TempPathFactory) -> QuantizationResult:
    return quantize(RESNET18_SHAPES, "cpu", resnet18, mapname="resnet18", calib_steps=32,
                    output_root=tmp_path_factory.mktemp("out"))


def lstm_head_onnx(path: Path, steps: int, hidden: int, features: int = 16) -> Path:
    """An LSTM read by a Linear head, as torch's TorchScript exporter writes it (opset 13); input ``x``
    ``[1, steps, features]``."""

    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.fc = torch.nn.LSTM(features, hidden, batch_first=True), torch.nn.Linear(hidden, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.rnn(x)[0])

    torch.onnx.export(Head().eval(), (torch.randn(1, steps, features),), str(path), dynamo=False, opset_version=13,
                      input_names=["x"])
    return path


def initializers(model_path: Path) -> dict[str, object]:
    """{node name: (node, {input name: numpy initializer})} of an ONNX model."""
    model = onnx.load(str(model_path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    return {n.name: (n, [inits.get(x) for x in n.input]) for n in model.graph.node}


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One temporary Prefect API server (SQLite, loopback) for the whole test session."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect-results")
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}), prefect_test_harness(server_startup_timeout=120):
        yield


class Branchy(torch.nn.Module):
    """Three branches (1x1 conv, 3x3 conv + ReLU6, avg-pool + conv + LeakyReLU) joined by a Concat,
    a sigmoid gate (Mul, a host operator), max/global pooling and a linear head; 3x32x32 in."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU6())
        self.b3 = nn.Sequential(nn.AvgPool2d(3, 1, 1), nn.Conv2d(8, 8, 1), nn.LeakyReLU(0.1))
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = torch.cat([self.b1(x), self.b2(x), self.b3(x)], 1)
        return self.head(self.pool(y * torch.sigmoid(y)))


@pytest.fixture(scope="session")
def branchy_cnn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return export_onnx(Branchy(), tmp_path_factory.mktemp("models") / "branchy.onnx", SMALL_CNN_SHAPES)


@pytest.fixture(scope="session")
def branchy_result(branchy_cnn: Path, tmp_path_factory: pytest.TempPathFactory) -> QuantizationResult:
    return quantize(SMALL_CNN_SHAPES, "cpu", branchy_cnn, mapname="branchy", calib_steps=16,
                    output_root=tmp_path_factory.mktemp("out"))


@pytest.fixture(scope="session")
def trained_cnn() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """SmallCNN trained a few seconds on scikit-learn's digits: ``(model, test_images, test_labels)``."""
    from tests.trained_cnn import train_small_cnn

    return train_small_cnn(seed=0)


@pytest.fixture(scope="session")
def dask_cluster() -> Iterator[str]:
    """A 2-worker ``distributed.LocalCluster`` (one thread, own process each) on 127.0.0.1; yields its address."""
    from distributed import LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address=None)
    try:
        yield cluster.scheduler_address
    finally:
        cluster.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real S3-compatible server (``moto_server``) on 127.0.0.1 for the session; yields the AWS environment a
    client needs (endpoint, test credentials). The server is stopped at the end."""
    from tests.s3 import start_s3_server

    with start_s3_server(tmp_path_factory.mktemp("s3")) as env:
        yield env


@pytest.fixture
def s3_env(s3_server: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[dict[str, str]]:
    """This test's process talks to the session's S3 server (fresh clients: fsspec caches them by arguments),
    with its map mirror in the test's folder (not ~/.cache)."""
    import s3fs

    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MAPTOOLS_CACHE", str(tmp_path / "maptools-cache"))
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3_server
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def conv_maps(tmp_path_factory: pytest.TempPathFactory):
    """A 3x3 conv with 20 inputs and 40 outputs (its input is the signed graph input), and a depthwise one."""
    root = tmp_path_factory.mktemp("xbar")
    rng = np.random.default_rng(0)
    for name, group, cin in (("dense", 1, 20), ("depthwise", 16, 16)):
        cout = 40 if group == 1 else 16
        w = rng.standard_normal((cout, cin // group, 3, 3)).astype(np.float32)
        graph = helper.make_graph(
            [helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1], group=group),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["output"], name="head")],
            "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, cin, 8, 8])],
            [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 8, 8])],
            [numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(rng.standard_normal((4, cout, 1, 1)).astype(np.float32), "w2")])
        path = root / f"{name}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
        quantize({"input": [1, cin, 8, 8]}, "cpu", path, mapname=name, calib_steps=8, output_root=root,
                 profile="extended")  # the head reads an unsigned Relu output
        convert(name, output_root=root)
    return root
