"""Integer re-simulation of a quantized map: the reference a hardware simulator must match.

:class:`IntegerSimulator` runs an :class:`~maptools.conversion.OperatorGraph` with its attached
quantinfo and the integer weights of ``quantparams.pkl`` only (no PPQ):

* device operators compute on integer codes in the io range: Conv/Gemm accumulate integer
  weights times codes into int32 with the int32 bias, then requantize to their output scale
  (:mod:`maptools.requant`); Add sums codes on a common scale; MaxPool, Relu and Flatten keep the
  grid; average pools sum codes and requantize by ``1/count``; other activations are a lookup
  table over the codes; a tensor is requantized whenever its consumer's input scale differs from
  its producer's output scale;
* host operators compute in float32, quantizing inputs and outputs where quantinfo says so.

:func:`simulate` is the step a user calls: it reads the map's verified artifacts and runs inputs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from maptools.artifacts import read_quantparams
from maptools.conversion import DEVICE, OperatorGraph, read_graph
from maptools.errors import ArtifactError, ConversionError, InputShapeError, SettingsError
from maptools.quantinfo import QuantConfig, param_key
from maptools.requant import RequantMode, quantize, requantize

__all__ = ["QTensor", "IntegerSimulator", "SimulationRun", "SimulationResult", "simulate", "load_inputs"]

ACC_BITS = 32


@dataclass(frozen=True)
class QTensor:
    """Integer codes (float64 tensor holding integers) on the grid ``scale``."""

    codes: torch.Tensor
    scale: float

    def dequantize(self) -> torch.Tensor:
        return (self.codes * self.scale).to(torch.float32)


Value = QTensor | torch.Tensor


@dataclass(frozen=True)
class SimulationRun:
    """Graph outputs (float, dequantized) and, when kept, every quantized tensor's codes and scale."""

    outputs: dict[str, np.ndarray]
    codes: dict[str, np.ndarray] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)


def _spatial(node: Mapping[str, Any]) -> tuple[list[int], list[int], list[int], list[int]]:
    a = node["attrs"]
    return a["kernel"], a["strides"], a["dilations"], a["pads"]


def _padding(codes: torch.Tensor, pads: list[int]) -> tuple[torch.Tensor, list[int]]:
    """Symmetric pads go to the op; asymmetric ones are applied as zero codes (a real 0) first."""
    rank = len(pads) // 2
    begin, end = pads[:rank], pads[rank:]
    if begin == end:
        return codes, begin
    flat = [p for i in reversed(range(rank)) for p in (begin[i], end[i])]
    return F.pad(codes, flat), [0] * rank


class IntegerSimulator:
    """Runs a quantized operator graph in integer arithmetic from quantinfo and quantparams alone.

    Args:
        graph: an operator graph with quantinfo attached (``convert(...)`` / ``read_graph``).
        quantparams: ``read_quantparams(mapname)``: integer weights and int32 biases.
        requant: ``'float'`` (float64 multiplier) or ``'fixed'`` (31-bit multiplier and shift).

    Raises:
        ArtifactError: quantparams lack a weight, or its shape differs from the model's.
        ConversionError: the graph is not quantized, or a device operator has no integer kernel.
    """

    def __init__(self, graph: OperatorGraph, quantparams: Mapping[str, np.ndarray | None], *,
                 requant: RequantMode | str = RequantMode.FLOAT) -> None:
        if not graph.meta.get("quantized"):
            raise ConversionError("the operator graph has no quantinfo attached.",
                                  "convert the map with quantization (convert(mapname), the default).")
        self.graph = graph
        try:
            self.mode = RequantMode(requant)
        except ValueError:
            raise SettingsError(f"requant={requant!r} is not a requantization mode.",
                                "use 'float' or 'fixed'.") from None
        self.order = graph.operators()
        self.weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        problems = []
        for name in self.order:
            node = graph.node(name)
            kernels = _DEVICE_KERNELS if node["part"] == DEVICE else _HOST_OPS
            if node["op_type"] not in kernels:
                problems.append(f"{name} ({node['op_type']} on the {node['part']})")
            elif node["op_type"] == "Gemm" and node["attrs"]["bias"] and node["attrs"]["beta"] != 1.0:
                problems.append(f"{name} (Gemm with beta={node['attrs']['beta']})")
            if node["op_type"] in ("Conv", "Gemm"):
                self.weights[name] = self._load_weights(name, node, quantparams)
        if problems:
            raise ConversionError(f"maptools cannot simulate these operators where they are placed: "
                                  f"{', '.join(problems)}.",
                                  "change the placement rule (maptools.conversion.DEVICE_OP_TYPES) so these "
                                  "operators run where maptools can simulate them.")

    @staticmethod
    def _load_weights(name: str, node: Mapping[str, Any], params: Mapping[str, np.ndarray | None]
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        wkey, bkey = param_key(name, node["op_type"], "weight"), param_key(name, node["op_type"], "bias")
        if wkey not in params or bkey not in params:
            raise ArtifactError(f"quantparams has no {wkey!r}/{bkey!r}.",
                                "the quantparams come from another model: re-run quantize on this model.")
        weight, bias = params[wkey], params[bkey]
        want = next(iter(node["params"].values()))
        if weight is None or list(weight.shape) != want or (bias is None) == node["attrs"]["bias"]:
            raise ArtifactError(f"quantparams {wkey!r} has shape {None if weight is None else list(weight.shape)} "
                                f"(bias {'missing' if bias is None else 'present'}); the model's weight is {want}.",
                                "the quantparams come from another model: re-run quantize on this model.")
        if node["op_type"] == "Gemm" and not node["attrs"]["transB"]:
            weight = weight.T
        return (torch.from_numpy(np.ascontiguousarray(weight)).to(torch.float64),
                None if bias is None else torch.from_numpy(bias.astype(np.float64)))

    # --- running ---------------------------------------------------------------------------------
    def run(self, inputs: Mapping[str, np.ndarray | torch.Tensor], *, keep: bool = False) -> SimulationRun:
        """Simulate a batch; ``keep`` also returns every quantized tensor's codes (int32) and scale."""
        env: dict[str, Value] = {k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in inputs.items()}
        codes: dict[str, np.ndarray] = {}
        scales: dict[str, float] = {}
        with torch.no_grad():
            for name in self.order:
                node = self.graph.node(name)
                out = self.step(name, [env[t] for t in node["inputs"]])
                env[node["outputs"][0]] = out
                if keep and isinstance(out, QTensor):
                    codes[node["outputs"][0]] = out.codes.to(torch.int32).numpy()
                    scales[node["outputs"][0]] = out.scale
        outputs = {o: (env[o].dequantize() if isinstance(env[o], QTensor) else env[o]).numpy()
                   for o in self.graph.outputs}
        return SimulationRun(outputs, codes, scales)

    def step(self, name: str, values: list[Value]) -> Value:
        """Run one operator on its input values (codes on a scale, or float tensors)."""
        node = self.graph.node(name)
        if node["part"] == DEVICE:
            return _DEVICE_KERNELS[node["op_type"]](self, name, node, node["quant"], values)
        return self._host(node, values)

    def _requant(self, acc: torch.Tensor, multiplier: torch.Tensor | float, cfg: QuantConfig) -> torch.Tensor:
        return requantize(acc, multiplier, cfg.io_min, cfg.io_max, self.mode)

    def _on_scale(self, value: Value, scale: float | None, cfg: QuantConfig | None) -> QTensor:
        """``value`` as codes on ``scale`` (requantizing codes, or quantizing a float tensor)."""
        if isinstance(value, QTensor):
            if scale is None or value.scale == scale:
                return value
            return QTensor(self._requant(value.codes, value.scale / scale, cfg), scale)
        if scale is None or cfg is None:
            raise ConversionError("a device operator receives a float tensor and has no input scale.",
                                  "quantize the model so every device operator's inputs are quantized.")
        return QTensor(quantize(value, scale, cfg.io_min, cfg.io_max), scale)

    def _inputs(self, cfg: QuantConfig | None, values: list[Value]) -> list[QTensor]:
        scales = list(cfg.input_scales) if cfg is not None else []
        return [self._on_scale(v, scales[i] if i < len(scales) else None, cfg) for i, v in enumerate(values)]

    def _finish(self, x: QTensor, cfg: QuantConfig | None) -> QTensor:
        """Requantize to the operator's output scale where it differs from the input's."""
        if cfg is None or cfg.output_scale is None or cfg.output_scale == x.scale:
            return x
        return QTensor(self._requant(x.codes, x.scale / cfg.output_scale, cfg), cfg.output_scale)

    def _host(self, node: Mapping[str, Any], values: list[Value]) -> Value:
        cfg: QuantConfig | None = node["quant"]
        scales = list(cfg.input_scales) if cfg is not None else []
        floats = []
        for i, v in enumerate(values):
            x = v.dequantize() if isinstance(v, QTensor) else v
            if i < len(scales) and scales[i] is not None:
                x = QTensor(quantize(x, scales[i], cfg.io_min, cfg.io_max), scales[i]).dequantize()
            floats.append(x)
        y = _HOST_OPS[node["op_type"]](node, _operands(node, floats))
        if cfg is not None and cfg.output_scale is not None:
            return QTensor(quantize(y, cfg.output_scale, cfg.io_min, cfg.io_max), cfg.output_scale)
        return y

    # --- integer kernels ---------------------------------------------------------------------------
    def _accumulate(self, name: str, acc: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if bias is not None:
            acc = acc + bias.reshape([1, -1] + [1] * (acc.dim() - 2))
        if acc.numel() and float(acc.abs().max()) >= 2 ** (ACC_BITS - 1):
            raise ConversionError(f"{name}: the accumulator overflows int{ACC_BITS}.",
                                  "use fewer weight/activation bits or a smaller reduction.")
        return acc

    def _conv(self, name: str, node: Mapping[str, Any], cfg: QuantConfig, values: list[Value]) -> QTensor:
        (x,) = self._inputs(cfg, values)
        weight, bias = self.weights[name]
        _, strides, dilations, pads = _spatial(node)
        codes, padding = _padding(x.codes, pads)
        conv = getattr(F, f"conv{len(strides)}d")
        acc = conv(codes, weight, None, strides, padding, dilations, node["attrs"]["groups"])
        acc = self._accumulate(name, acc, bias)
        w_scale = torch.from_numpy(cfg.weight_scale.astype(np.float64)).reshape([1, -1] + [1] * (acc.dim() - 2))
        return QTensor(self._requant(acc, x.scale * w_scale / cfg.output_scale, cfg), cfg.output_scale)

    def _gemm(self, name: str, node: Mapping[str, Any], cfg: QuantConfig, values: list[Value]) -> QTensor:
        (x,) = self._inputs(cfg, values)
        weight, bias = self.weights[name]  # [out, in]
        acc = self._accumulate(name, x.codes @ weight.T, bias)
        alpha = node["attrs"]["alpha"]
        w_scale = torch.from_numpy(cfg.weight_scale.astype(np.float64)).reshape(1, -1)
        return QTensor(self._requant(acc, alpha * x.scale * w_scale / cfg.output_scale, cfg), cfg.output_scale)

    def _add(self, name: str, node: Mapping[str, Any], cfg: QuantConfig, values: list[Value]) -> QTensor:
        a, b = self._inputs(cfg, values)
        b = self._on_scale(b, a.scale, cfg)  # PPQ aligns Add inputs; this only acts if quantinfo does not
        return QTensor(self._requant(a.codes + b.codes, a.scale / cfg.output_scale, cfg), cfg.output_scale)

    def _concat(self, name: str, node: Mapping[str, Any], cfg: QuantConfig, values: list[Value]) -> QTensor:
        parts = [self._on_scale(x, cfg.output_scale, cfg).codes for x in self._inputs(cfg, values)]
        return QTensor(torch.cat(parts, dim=node["attrs"]["axis"]), cfg.output_scale)

    def _relu(self, name: str, node: Mapping[str, Any], cfg: QuantConfig | None, values: list[Value]) -> QTensor:
        (x,) = self._inputs(cfg, values)
        return self._finish(QTensor(torch.clamp(x.codes, min=0), x.scale), cfg)

    def _lookup(self, name: str, node: Mapping[str, Any], cfg: QuantConfig, values: list[Value]) -> QTensor:
        (x,) = self._inputs(cfg, values)
        table = torch.arange(cfg.io_min, cfg.io_max + 1, dtype=torch.float64)
        real = _HOST_OPS[node["op_type"]](node, [QTensor(table, x.scale).dequantize()])
        lut = quantize(real, cfg.output_scale, cfg.io_min, cfg.io_max)
        return QTensor(lut[(x.codes - cfg.io_min).long()], cfg.output_scale)

    def _maxpool(self, name: str, node: Mapping[str, Any], cfg: QuantConfig | None, values: list[Value]) -> QTensor:
        (x,) = self._inputs(cfg, values)
        kernel, strides, dilations, pads = _spatial(node)
        codes, padding = _padding(x.codes, pads)
        pool = getattr(F, f"max_pool{len(kernel)}d")
        out = pool(codes, kernel, strides, padding, dilations, ceil_mode=bool(node["attrs"]["ceil_mode"]))
        return self._finish(QTensor(out, x.scale), cfg)

    def _avgpool(self, name: str, node: Mapping[str, Any], cfg: QuantConfig, values: list[Value]) -> QTensor:
        (x,) = self._inputs(cfg, values)
        kernel, strides, dilations, pads = _spatial(node)
        if len(kernel) != 2 or any(d != 1 for d in dilations) or pads[:2] != pads[2:]:
            raise ConversionError(f"{name}: only 2-D AveragePool without dilation and with symmetric pads is "
                                  "supported.", "re-export the model with a plain 2-D average pool.")
        args = dict(kernel_size=kernel, stride=strides, padding=pads[:2], ceil_mode=bool(node["attrs"]["ceil_mode"]),
                    count_include_pad=bool(node["attrs"]["count_include_pad"]))
        sums = F.avg_pool2d(x.codes, divisor_override=1, **args)
        ones = torch.ones_like(x.codes[:1, :1])
        counts = torch.round(F.avg_pool2d(ones, divisor_override=1, **args) / F.avg_pool2d(ones, **args))
        return QTensor(self._requant(sums, x.scale / (cfg.output_scale * counts), cfg), cfg.output_scale)

    def _global_avgpool(self, name: str, node: Mapping[str, Any], cfg: QuantConfig, values: list[Value]) -> QTensor:
        (x,) = self._inputs(cfg, values)
        sums = x.codes.sum(dim=tuple(range(2, x.codes.dim())), keepdim=True)
        count = math.prod(x.codes.shape[2:])
        return QTensor(self._requant(sums, x.scale / (cfg.output_scale * count), cfg), cfg.output_scale)

    def _flatten(self, name: str, node: Mapping[str, Any], cfg: QuantConfig | None, values: list[Value]) -> QTensor:
        (x,) = self._inputs(cfg, values)
        return self._finish(QTensor(_flatten_2d(x.codes, node["attrs"]["axis"]), x.scale), cfg)


Kernel = Callable[[IntegerSimulator, str, Mapping[str, Any], Any, list[Value]], QTensor]
_DEVICE_KERNELS: dict[str, Kernel] = {
    "Conv": IntegerSimulator._conv, "Gemm": IntegerSimulator._gemm, "Add": IntegerSimulator._add,
    "Concat": IntegerSimulator._concat, "Relu": IntegerSimulator._relu, "MaxPool": IntegerSimulator._maxpool,
    "AveragePool": IntegerSimulator._avgpool, "GlobalAveragePool": IntegerSimulator._global_avgpool,
    "Flatten": IntegerSimulator._flatten,
    **{op: IntegerSimulator._lookup for op in ("LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "Tanh")},
}


# --- float operators (the host part, and the functions behind activation lookup tables) ------------

def _operands(node: Mapping[str, Any], values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Activation inputs and inline constants back in ONNX input order."""
    constants = node["constants"]
    acts = iter(values)
    return [torch.tensor(constants[str(i)], dtype=torch.float32) if str(i) in constants else next(acts)
            for i in range(len(values) + len(constants))]


def _flatten_2d(x: torch.Tensor, axis: int) -> torch.Tensor:
    axis = axis if axis >= 0 else axis + x.dim()
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _reshape(node: Mapping[str, Any], ops: list[torch.Tensor]) -> torch.Tensor:
    x, shape = ops[0], [int(s) for s in ops[1].tolist()]
    return x.reshape([x.shape[i] if s == 0 else s for i, s in enumerate(shape)])


def _window(node: Mapping[str, Any], ops: list[torch.Tensor], kind: str) -> torch.Tensor:
    kernel, strides, dilations, pads = _spatial(node)
    x, padding = _padding(ops[0], pads)
    if kind == "max":
        return F.max_pool2d(x, kernel, strides, padding, dilations, ceil_mode=bool(node["attrs"]["ceil_mode"]))
    return F.avg_pool2d(x, kernel, strides, padding, ceil_mode=bool(node["attrs"]["ceil_mode"]),
                        count_include_pad=bool(node["attrs"]["count_include_pad"]))


FloatOp = Callable[[Mapping[str, Any], list[torch.Tensor]], torch.Tensor]
_HOST_OPS: dict[str, FloatOp] = {
    "Relu": lambda n, o: torch.relu(o[0]),
    "LeakyRelu": lambda n, o: F.leaky_relu(o[0], n["attrs"]["alpha"]),
    "Clip": lambda n, o: torch.clamp(o[0], n["attrs"]["min"], n["attrs"]["max"]),
    "Sigmoid": lambda n, o: torch.sigmoid(o[0]),
    "HardSigmoid": lambda n, o: torch.clamp(n["attrs"]["alpha"] * o[0] + n["attrs"]["beta"], 0, 1),
    "Tanh": lambda n, o: torch.tanh(o[0]),
    "Add": lambda n, o: o[0] + o[1],
    "Mul": lambda n, o: o[0] * o[1],
    "MatMul": lambda n, o: o[0] @ o[1],
    "Concat": lambda n, o: torch.cat(o, dim=n["attrs"]["axis"]),
    "MaxPool": lambda n, o: _window(n, o, "max"),
    "AveragePool": lambda n, o: _window(n, o, "avg"),
    "GlobalAveragePool": lambda n, o: o[0].mean(dim=tuple(range(2, o[0].dim())), keepdim=True),
    "Flatten": lambda n, o: _flatten_2d(o[0], n["attrs"]["axis"]),
    "Reshape": _reshape,
    "Transpose": lambda n, o: o[0].permute(n["attrs"]["perm"]),
    "Softmax": lambda n, o: torch.softmax(o[0], dim=n["attrs"]["axis"]),
    "Identity": lambda n, o: o[0],
}


# --- the simulation step ------------------------------------------------------------------------------

@dataclass(frozen=True)
class SimulationResult:
    """Outputs of ``simulate`` (float, dequantized from the integer codes) and how long it took."""

    mapname: str
    outputs: dict[str, np.ndarray]
    batch: int
    requant: RequantMode
    seconds: float

    @property
    def seconds_per_sample(self) -> float:
        return self.seconds / max(self.batch, 1)

    def to_json(self) -> dict[str, Any]:
        return {"mapname": self.mapname, "batch": self.batch, "requant": self.requant.value, "seconds": self.seconds,
                "outputs": {k: {"shape": list(v.shape), "argmax": v.reshape(v.shape[0], -1).argmax(1).tolist()}
                            for k, v in self.outputs.items()}}


def load_inputs(graph: OperatorGraph, source: str | Path | Mapping[str, Any] | None = "random", *,
                seed: int = 0, batch: int | None = None) -> dict[str, np.ndarray]:
    """Inputs for ``graph``: ``'random'`` (seeded normal), an ``.npy`` (one input) or ``.npz`` file, or a dict.

    Every input must match the model's shape except for the batch axis; values must be finite.
    """
    if source is None or (isinstance(source, str) and source == "random"):
        rng = np.random.default_rng(seed)
        return {k: rng.standard_normal([batch or s[0], *s[1:]], dtype=np.float32) for k, s in graph.inputs.items()}
    if not isinstance(source, Mapping):
        path = Path(source)
        if not path.is_file():
            raise InputShapeError(f"input file {path} does not exist.", "pass an .npy/.npz file or 'random'.")
        try:
            loaded = np.load(path, allow_pickle=False)
            source = dict(loaded) if isinstance(loaded, np.lib.npyio.NpzFile) else {"": loaded}
        except Exception as e:
            raise InputShapeError(f"{path} is not a readable .npy/.npz file ({e}).", "save it with numpy.save "
                                  "(one input) or numpy.savez(name=array, ...).") from e
        if "" in source:
            if len(graph.inputs) != 1:
                raise InputShapeError(f"{path} holds one array but the model has inputs {sorted(graph.inputs)}.",
                                      "save an .npz with one array per input name.")
            source = {next(iter(graph.inputs)): source[""]}
    if set(source) != set(graph.inputs):
        raise InputShapeError(f"inputs {sorted(source)} do not match the model's inputs {sorted(graph.inputs)}.",
                              "key each array by its model input name.")
    out = {}
    for name, value in source.items():
        array = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
        want = graph.inputs[name]
        if array.ndim != len(want) or list(array.shape[1:]) != want[1:] or not np.issubdtype(array.dtype, np.number):
            raise InputShapeError(f"input {name!r} has shape {list(array.shape)} ({array.dtype}); the model takes "
                                  f"[N, {', '.join(map(str, want[1:]))}] numbers.", "reshape the data to match.")
        array = array.astype(np.float32)
        if not np.all(np.isfinite(array)):
            raise InputShapeError(f"input {name!r} contains NaN or inf.", "clean the data.")
        out[name] = array
    return out


def simulate(mapname: str, inputs: str | Path | Mapping[str, Any] | None = "random", *,
             output_root: str | Path | None = None, requant: RequantMode | str = RequantMode.FLOAT,
             seed: int = 0, batch: int | None = None) -> SimulationResult:
    """Run a converted map's integer re-simulation on ``inputs`` (see :func:`load_inputs`).

    Reads ``operator_graph.json`` (written by ``convert``) and ``quantparams.pkl``, both checked
    against the map's manifest.

    Raises:
        ArtifactError: missing artifacts, artifacts changed since conversion, or from another model.
        InputShapeError: inputs that do not fit the model.
    """
    graph = read_graph(mapname, output_root)
    simulator = IntegerSimulator(graph, read_quantparams(mapname, output_root), requant=requant)
    feed = load_inputs(graph, inputs, seed=seed, batch=batch)
    started = time.perf_counter()
    run = simulator.run(feed)
    return SimulationResult(mapname=mapname, outputs=run.outputs, batch=int(next(iter(feed.values())).shape[0]),
                            requant=simulator.mode, seconds=time.perf_counter() - started)
