"""Per-layer mixed precision under a budget: what ``quantize(..., bit_width='auto', budget=...)`` runs.

1. Sensitivity, on the float model in onnxruntime (one session for every variant): for each
   crossbar layer and each candidate width, the output error (each output's relative L2, averaged over the
   outputs: :func:`~maptools.metrics.mean_output_error`) when only
   that layer's weights (per channel, as PPQ quantizes them), or only the input it reads, are
   quantized at that width. Measured on the first calibration samples.
2. Choice: noise powers add, so the predicted error of an assignment is
   ``sqrt(e_uniform^2 + sum of each layer's extra error^2)``. Greedy: from every layer at the widest
   choice, repeatedly take the one-step narrowing (a layer's weights or its input) that costs the
   least predicted error per bit saved, while the budget holds. Bits are weighted by what they
   cost: weight bits by the layer's parameters (memory, crossbar cells), input bits by its
   multiply-accumulates (bit-serial input cycles).
3. Check: the choice is quantized by PPQ and its output error measured on the same samples; over
   an error budget, the target is tightened and the choice redone (at most :data:`ROUNDS` times),
   else every layer keeps the widest choice (a note says so).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper

from maptools.errors import BudgetError, SettingsError
from maptools.metrics import mean_output_error
from maptools.onnx_model import ort_session
from maptools.placement import CROSSBAR_OP_TYPES, Role, place
from maptools.settings import QuantSettings, ScalePolicy

log = logging.getLogger(__name__)

__all__ = ["Budget", "LayerChoice", "MixedPrecisionReport", "BudgetError", "measure_sensitivity", "choose",
           "search", "crossbar_layers", "WEIGHT_CHOICES", "INPUT_CHOICES", "SENSITIVITY_SAMPLES"]

WEIGHT_CHOICES = (2, 4, 6, 8)
INPUT_CHOICES = (4, 6, 8)
#: calibration samples the sensitivity and the measured error use
SENSITIVITY_SAMPLES = 8
#: quantize-and-measure rounds before falling back to uniform widths
ROUNDS = 3


@dataclass(frozen=True)
class Budget:
    """What ``bit_width='auto'`` must meet: a maximum output error, or a maximum weight memory.

    Attributes:
        output_error: largest error of the quantized model's outputs against the float model on the calibration
            samples (e.g. 0.05): each output's relative L2, averaged over the outputs, as ``algorithm='auto'``
            weighs them (:func:`~maptools.metrics.mean_output_error`).
        weight_bytes: largest weight memory: weights packed at their widths plus int32 biases (as
            :func:`maptools.evaluation.weight_memory_bytes` counts it).
        error_ratio: largest output error as a multiple of the error with every layer at the widest
            choices (e.g. 1.5), for when the reachable error is not known beforehand.
        weight_choices, input_choices: the widths a layer's weights and its input may take.
    """

    output_error: float | None = None
    weight_bytes: int | None = None
    error_ratio: float | None = None
    weight_choices: tuple[int, ...] = WEIGHT_CHOICES
    input_choices: tuple[int, ...] = INPUT_CHOICES

    def __post_init__(self) -> None:
        if [self.output_error, self.weight_bytes, self.error_ratio].count(None) != 2:
            raise SettingsError("bit_width='auto' needs exactly one budget: output_error, error_ratio or "
                                "weight_bytes.", "pass e.g. budget={'output_error': 0.05}, {'error_ratio': 1.5} "
                                                 "or {'weight_bytes': 200_000}.")
        if self.error_ratio is not None and not (isinstance(self.error_ratio, (int, float))
                                                 and not isinstance(self.error_ratio, bool) and self.error_ratio >= 1):
            raise SettingsError(f"budget error_ratio={self.error_ratio!r} is not a ratio >= 1.",
                                "pass e.g. 1.5: at most 1.5x the error of the widest widths everywhere.")
        if self.output_error is not None and not (isinstance(self.output_error, (int, float))
                                                  and 0 < self.output_error < 10):
            raise SettingsError(f"budget output_error={self.output_error!r} is not a relative error.",
                                "pass a positive fraction, e.g. 0.05 for 5%.")
        if self.weight_bytes is not None and (isinstance(self.weight_bytes, bool) or
                                              not isinstance(self.weight_bytes, int) or self.weight_bytes <= 0):
            raise SettingsError(f"budget weight_bytes={self.weight_bytes!r} is not a positive byte count.",
                                "pass an integer number of bytes, e.g. 200000.")
        for name in ("weight_choices", "input_choices"):
            choices = tuple(sorted(set(getattr(self, name))))
            if not choices or any(isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8 for b in choices):
                raise SettingsError(f"budget {name}={getattr(self, name)!r} is not a set of widths.",
                                    "pass widths from 2 to 8, e.g. (2, 4, 6, 8).")
            object.__setattr__(self, name, choices)

    @classmethod
    def of(cls, value: Budget | Mapping[str, Any] | None) -> Budget:
        if isinstance(value, Budget):
            return value
        if value is None:
            return cls()  # raises: a budget is needed
        if not isinstance(value, Mapping):
            raise SettingsError(f"budget={value!r} is not a budget.",
                                "pass budget={'output_error': 0.05} or {'weight_bytes': 200_000}.")
        unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise SettingsError(f"budget has unknown keys {sorted(unknown)}.", "use output_error, error_ratio or "
                                "weight_bytes (and weight_choices, input_choices).")
        return cls(**{k: tuple(v) if k.endswith("choices") else v for k, v in value.items()})

    def error_limit(self, uniform_error: float) -> float | None:
        """The largest output error allowed, given the error with the widest widths everywhere."""
        return self.output_error if self.error_ratio is None else self.error_ratio * uniform_error

    def to_json(self) -> dict[str, Any]:
        return {"output_error": self.output_error, "weight_bytes": self.weight_bytes,
                "error_ratio": self.error_ratio, "weight_choices": list(self.weight_choices),
                "input_choices": list(self.input_choices)}


@dataclass(frozen=True)
class LayerChoice:
    """One crossbar layer: its size, its sensitivity and the widths chosen for it.

    ``weight_error[b]`` / ``input_error[b]``: output rel. L2 error with only this layer's weights /
    input at ``b`` bits (everything else float).
    """

    name: str
    op_type: str
    params: int
    bias: int
    macs: int
    weight_error: dict[int, float]
    input_error: dict[int, float]
    weight_bits: int = 8
    input_bits: int = 8

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["weight_error"] = {str(k): v for k, v in self.weight_error.items()}
        data["input_error"] = {str(k): v for k, v in self.input_error.items()}
        return data


def _weight_bytes(layers: Sequence[LayerChoice], widths: Mapping[str, tuple[int, int]]) -> int:
    bits = sum(layer.params * widths[layer.name][0] + layer.bias * 32 for layer in layers)
    return (bits + 7) // 8


@dataclass(frozen=True)
class MixedPrecisionReport:
    """What ``bit_width='auto'`` chose and what it measured."""

    budget: Budget
    layers: tuple[LayerChoice, ...]
    uniform_error: float  # measured, every layer at the widest choices
    error: float  # measured, the chosen widths
    predicted_error: float
    rounds: int
    seconds: float
    notes: tuple[str, ...] = field(default=())

    @property
    def layer_bits(self) -> dict[str, tuple[int, int]]:
        return {layer.name: (layer.weight_bits, layer.input_bits) for layer in self.layers}

    @property
    def weight_bytes(self) -> int:
        return _weight_bytes(self.layers, self.layer_bits)

    @property
    def uniform_weight_bytes(self) -> int:
        widest = (max(self.budget.weight_choices), max(self.budget.input_choices))
        return _weight_bytes(self.layers, {layer.name: widest for layer in self.layers})

    @property
    def average_weight_bits(self) -> float:
        """Weight bits per parameter (1-bit crossbar cells per weight)."""
        return sum(layer.params * layer.weight_bits for layer in self.layers) / max(
            1, sum(layer.params for layer in self.layers))

    @property
    def average_input_bits(self) -> float:
        """Input bits per multiply-accumulate (bit-serial input cycles)."""
        return sum(layer.macs * layer.input_bits for layer in self.layers) / max(
            1, sum(layer.macs for layer in self.layers))

    def to_json(self) -> dict[str, Any]:
        return {"budget": self.budget.to_json(), "uniform_error": self.uniform_error, "error": self.error,
                "predicted_error": self.predicted_error, "rounds": self.rounds, "seconds": round(self.seconds, 3),
                "weight_bytes": self.weight_bytes, "uniform_weight_bytes": self.uniform_weight_bytes,
                "average_weight_bits": self.average_weight_bits, "average_input_bits": self.average_input_bits,
                "notes": list(self.notes), "layers": [layer.to_json() for layer in self.layers]}


# --- sensitivity ---------------------------------------------------------------------------------------

def _scale(peak: np.ndarray | float, levels: int, settings: QuantSettings) -> np.ndarray:
    """PPQ's symmetric minmax scale for ``peak`` over ``levels`` steps (rounded up to 2^k under pow2)."""
    scale = np.maximum(np.asarray(peak, dtype=np.float64) / levels, 1e-12)
    if settings.scale_policy is ScalePolicy.POW2:
        scale = 2.0 ** np.ceil(np.log2(scale))
    return scale


def _weight_axis(node: onnx.NodeProto, settings: QuantSettings) -> int | None:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if not settings.per_channel or (node.op_type == "ConvTranspose" and attrs.get("group", 1) != 1):
        return None
    if node.op_type == "Gemm":
        return 0 if attrs.get("transB", 0) else 1
    return 1 if node.op_type == "ConvTranspose" else 0


def _fake_weight(weight: np.ndarray, bits: int, axis: int | None, settings: QuantSettings) -> np.ndarray:
    w = weight.astype(np.float64)
    reduce = tuple(i for i in range(w.ndim) if i != axis) if axis is not None else None
    peak = np.abs(w).max(axis=reduce, keepdims=axis is not None)
    scale = _scale(2 * peak, 2**bits - 1, settings)
    return (np.clip(np.rint(w / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale).astype(weight.dtype)


def _probe_model(model: onnx.ModelProto, layers: Sequence[str]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The model with each layer's weight as a graph input and a switchable fake quantizer on its input.

    Per layer ``L``: inputs ``L/w`` (weight), ``L/s``, ``L/lo``, ``L/hi``, ``L/on`` (scalars); the layer
    reads ``x + on * (clip(round(x / s), lo, hi) * s - x)``. Returns the model and {layer: its input tensor},
    which is also a graph output.
    """
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    graph = probe.graph
    inits = {i.name: i for i in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    outputs = {o.name for o in graph.output}
    inputs_of: dict[str, str] = {}
    new_nodes: dict[str, list[onnx.NodeProto]] = {}
    for name in layers:
        node = nodes[name]
        weight = inits[node.input[1]]
        renamed = f"{name}/w"
        graph.input.append(onnx.helper.make_tensor_value_info(renamed, weight.data_type, list(weight.dims)))
        node.input[1] = renamed
        x = node.input[0]
        inputs_of[name] = x
        for p in ("s", "lo", "hi", "on"):
            graph.input.append(onnx.helper.make_tensor_value_info(f"{name}/{p}", onnx.TensorProto.FLOAT, []))
        t = f"{name}/fq"
        new_nodes[name] = [
            onnx.helper.make_node("Div", [x, f"{name}/s"], [f"{t}0"]),
            onnx.helper.make_node("Round", [f"{t}0"], [f"{t}1"]),
            onnx.helper.make_node("Clip", [f"{t}1", f"{name}/lo", f"{name}/hi"], [f"{t}2"]),
            onnx.helper.make_node("Mul", [f"{t}2", f"{name}/s"], [f"{t}3"]),
            onnx.helper.make_node("Sub", [f"{t}3", x], [f"{t}4"]),
            onnx.helper.make_node("Mul", [f"{t}4", f"{name}/on"], [f"{t}5"]),
            onnx.helper.make_node("Add", [x, f"{t}5"], [f"{t}6"]),
        ]
        node.input[0] = f"{t}6"
        if x not in outputs:
            graph.output.append(onnx.helper.make_empty_tensor_value_info(x))
            outputs.add(x)
    ordered = []
    for node in graph.node:
        ordered.extend(new_nodes.get(node.name, []))
        ordered.append(node)
    del graph.node[:]
    graph.node.extend(ordered)
    used = {t for n in graph.node for t in n.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return probe, inputs_of


def crossbar_layers(model: onnx.ModelProto) -> list[str]:
    """Names of the device crossbar operators with a constant weight, in model order."""
    roles = place(model).roles
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in CROSSBAR_OP_TYPES and roles.get(n.name) is Role.CROSSBAR
            and len(n.input) > 1 and n.input[1] in inits]


def measure_sensitivity(model: onnx.ModelProto, samples: Sequence[Mapping[str, np.ndarray]], settings: QuantSettings,
                        budget: Budget) -> tuple[list[LayerChoice], list[list[np.ndarray]]]:
    """Every crossbar layer's sensitivity to each candidate width; also returns the float outputs."""
    import onnx.shape_inference

    layers = crossbar_layers(model)
    probe, inputs_of = _probe_model(model, layers)
    session = ort_session(probe)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    model_outputs = [o.name for o in model.graph.output]
    weights = {name: inits[nodes[name].input[1]] for name in layers}
    off = {f"{name}/{p}": np.array(v, dtype=np.float32) for name in layers
           for p, v in (("s", 1.0), ("lo", -1e30), ("hi", 1e30), ("on", 0.0))}
    base = {**off, **{f"{name}/w": weights[name] for name in layers}}
    wanted = model_outputs + sorted(set(inputs_of.values()) - set(model_outputs))

    def run(extra: Mapping[str, np.ndarray], names: list[str]) -> list[dict[str, np.ndarray]]:
        return [dict(zip(names, session.run(names, {**dict(s), **base, **extra}))) for s in samples]

    reference_runs = run({}, wanted)  # the layers' inputs too, for their ranges
    reference = [[r[o] for o in model_outputs] for r in reference_runs]

    def error(extra: Mapping[str, np.ndarray]) -> float:
        return mean_output_error([[r[o] for o in model_outputs] for r in run(extra, model_outputs)], reference)

    shapes = {}
    inferred = onnx.shape_inference.infer_shapes(model)
    for vi in [*inferred.graph.value_info, *inferred.graph.output]:
        shapes[vi.name] = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    result = []
    for name in layers:
        node, weight = nodes[name], weights[name]
        axis = _weight_axis(node, settings)
        weight_error = {b: error({f"{name}/w": _fake_weight(weight, b, axis, settings)})
                        for b in budget.weight_choices}
        x = np.concatenate([r[inputs_of[name]].ravel() for r in reference_runs])
        unsigned = settings.unsigned_activations and float(x.min()) >= 0
        peak = float(np.abs(x).max())
        input_error = {}
        for b in budget.input_choices:
            lo, hi = (0, 2**b - 1) if unsigned else (-(2 ** (b - 1)), 2 ** (b - 1) - 1)
            scale = _scale(peak if unsigned else 2 * peak, 2**b - 1, settings)
            input_error[b] = error({f"{name}/s": np.array(scale, np.float32), f"{name}/lo": np.array(lo, np.float32),
                                    f"{name}/hi": np.array(hi, np.float32), f"{name}/on": np.array(1.0, np.float32)})
        out_shape = [d for d in shapes.get(node.output[0]) or [] if d > 0]
        channels = (out_shape[-1] if node.op_type == "Gemm" else out_shape[1]) if len(out_shape) > 1 else 1
        macs = int(math.prod(out_shape) * weight.size // max(1, channels)) if out_shape else int(weight.size)
        bias = inits[node.input[2]].size if len(node.input) > 2 and node.input[2] in inits else 0
        result.append(LayerChoice(name, node.op_type, int(weight.size), int(bias), macs, weight_error, input_error,
                                  max(budget.weight_choices), max(budget.input_choices)))
    return result, reference


# --- choice --------------------------------------------------------------------------------------------

def _extra(layer: LayerChoice, w: int, a: int, budget: Budget) -> float:
    """Predicted added noise power of ``layer`` at ``(w, a)`` over its widest choices."""
    top_w, top_a = max(budget.weight_choices), max(budget.input_choices)
    return (max(0.0, layer.weight_error[w] ** 2 - layer.weight_error[top_w] ** 2)
            + max(0.0, layer.input_error[a] ** 2 - layer.input_error[top_a] ** 2))


def predicted_error(layers: Sequence[LayerChoice], widths: Mapping[str, tuple[int, int]], uniform_error: float,
                    budget: Budget) -> float:
    return math.sqrt(uniform_error**2 + sum(_extra(layer, *widths[layer.name], budget) for layer in layers))


def choose(layers: Sequence[LayerChoice], budget: Budget, uniform_error: float,
           target: float | None = None) -> dict[str, tuple[int, int]]:
    """Widths per layer meeting ``target`` (default: the budget's error limit) by the greedy rule of the
    module docstring."""
    target = budget.error_limit(uniform_error) if target is None else target
    top = (max(budget.weight_choices), max(budget.input_choices))
    widths = {layer.name: top for layer in layers}
    total_params = max(1, sum(layer.params for layer in layers))
    total_macs = max(1, sum(layer.macs for layer in layers))
    by_bytes = budget.weight_bytes is not None

    def lower(choices: tuple[int, ...], b: int) -> int | None:
        below = [c for c in choices if c < b]
        return max(below) if below else None

    noise = sum(_extra(layer, *top, budget) for layer in layers)
    while True:
        if by_bytes and _weight_bytes(layers, widths) <= budget.weight_bytes:
            return widths
        best: tuple[float, str, tuple[int, int], float] | None = None
        for layer in layers:
            w, a = widths[layer.name]
            steps = [(nw, a) for nw in [lower(budget.weight_choices, w)] if nw is not None]
            if not by_bytes:
                steps += [(w, na) for na in [lower(budget.input_choices, a)] if na is not None]
            for step in steps:
                added = _extra(layer, *step, budget) - _extra(layer, w, a, budget)
                if by_bytes:
                    saved = layer.params * (w - step[0]) / 8
                else:
                    saved = (layer.params * (w - step[0]) / total_params + layer.macs * (a - step[1]) / total_macs)
                    if math.sqrt(uniform_error**2 + noise + added) > target:
                        continue
                score = added / saved if saved > 0 else math.inf
                if best is None or score < best[0]:
                    best = (score, layer.name, step, added)
        if best is None:
            if by_bytes:
                floor = _weight_bytes(layers, {layer.name: (min(budget.weight_choices), top[1]) for layer in layers})
                raise BudgetError(f"no assignment fits weight_bytes={budget.weight_bytes}: with every layer's weights "
                                  f"at {min(budget.weight_choices)} bits they take {floor} bytes.",
                                  f"allow at least {floor} bytes, or narrower weight_choices.")
            return widths
        _, name, step, added = best
        widths[name] = step
        noise += added


def search(model: onnx.ModelProto, samples: Sequence[Mapping[str, np.ndarray]], settings: QuantSettings,
           budget: Budget, quantize_at: Callable[[QuantSettings], Any],
           measure: Callable[[Any, list[list[np.ndarray]]], float]) -> tuple[Any, QuantSettings, MixedPrecisionReport]:
    """Choose widths under ``budget``; returns the quantized graph, its settings and the report.

    ``quantize_at(settings)`` quantizes with PPQ; ``measure(graph, reference)`` is its output error
    against the float outputs ``reference`` of ``samples``. Raises BudgetError (nothing quantized
    beyond the check) when no assignment can meet the budget.
    """
    started = time.perf_counter()
    layers, reference = measure_sensitivity(model, samples, settings, budget)
    if not layers:
        raise SettingsError("bit_width='auto' found no Conv/Gemm with constant weights on the device.",
                            "quantize this model with a fixed bit_width.")
    top = (max(budget.weight_choices), max(budget.input_choices))
    uniform_settings = settings.replace(weight_bits=top[0], activation_bits=top[1], layer_bits=())
    uniform = quantize_at(uniform_settings)
    uniform_error = measure(uniform, reference)
    log.info("bit_width='auto': %d layers, uniform W%dA%d error %.4f", len(layers), *top, uniform_error)
    limit = budget.error_limit(uniform_error)
    if budget.output_error is not None and uniform_error > budget.output_error:
        worst = sorted(layers, key=lambda layer: -max(layer.weight_error[top[0]], layer.input_error[top[1]]))[:3]
        raise BudgetError(
            f"no assignment meets output_error <= {budget.output_error}: with every layer at W{top[0]}A{top[1]} "
            f"the error is {uniform_error:.4f}; the layers that stop it most: "
            + ", ".join(f"{layer.name} ({max(layer.weight_error[top[0]], layer.input_error[top[1]]):.4f})"
                        for layer in worst) + ".",
            f"allow output_error >= {uniform_error:.4f}, or calibrate on more (real) samples.")

    def report(chosen: Mapping[str, tuple[int, int]], error: float, rounds: int, notes: tuple[str, ...] = ()
               ) -> MixedPrecisionReport:
        picked = tuple(dataclasses.replace(layer, weight_bits=chosen[layer.name][0], input_bits=chosen[layer.name][1])
                       for layer in layers)
        return MixedPrecisionReport(budget, picked, uniform_error, error,
                                    predicted_error(layers, chosen, uniform_error, budget), rounds,
                                    time.perf_counter() - started, notes)

    def settings_for(chosen: Mapping[str, tuple[int, int]]) -> QuantSettings:
        return uniform_settings.replace(layer_bits=tuple(
            (name, w, a) for name, (w, a) in chosen.items() if (w, a) != top))

    target = limit
    rounds = 0
    while rounds < ROUNDS:
        chosen = choose(layers, budget, uniform_error, target)
        if all(w == top for w in chosen.values()):
            break
        rounds += 1
        mixed_settings = settings_for(chosen)
        graph = quantize_at(mixed_settings)
        error = measure(graph, reference)
        log.info("bit_width='auto' round %d: error %.4f (limit %s)", rounds, error, limit)
        if limit is None or error <= limit:
            return graph, mixed_settings, report(chosen, error, rounds)
        # the prediction was optimistic by error / predicted: aim that much lower
        target = predicted_error(layers, chosen, uniform_error, budget) * limit / error
    uniform_widths = {layer.name: top for layer in layers}
    notes = () if rounds == 0 else (
        f"bit_width='auto': no narrower assignment measured within an output error of {limit:.4f} in "
        f"{rounds} rounds; every layer stays at W{top[0]}A{top[1]}.",)
    return uniform, uniform_settings, report(uniform_widths, uniform_error, rounds, notes)
