"""Integer re-simulation of a quantized map: the reference a hardware simulator must match.

:class:`IntegerSimulator` runs an :class:`~maptools.conversion.OperatorGraph` with its attached
quantinfo, the integer weights of ``quantparams.pkl`` and the map's model (for operator
attributes and constants), without PPQ. By role (:mod:`maptools.placement`):

* crossbar (Conv, ConvTranspose, Gemm): integer weights times integer codes accumulate into int32
  with the int32 bias, then requantize to the output scale (:mod:`maptools.requant`); an output
  the placement keeps float is the accumulator times ``s_in * s_w``;
* Add of two activations: codes summed on a common scale; Concat: codes on the output scale;
  average pools: integer window sums requantized by ``1/count``;
* code movers (reshapes, slices, max pools, nearest resize): the codes move unchanged;
* lookup tables (activations, an Add/Mul/Div by a constant, gated activations ``x * f(x)``): the
  operator's function of the dequantized codes, quantized to the output scale: exactly a table
  indexed by the input codes;
* a tensor is requantized whenever its consumer's input scale differs from its producer's output
  scale;
* host operators run in float32 through onnxruntime, one node at a time
  (:class:`~maptools.node_runner.NodeRunner`), so every standard ONNX operator runs there.

:func:`simulate` is the step a user calls: it reads the map's verified artifacts and runs inputs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx
import onnx.shape_inference
import torch
import torch.nn.functional as F

from maptools.calibration import random_array
from maptools.conversion import DEVICE, OperatorGraph, graph_of
from maptools.maps.artifacts import QUANTPARAMS_NPZ, MapFolder, load_quantparams
from maptools.maps.roots import MapRef
from maptools.errors import ArtifactError, ConversionError, InputShapeError, SettingsError, SimulationError
from maptools.node_runner import NodeRunner
from maptools.placement import Role
from maptools.onnx_model import constant_values, explicit_outer_inputs, opsets
from maptools.quantinfo import QuantConfig, param_key
from maptools.requant import KERNELS, RequantMode, avgpool_args, quantize, requantize, window_counts


class ArraySpec(Protocol):
    """What :func:`simulate` takes as ``crossbar``: a spec that builds its simulator
    (:class:`maptools.crossbar.mapping.CrossbarSpec`)."""

    def simulator(self, graph: OperatorGraph, quantparams: Mapping[str, np.ndarray | None], *,
                  requant: RequantMode | str = ..., calibration: Mapping[str, np.ndarray] | None = ...
                  ) -> IntegerSimulator: ...

__all__ = ["ArraySpec", "QTensor", "IntegerSimulator", "SimulationRun", "SimulationResult", "simulate", "load_inputs"]

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


def pad_codes(codes: torch.Tensor, pads: list[int], value: float = 0.0) -> tuple[torch.Tensor, list[int]]:
    """Symmetric pads go to the op; asymmetric ones are applied first, as ``value`` (zero codes: a real 0)."""
    rank = len(pads) // 2
    begin, end = pads[:rank], pads[rank:]
    if begin == end:
        return codes, begin
    flat = [p for i in reversed(range(rank)) for p in (begin[i], end[i])]
    return F.pad(codes, flat, value=value), [0] * rank


def _float(value: Value) -> torch.Tensor:
    return value.dequantize() if isinstance(value, QTensor) else value


def batched_inputs(shapes: Mapping[str, Sequence[int]]) -> tuple[int, frozenset[str]]:
    """The batch the model was prepared for (axis 0 of its first input that has axes) and the inputs whose
    axis 0 is that batch; the others (a 0-d sample rate, an LSTM's ``[layers, N, hidden]`` state) are fed
    whole to every run."""
    batch = next((s[0] for s in shapes.values() if len(s)), 1)
    return max(1, batch), frozenset(name for name, s in shapes.items() if len(s) and s[0] == batch)


def _batch_major(model: onnx.ModelProto) -> bool:
    """True when every tensor's leading axis follows the batched inputs' (:func:`batched_inputs`; shape
    inference at batch 2x)."""
    def shapes(m: onnx.ModelProto) -> dict[str, list[int]] | None:
        try:
            g = onnx.shape_inference.infer_shapes(m, strict_mode=True).graph
        except Exception:  # noqa: BLE001  (does not infer at another batch: not batch-major)
            return None
        out = {}
        for vi in [*g.value_info, *g.output]:
            dims = vi.type.tensor_type.shape.dim
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
        return out

    inits = {i.name for i in model.graph.initializer}
    declared = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in model.graph.input
                if vi.name not in inits}
    _, batched = batched_inputs(declared)
    doubled = onnx.ModelProto.FromString(model.SerializeToString())
    del doubled.graph.value_info[:]
    for vi in doubled.graph.output:
        for d in vi.type.tensor_type.shape.dim:
            d.Clear()
    for vi in doubled.graph.input:
        if vi.name in batched:
            d = vi.type.tensor_type.shape.dim[0]
            d.dim_value = 2 * d.dim_value
    one, two = shapes(model), shapes(doubled)
    if one is None or two is None:
        return False
    return all(name in two and len(two[name]) == len(s) and s and two[name][0] == 2 * s[0] and two[name][1:] == s[1:]
               for name, s in one.items())


def _joined(parts: Sequence[np.ndarray], axis: int) -> np.ndarray:
    """Runs' arrays joined along ``axis``; 0-d ones (a score over every axis) stacked, one per run."""
    return np.stack(parts) if parts[0].ndim == 0 else np.concatenate(parts, axis=axis)


class IntegerSimulator:
    """Runs a quantized operator graph in integer arithmetic from quantinfo and quantparams.

    Args:
        graph: an operator graph with quantinfo attached (``convert(...)`` / ``read_graph``).
        quantparams: ``read_quantparams(mapname)``: integer weights and int32 biases.
        requant: ``'float'`` (float64 multiplier) or ``'fixed'`` (31-bit multiplier and shift).
        model: the graph's ONNX model; default the map's ``model.onnx`` (checked by sha256).

    Raises:
        ArtifactError: quantparams lack a weight, its shape differs from the model's, or the model is gone.
        ConversionError: the graph is not quantized.
    """

    def __init__(self, graph: OperatorGraph, quantparams: Mapping[str, np.ndarray | None], *,
                 requant: RequantMode | str = RequantMode.FLOAT, model: onnx.ModelProto | None = None) -> None:
        if not graph.meta.get("quantized"):
            raise ConversionError("the operator graph has no quantinfo attached.",
                                  "convert the map with quantization (convert(mapname), the default).")
        self.graph = graph
        try:
            self.mode = RequantMode(requant)
        except ValueError:
            raise SettingsError(f"requant={requant!r} is not a requantization mode.",
                                "use 'float' or 'fixed'.") from None
        model = explicit_outer_inputs(model if model is not None else graph.model())
        self.order = graph.operators()
        nodes = {n.name: n for n in model.graph.node}
        missing = [n for n in self.order if n not in nodes]
        if missing:
            raise ArtifactError(f"the model lacks operators of the graph: {', '.join(missing[:5])}.",
                                "re-run convert for this map.")
        self.constants = constant_values(model)
        self.nodes = {name: nodes[name] for name in self.order}
        self.runners = {name: NodeRunner(nodes[name], opsets(model), self.constants, model.functions)
                        for name in self.order}
        self.batch, self.batched = batched_inputs(graph.inputs)
        self.batch_major = _batch_major(model)
        self.weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for name in self.order:
            node = graph.node(name)
            if node["role"] == Role.CROSSBAR.value:  # (placement keeps forms without an integer kernel on the host)
                self.weights[name] = self._load_weights(name, node, quantparams)

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
        """Simulate a batch; ``keep`` also returns every quantized tensor's codes (int32) and scale.

        A model whose shapes do not follow the batch (a Reshape to a constant batch, a time axis first) runs
        in chunks of the batch it was prepared for; inputs without the batch axis go whole to every chunk.
        """
        types = self.graph.input_types
        arrays = {k: np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v, dtype=types.get(k, np.float32))
                  for k, v in inputs.items()}
        total = next((a.shape[0] for k, a in arrays.items() if k in self.batched), 1)
        if self.batch_major or total == self.batch:
            return self._run(arrays, keep)
        if total % self.batch:
            shapes = ", ".join(f"{k} {self.graph.inputs[k]}" for k in sorted(self.batched))
            raise InputShapeError(f"this model's shapes do not follow axis 0 of its inputs ({shapes}): it runs on "
                                  f"{self.batch} along that axis at a time, but {total} were given.",
                                  f"pass a multiple of {self.batch} along axis 0 (random inputs: leave batch unset).")
        runs = [self._run({k: v[i:i + self.batch] if k in self.batched else v for k, v in arrays.items()}, keep)
                for i in range(0, total, self.batch)]
        return SimulationRun({k: _joined([r.outputs[k] for r in runs], self.batch_axis(k)) for k in runs[0].outputs},
                             {k: _joined([r.codes[k] for r in runs], 0) for k in runs[0].codes}, runs[0].scales)

    def batch_axis(self, output: str) -> int:
        """The axis of a graph output that carries the batch: the first of the prepared batch's size
        (a recogniser's [T, N, classes] output has it second)."""
        shape = self.graph.outputs[output]
        return next((axis for axis, size in enumerate(shape) if size == self.batch), 0)

    def _run(self, inputs: Mapping[str, np.ndarray], keep: bool) -> SimulationRun:
        env: dict[str, Value] = {k: torch.from_numpy(v) for k, v in inputs.items()}
        codes: dict[str, np.ndarray] = {}
        scales: dict[str, float] = {}
        with torch.no_grad():
            for name in self.order:
                node = self.graph.node(name)
                outs = self.step(name, [env[t] for t in node["inputs"]])
                for tensor, out in zip(node["outputs"], outs):
                    env[tensor] = out
                    if keep and isinstance(out, QTensor):
                        codes[tensor] = out.codes.to(torch.int32).numpy()
                        scales[tensor] = out.scale
        outputs = {o: _float(env[o]).numpy() for o in self.graph.outputs}
        return SimulationRun(outputs, codes, scales)

    def step(self, name: str, values: list[Value]) -> list[Value]:
        """Run one operator on its activation inputs (codes on a scale, or float tensors); returns its outputs."""
        node = self.graph.node(name)
        if node["part"] != DEVICE:
            return self._generic(name, [_float(v) for v in values])
        cfg: QuantConfig = node["quant"]
        kernel = KERNELS.get((node["op_type"], node["role"]))
        gated = node["role"] == Role.LUT.value and not all(isinstance(v, QTensor) for v in values)
        if kernel is not None and not gated:  # a table fed by its gates' float output is computed as a table
            return [getattr(self, kernel)(name, node, cfg, values)]
        if node["role"] == Role.MOVE.value:
            return self._move(name, cfg, values)
        return self._lookup(name, cfg, values)

    # --- generic operators ---------------------------------------------------------------------------
    def _generic(self, name: str, values: list[torch.Tensor]) -> list[torch.Tensor]:
        """The operator's ONNX semantics in onnxruntime, its constants from the model."""
        acts = iter(values)
        feed = [None if not t or t in self.constants else next(acts).numpy() for t in self.nodes[name].input]
        return [torch.from_numpy(np.array(out)) for out in self.runners[name].run(feed)]

    def _move(self, name: str, cfg: QuantConfig, values: list[Value]) -> list[QTensor]:
        """Codes moved unchanged (run the operator on the codes themselves), then the output grid."""
        (x,) = self._inputs(cfg, values)
        outs = self._generic(name, [x.codes.to(torch.float32)])
        return [self._finish(QTensor(o.to(torch.float64), x.scale), cfg) for o in outs]

    def _lookup(self, name: str, cfg: QuantConfig, values: list[Value]) -> list[Value]:
        """A table over the input codes: the function of the dequantized inputs, on the output grid."""
        scales = list(cfg.input_scales)
        floats = []
        for i, v in enumerate(values):
            scale = scales[i] if i < len(scales) else None
            floats.append(_float(self._on_scale(v, scale, cfg.in_range(i), cfg, f"input{i}")) if scale is not None
                          else _float(v))
        outs = self._generic(name, floats)
        if cfg.output_scale is None:  # inside a gated activation: stays float
            return outs
        return [QTensor(quantize(outs[0], cfg.output_scale, *cfg.out_range), cfg.output_scale)]

    # --- helpers -------------------------------------------------------------------------------------
    def _requant(self, acc: torch.Tensor, multiplier: torch.Tensor | float, bounds: tuple[int, int],
                 cfg: QuantConfig | None = None, stage: str = "") -> torch.Tensor:
        """Requantize; in fixed mode with quantinfo's recorded ``(m0, shift)`` for ``stage`` where the map has them."""
        recorded = cfg.requant.get(stage) if cfg is not None else None
        return requantize(acc, multiplier, bounds[0], bounds[1], self.mode, recorded)

    def _on_scale(self, value: Value, scale: float | None, bounds: tuple[int, int], cfg: QuantConfig | None = None,
                  stage: str = "") -> QTensor:
        """``value`` as codes on ``scale`` within ``bounds`` (requantizing codes, or quantizing a float tensor)."""
        if isinstance(value, QTensor):
            if scale is None or value.scale == scale:
                return value
            return QTensor(self._requant(value.codes, value.scale / scale, bounds, cfg, stage), scale)
        if scale is None:
            raise SimulationError("a device operator receives a float tensor and has no input scale.",
                                  "quantize the model so every device operator's inputs are quantized.")
        return QTensor(quantize(value, scale, *bounds), scale)

    def _inputs(self, cfg: QuantConfig, values: list[Value]) -> list[QTensor]:
        scales = list(cfg.input_scales)
        return [self._on_scale(v, scales[i] if i < len(scales) else None, cfg.in_range(i), cfg, f"input{i}")
                for i, v in enumerate(values)]

    def _finish(self, x: QTensor, cfg: QuantConfig) -> QTensor:
        """Requantize to the operator's output scale where it differs from the input's."""
        if cfg.output_scale is None or cfg.output_scale == x.scale:
            return x
        return QTensor(self._requant(x.codes, x.scale / cfg.output_scale, cfg.out_range, cfg, "output"),
                       cfg.output_scale)

    def _output(self, acc: torch.Tensor, in_scale: torch.Tensor | float, cfg: QuantConfig) -> Value:
        """An accumulator on the grid ``in_scale`` requantized to the output scale (or float when it has none)."""
        if cfg.output_scale is None:
            return (acc * in_scale).to(torch.float32)
        return QTensor(self._requant(acc, in_scale / cfg.output_scale, cfg.out_range, cfg, "output"), cfg.output_scale)

    # --- integer kernels ---------------------------------------------------------------------------
    def _accumulate(self, name: str, acc: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if bias is not None:
            acc = acc + bias.reshape([1, -1] + [1] * (acc.dim() - 2))
        if acc.numel() and float(acc.abs().max()) >= 2 ** (ACC_BITS - 1):
            raise SimulationError(f"{name}: the accumulator overflows int{ACC_BITS}.",
                                  "use fewer weight/activation bits or a smaller reduction.")
        return acc

    def _weight_scale(self, cfg: QuantConfig, dims: int) -> torch.Tensor:
        return torch.from_numpy(cfg.weight_scale.astype(np.float64)).reshape([1, -1] + [1] * (dims - 2))

    def _conv(self, name: str, node: Mapping[str, Any], cfg: QuantConfig, values: list[Value]) -> Value:
        (x,) = self._inputs(cfg, values)
        weight, bias = self.weights[name]
        a = node["attrs"]
        codes, padding = pad_codes(x.codes, a["pads"])
        conv = getattr(F, f"conv{len(a['strides'])}d")
        acc = self._accumulate(name, conv(codes, weight, None, a["strides"], padding, a["dilations"], a["groups"]),
                               bias)
        return self._output(acc, x.scale * self._weight_scale(cfg, acc.dim()), cfg)

    def _conv_transpose(self, name: str, node: Mapping[str, Any], cfg: QuantConfig, values: list[Value]) -> Value:
        (x,) = self._inputs(cfg, values)
        weight, bias = self.weights[name]
        a = node["attrs"]
        rank = len(a["strides"])
        deconv = getattr(F, f"conv_transpose{rank}d")
        acc = deconv(x.codes, weight, None, a["strides"], 0, a["output_padding"], a["groups"], a["dilations"])
        begin, end = a["pads"][:rank], a["pads"][rank:]
        acc = acc[(slice(None), slice(None), *(slice(b, acc.shape[2 + i] - e) for i, (b, e) in
                                               enumerate(zip(begin, end))))]
        acc = self._accumulate(name, acc, bias)
        return self._output(acc, x.scale * self._weight_scale(cfg, acc.dim()), cfg)

    def _gemm(self, name: str, node: Mapping[str, Any], cfg: QuantConfig, values: list[Value]) -> Value:
        (x,) = self._inputs(cfg, values)
        weight, bias = self.weights[name]  # [out, in]
        acc = self._accumulate(name, x.codes @ weight.T, bias)
        w_scale = torch.from_numpy(cfg.weight_scale.astype(np.float64)).reshape(1, -1)
        return self._output(acc, node["attrs"]["alpha"] * x.scale * w_scale, cfg)

    def _add(self, name: str, node: Mapping[str, Any], cfg: QuantConfig, values: list[Value]) -> QTensor:
        a, b = self._inputs(cfg, values)
        b = self._on_scale(b, a.scale, cfg.in_range(0), cfg, "align1")  # PPQ aligns Add inputs: rarely acts
        codes = a.codes - b.codes if node["op_type"] == "Sub" else a.codes + b.codes
        return QTensor(self._requant(codes, a.scale / cfg.output_scale, cfg.out_range, cfg, "output"), cfg.output_scale)

    def _concat(self, name: str, node: Mapping[str, Any], cfg: QuantConfig, values: list[Value]) -> QTensor:
        parts = [self._on_scale(x, cfg.output_scale, cfg.out_range, cfg, f"concat{i}").codes
                 for i, x in enumerate(self._inputs(cfg, values))]
        return QTensor(torch.cat(parts, dim=node["attrs"]["axis"]), cfg.output_scale)

    def _relu(self, name: str, node: Mapping[str, Any], cfg: QuantConfig, values: list[Value]) -> QTensor:
        (x,) = self._inputs(cfg, values)
        return self._finish(QTensor(torch.clamp(x.codes, min=0), x.scale), cfg)

    def _maxpool(self, name: str, node: Mapping[str, Any], cfg: QuantConfig, values: list[Value]) -> QTensor:
        (x,) = self._inputs(cfg, values)
        a = node["attrs"]
        lowest = float(cfg.in_range(0)[0])  # a max pool pads with what never wins (Keras 'same': pads [0, 0, 1, 1])
        codes, padding = pad_codes(x.codes, a["pads"], lowest)
        if any(p > k // 2 for p, k in zip(padding, a["kernel"])):  # torch's limit
            flat = [p for i in reversed(range(len(padding))) for p in (padding[i], padding[i])]
            codes, padding = F.pad(codes, flat, value=lowest), [0] * len(padding)
        pool = getattr(F, f"max_pool{len(a['kernel'])}d")
        out = pool(codes, a["kernel"], a["strides"], padding, a["dilations"], ceil_mode=bool(a["ceil_mode"]))
        return self._finish(QTensor(out, x.scale), cfg)

    def _avgpool(self, name: str, node: Mapping[str, Any], cfg: QuantConfig, values: list[Value]) -> QTensor:
        (x,) = self._inputs(cfg, values)
        args = avgpool_args(name, node["attrs"])
        sums = F.avg_pool2d(x.codes, divisor_override=1, **args)
        counts = window_counts(list(x.codes.shape[2:]), args)
        if self.mode is RequantMode.FLOAT or not cfg.requant:
            return QTensor(self._requant(sums, x.scale / (cfg.output_scale * counts), cfg.out_range), cfg.output_scale)
        out = torch.empty_like(sums)
        for count in torch.unique(counts).tolist():  # one recorded multiplier per window size
            where = (counts == count).expand_as(sums)
            out[where] = self._requant(sums[where], x.scale / (cfg.output_scale * count), cfg.out_range, cfg,
                                       f"output/{int(count)}")
        return QTensor(out, cfg.output_scale)

    def _global_avgpool(self, name: str, node: Mapping[str, Any], cfg: QuantConfig, values: list[Value]) -> QTensor:
        (x,) = self._inputs(cfg, values)
        sums = x.codes.sum(dim=tuple(range(2, x.codes.dim())), keepdim=True)
        count = math.prod(x.codes.shape[2:])
        return QTensor(self._requant(sums, x.scale / (cfg.output_scale * count), cfg.out_range, cfg, "output"),
                       cfg.output_scale)


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


#: What :func:`load_inputs` takes: ``'random'``, an .npy/.npz path, ``{input name: array}``, or one input's array.
Inputs = str | Path | Mapping[str, Any] | np.ndarray | torch.Tensor | None


def load_inputs(graph: OperatorGraph, source: Inputs = "random", *, seed: int = 0,
                batch: int | None = None) -> dict[str, np.ndarray]:
    """Inputs for ``graph``: ``'random'`` (seeded normal; integer inputs as random calibration makes them), an
    ``.npy`` (one input) or ``.npz`` file, a dict, or one array (a model of one input); each in its input's dtype
    (float32 unless the model declares another).

    Every input must match the model's shape except for the batch axis; values must be finite.
    """
    types = graph.input_types
    _, batched = batched_inputs(graph.inputs)
    if source is None or (isinstance(source, str) and source == "random"):
        rng = np.random.default_rng(seed)
        limits = graph.input_limits
        return {k: random_array(rng, [batch or s[0], *s[1:]] if k in batched else s, types[k], limits.get(k))
                for k, s in graph.inputs.items()}
    if isinstance(source, np.ndarray | torch.Tensor):  # the one input's array
        if len(graph.inputs) != 1:
            raise InputShapeError(f"one array given, but the model has inputs {sorted(graph.inputs)}.",
                                  "pass a dict with one array per input name.")
        source = {next(iter(graph.inputs)): source}
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
        numeric = np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_ == types[name]
        whole = name not in batched and list(array.shape) != want
        if array.ndim != len(want) or list(array.shape[1:]) != want[1:] or whole or not numeric:
            taken = want if name not in batched else f"[N, {', '.join(map(str, want[1:]))}]"
            raise InputShapeError(f"input {name!r} has shape {list(array.shape)} ({array.dtype}); the model takes "
                                  f"{taken} {types[name]} values.", "reshape the data to match.")
        if name in batched and array.shape[0] == 0:
            raise InputShapeError(f"input {name!r} holds no samples (shape {list(array.shape)}).",
                                  "pass at least one sample.")
        array = array.astype(types[name])
        if not np.all(np.isfinite(array)):
            raise InputShapeError(f"input {name!r} contains NaN or inf.", "clean the data.")
        out[name] = array
    return out


def simulate(mapname: str | MapRef, inputs: Inputs = "random", *,
             output_root: str | Path | None = None, requant: RequantMode | str = RequantMode.FLOAT,
             seed: int = 0, batch: int | None = None, crossbar: ArraySpec | None = None,
             calibration: Inputs | None = None) -> SimulationResult:
    """Run a converted map's integer re-simulation on ``inputs`` (see :func:`load_inputs`).

    Reads ``operator_graph.json`` (written by ``convert``) and ``quantparams.pkl``, both checked
    against the map's manifest. With ``crossbar`` (a :class:`maptools.crossbar.mapping.CrossbarSpec`), every
    crossbar operator computes through its arrays (:class:`maptools.crossbar.mapping.CrossbarSimulator`); a
    ``max`` or ``calibrated`` ADC range is fitted to ``calibration`` (inputs as ``inputs`` takes them; default
    seeded random ones).

    Raises:
        ArtifactError: missing artifacts, artifacts changed since conversion, or from another model.
        InputShapeError: inputs that do not fit the model.
    """
    if calibration is not None and crossbar is None:
        raise SettingsError("calibration= fits a crossbar's ADC range: it applies with crossbar= only.",
                            "pass crossbar=CrossbarSpec(..., adc_range='calibrated'), or drop calibration.")
    version = MapFolder(mapname, output_root).open()  # one version for every file read
    mapname = version.mapname
    graph = graph_of(version)
    params = load_quantparams(version.existing(QUANTPARAMS_NPZ))
    simulator = IntegerSimulator(graph, params, requant=requant) if crossbar is None else \
        crossbar.simulator(graph, params, requant=requant,
                           calibration=None if calibration is None else load_inputs(graph, calibration))
    feed = load_inputs(graph, inputs, seed=seed, batch=batch)
    started = time.perf_counter()
    run = simulator.run(feed)
    return SimulationResult(mapname=mapname, outputs=run.outputs,
                            batch=next((int(v.shape[0]) for k, v in feed.items() if k in simulator.batched), 1),
                            requant=simulator.mode, seconds=time.perf_counter() - started)
