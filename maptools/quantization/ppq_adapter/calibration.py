"""Calibration at speed: batched samples, an exact faster percentile observer, statistics computed in
onnxruntime, no gc between passes."""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import types
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import torch

from maptools.onnx_model import run_on_sample
from maptools.quantization.ppq_adapter.core import (DataType, OBSERVER_TABLE, QuantableOperation, QuantizationProperty,
                                                    QuantizationStates, RuntimeCalibrationPass, TorchHistObserver,
                                                    TorchMinMaxObserver,
                                                    TorchPercentileObserver, _ppq_defs)

from maptools.quantization.ppq_adapter.steps import _quiet
from maptools.quantization.reference import with_outputs
log = logging.getLogger(__name__)

# --- speed: batched calibration, a faster exact percentile observer, no gc between passes ---------

_batch = threading.local()  # .samples: how many calibration samples the current forward carries
_FAST_PERCENTILE = "maptools_percentile"
#: Values a sample must hold for the percentile's per-sample statistic to be a tail rather than its extreme: with
#: fewer (a timestep's one value, a narrow MLP layer), samples pool into groups of at least this many. (Pooling up
#: to the 10^4 values PPQ's 0.9999 tail needs widened every small tensor's range toward min/max: on the corpus, lower
#: output errors and mixed task metrics, and W4A4 on the digits CNN lost 5 points.)
POOLED = 64
#: Largest tail (elements) taken with topk; beyond it kthvalue is faster.
_TOPK_LIMIT = 4096


class _PercentilePerSample(TorchPercentileObserver):
    """PPQ's percentile observer with the same result, computed faster.

    PPQ takes, for every calibration forward, the k-th smallest and k-th largest value of the
    tensor (``kthvalue``) and averages them over forwards. This observer computes the same two
    order statistics for each sample of a batch (so a batch of n counts as n forwards, exactly as
    if the samples came one by one) with ``topk`` of the short tails.
    """

    #: values per sample (set by :meth:`observe`, or by :class:`Statistics`)
    numel: int | None = None

    @torch.no_grad()
    def observe(self, value: torch.Tensor) -> None:
        cfg = self._quant_cfg
        if cfg.state != QuantizationStates.INITIAL or not cfg.policy.has_property(QuantizationProperty.PER_TENSOR):
            return super().observe(value)
        samples = getattr(_batch, "samples", 1)
        rows = value.reshape(samples, -1) if value.numel() % samples == 0 else value.reshape(1, -1)
        numel = self.numel = rows.shape[1]
        min_k = max(0, int(numel * (1 - self._percentile))) + 1  # kthvalue's k, as PPQ computes it
        max_k = min(int(numel * self._percentile), numel - 1) + 1
        self._percentile_collector.append(torch.stack([_kth(rows, max_k), _kth(rows, min_k)], dim=1).float())


    def render_quantization_config(self) -> None:
        """PPQ's range (the mean over samples of each one's order statistics), except where a sample holds fewer
        than :data:`POOLED` values: a sample's statistic is then its extreme, and their mean no tail (of a timestep
        input's one value, the mean of the values). Such samples pool into groups of at least that many values,
        whose extremes are averaged."""
        per_group = -(-POOLED // self.numel) if self.numel and self.numel < POOLED else 1
        if per_group > 1 and self._percentile_collector:
            rows = torch.cat(self._percentile_collector, dim=0).float()  # [samples, (k-th largest, k-th smallest)]
            self._percentile_collector = [torch.stack([torch.stack([group[:, 0].max(), group[:, 1].min()])
                                                       for group in rows.split(per_group)])]
        super().render_quantization_config()


def _kth(rows: torch.Tensor, k: int) -> torch.Tensor:
    """k-th smallest value (1-based) of every row, like ``torch.kthvalue(rows, k, dim=1)``."""
    numel = rows.shape[1]
    if k <= _TOPK_LIMIT:
        return rows.topk(k, dim=1, largest=False, sorted=True).values[:, -1]
    if numel - k + 1 <= _TOPK_LIMIT:
        return rows.topk(numel - k + 1, dim=1, largest=True, sorted=True).values[:, -1]
    return rows.kthvalue(k, dim=1).values


OBSERVER_TABLE[_FAST_PERCENTILE] = _PercentilePerSample


#: significant bits an activation scale keeps (see _OnePassCalibration)
SCALE_BITS = 8


def _round_scale(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` rounded to :data:`SCALE_BITS` significant bits (half to even)."""
    mantissa, exponent = torch.frexp(scale.detach().to(torch.float64))
    return torch.ldexp(torch.round(mantissa * 2.0**SCALE_BITS) / 2.0**SCALE_BITS, exponent).to(scale.dtype)


class _OnePassCalibration(RuntimeCalibrationPass):
    """PPQ's runtime calibration, reading the calibration batches exactly once per phase, with
    activation scales rounded to :data:`SCALE_BITS` significant bits.

    PPQ loops over its data until ``calib_steps`` batches were read (at least 8); maptools
    hands it exactly the samples to use, batched, so one pass is the same data as PPQ's loop.
    The rounding makes artifacts independent of torch's thread count: a convolution's float
    result changes in its last bits with the number of threads, and so would a percentile or a
    minimum taken from it; a 0.2-0.4% step absorbs such differences (and is far below the
    calibration's own sampling noise).
    """

    def __init__(self, method: str | None, model: bytes | None = None, tensors_out: bool = True) -> None:
        super().__init__(method=method)
        self._model, self._tensors_out = model, tensors_out
        self._graph: Any = None

    def optimize(self, graph: Any, *args: Any, **kwargs: Any) -> None:
        self._graph = graph
        super().optimize(graph, *args, **kwargs)
        for op in graph.operations.values():
            if not isinstance(op, QuantableOperation):
                continue
            for cfg, var in op.config_with_variable:
                if (not var.is_parameter and cfg.dominated_by is cfg and cfg.state == QuantizationStates.ACTIVATED
                        and isinstance(cfg.scale, torch.Tensor)):
                    cfg.scale = _round_scale(cfg.scale)

    def calibrate(self, desc: str, dataloader: Iterable[Any], executor: Any, hooks: Any,
                  output_names: list[str] | None = None) -> None:
        statistics = Statistics.build(self._model, self._graph, hooks, self._tensors_out) \
            if self._model is not None else None
        for data in dataloader:
            if statistics is not None:
                # one sample per run, as the statistics model keeps the model's input shapes: onnxruntime gains
                # nothing from batches on the CPU, and large ones cost it memory traffic (FPN 640, 32 samples:
                # 0.77 s one at a time, 1.24 s in batches of 16). quantize_graph forms batches only where it
                # expects PPQ's forward to calibrate; should the statistics apply there after all, they split here.
                count = getattr(_batch, "samples", 1)
                for i in range(count):
                    statistics.observe({k: v.chunk(count)[i] if v.dim() else v for k, v in data.items()})
                continue
            if self._collate_fn is not None:
                data = self._collate_fn(data)
            executor.forward(inputs=data, hooks=hooks, output_names=output_names)


def chunk_count(numel: int, m: int) -> int | None:
    """Chunks a row of ``numel`` values splits into for :func:`tail_nodes`: the smallest divisor of ``numel``
    from 8m on whose chunks hold at least 16 values; None where there is none (short rows)."""
    divisors = {d for i in range(1, math.isqrt(numel) + 1) if numel % i == 0 for d in (i, numel // i)}
    fitting = [d for d in divisors if d >= 8 * m and numel // d >= 16]
    return min(fitting) if fitting else None


def tail_nodes(graph: onnx.GraphProto, rows: str, numel: int, m: int, largest: bool, out: str) -> list[onnx.NodeProto]:
    """Nodes writing to ``out`` the m largest (or smallest) values of every row of ``rows`` [batch, numel],
    sorted, so ``out[:, -1]`` is the m-th: ``TopK``, exact, over far fewer values where the row splits
    into R >= 8m chunks. The m extreme values all lie in the m chunks with the most extreme maxima (or
    minima), since any other chunk has m chunks above it, each holding a value above all of its own; so
    TopK of the chunk extremes, GatherND of those chunks and TopK of their values give the same m values
    (FPN 640: a third of the time of one TopK over the row)."""
    k = onnx.numpy_helper.from_array(np.array([m], dtype=np.int64), f"{out}_k")
    graph.initializer.append(k)
    top = onnx.helper.make_node
    count = chunk_count(numel, m)
    if count is None:
        return [top("TopK", [rows, k.name], [out, f"{out}_i"], axis=1, largest=int(largest), sorted=1)]
    graph.initializer.extend([
        onnx.numpy_helper.from_array(np.array([0, count, numel // count], dtype=np.int64), f"{out}_grid"),
        onnx.numpy_helper.from_array(np.array([0, -1, 1], dtype=np.int64), f"{out}_picks")])
    return [
        top("Reshape", [rows, f"{out}_grid"], [f"{out}chunk_count"]),
        top("ReduceMax" if largest else "ReduceMin", [f"{out}chunk_count"], [f"{out}_ends"], axes=[2], keepdims=0),
        top("TopK", [f"{out}_ends", k.name], [f"{out}_e", f"{out}_which"], axis=1, largest=int(largest), sorted=0),
        top("Reshape", [f"{out}_which", f"{out}_picks"], [f"{out}_index"]),
        top("GatherND", [f"{out}chunk_count", f"{out}_index"], [f"{out}_picked"], batch_dims=1),
        top("Flatten", [f"{out}_picked"], [f"{out}_cand"], axis=1),
        top("TopK", [f"{out}_cand", k.name], [out, f"{out}_i"], axis=1, largest=int(largest), sorted=1),
    ]


class Statistics:
    """Calibration statistics computed inside onnxruntime (CPU), as onnxruntime's own calibrator does.

    While PPQ calibrates it quantizes no activation, so its forward is the float network with the
    baked (fake-quantized) weights: this model, in which every observed tensor feeds, per sample,
    ``ReduceMin``/``ReduceMax`` (minmax, and the first pass of kl and mse) or its two short tails
    (:func:`tail_nodes`; maptools' percentile observer: the same order statistics). Only those small results
    leave onnxruntime, and they go into the observers' collectors exactly as the observers would have put
    them; for the histograms of kl's and mse's second pass the tensors themselves leave it, one sample at
    a time, and the observer bins them as in PPQ's forward. Every operator
    whose PPQ kernel computes something else than ONNX already runs in onnxruntime (see
    :func:`_float_check`). Samples run one at a time, in the model's own input shapes.
    """

    def __init__(self, session: Any, outputs: list[tuple[Any, str, list[str]]]) -> None:
        self.session = session
        self.outputs = outputs  # (observer, kind, output names)
        self.names = [n for _, _, names in outputs for n in names]

    @classmethod
    def build(cls, model: bytes, graph: Any, hooks: Mapping[str, Any], tensors_out: bool = True
              ) -> Statistics | None:
        """None where PPQ's forward is to calibrate: a histogram pass unless ``tensors_out``, another observer, a
        weight that is not baked yet (before an optimization pass), a tensor PPQ made up, a tail too long for TopK."""
        probe = onnx.ModelProto.FromString(model)
        inits = {i.name: i for i in probe.graph.initializer}
        produced = {t for n in probe.graph.node for t in n.output} | {i.name for i in probe.graph.input}
        for op in graph.operations.values():
            if not isinstance(op, QuantableOperation):
                continue
            for cfg, var in op.config_with_variable:
                if cfg.state in (QuantizationStates.ACTIVATED, QuantizationStates.PASSIVE):
                    return None
                if var.is_parameter and cfg.state in (QuantizationStates.BAKED, QuantizationStates.PASSIVE_BAKED):
                    init = inits.get(var.name)
                    value = var.value.detach().cpu().numpy()
                    if init is None or list(value.shape) != list(init.dims) or \
                            value.dtype != onnx.helper.tensor_dtype_to_np_dtype(init.data_type):
                        return None
                    init.CopyFrom(onnx.numpy_helper.from_array(value, var.name))
        nodes: list[onnx.NodeProto] = []
        outputs: list[tuple[Any, str, list[str]]] = []
        for hook in hooks.values():
            for cfg, observer in hook._observer_table.items():
                var = next(v for c, v in hook._operation.config_with_variable if c is cfg)
                shape = var.shape
                if var.name not in produced or not shape or not all(isinstance(d, int) for d in shape):
                    return None
                # one row per forward, as PPQ's observers see a tensor: its axis 0 need not be a batch axis
                # (a sequence's rows before a Gemm, a [T, N, C] recurrent layout, a model prepared for batch 4)
                numel = math.prod(shape)
                t = f"maptools_stat{len(outputs)}"
                nodes.append(onnx.helper.make_node("Flatten", [var.name], [f"{t}_rows"], axis=0))
                if type(observer) is TorchMinMaxObserver or \
                        isinstance(observer, TorchHistObserver) and observer._phase == "Detecting Minmax":
                    nodes += [onnx.helper.make_node("ReduceMin", [f"{t}_rows"], [f"{t}_lo"], axes=[1], keepdims=0),
                              onnx.helper.make_node("ReduceMax", [f"{t}_rows"], [f"{t}_hi"], axes=[1], keepdims=0)]
                    outputs.append((observer, "minmax", [f"{t}_lo", f"{t}_hi"]))
                elif type(observer) is _PercentilePerSample:
                    observer.numel = numel
                    low = max(0, int(numel * (1 - observer._percentile))) + 1  # as _PercentilePerSample.observe
                    high = numel - min(int(numel * observer._percentile), numel - 1)  # m-th largest
                    if max(low, high) > _TOPK_LIMIT:
                        return None
                    for side, m, largest in (("hi", high, 1), ("lo", low, 0)):
                        nodes += tail_nodes(probe.graph, f"{t}_rows", numel, m, bool(largest), f"{t}_{side}")
                    outputs.append((observer, "percentile", [f"{t}_hi", f"{t}_lo"]))
                elif isinstance(observer, TorchHistObserver) and tensors_out:  # kl's, mse's second pass: the values
                    outputs.append((observer, "values", [f"{t}_rows"]))
                else:
                    return None
        probe.graph.node.extend(nodes)
        data = probe.SerializeToString()
        del probe, inits  # (the parsed copy of the weights) before onnxruntime makes its own
        session = with_outputs(data, [], [],
                                [onnx.helper.make_empty_tensor_value_info(n) for _, _, names in outputs for n in names],
                                "the statistics model")
        return None if session is None else cls(session, outputs)

    def observe(self, data: Mapping[str, torch.Tensor]) -> None:
        """One calibration batch: its statistics, into the observers' collectors."""
        values = iter(run_on_sample(self.session, self.names, {k: v.detach().cpu().numpy() for k, v in data.items()}))
        for observer, kind, _ in self.outputs:
            if kind == "minmax":
                lo, hi = (torch.from_numpy(np.asarray(next(values))) for _ in range(2))
                observer._min_val_collector.append(lo.min().reshape([1]))
                observer._max_val_collector.append(hi.max().reshape([1]))
            elif kind == "values":
                observer.observe(torch.from_numpy(np.asarray(next(values))))  # PPQ's own histogram of them
            else:
                hi, lo = (torch.from_numpy(np.asarray(next(values))[:, -1]) for _ in range(2))
                observer._percentile_collector.append(torch.stack([hi, lo], dim=1).float())


_gc_lock = threading.Lock()
_gc_users = 0


@contextlib.contextmanager
def _no_gc_between_passes() -> Any:
    """PPQ runs ``gc.collect()`` (and ``torch.cuda.empty_cache()``) before many of its passes;
    a full collection of a process holding torch costs 0.1-1 s each time and frees nothing that
    reference counting would not. Skip them while maptools drives PPQ."""
    global _gc_users
    with _gc_lock:
        if _gc_users == 0:
            _no_gc_between_passes.saved = (_ppq_defs.gc, _ppq_defs.empty_cache)  # type: ignore[attr-defined]
            _ppq_defs.gc = types.SimpleNamespace(collect=lambda *a, **k: 0)
            _ppq_defs.empty_cache = lambda: None
        _gc_users += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_users -= 1
            if _gc_users == 0:
                _ppq_defs.gc, _ppq_defs.empty_cache = _no_gc_between_passes.saved  # type: ignore[attr-defined]


class _Batches:
    """Re-iterable: consecutive samples concatenated along axis 0, ``size`` at a time.

    Sets the thread-local sample count the percentile observer reads while each batch is used.
    """

    def __init__(self, samples: Iterable[Mapping[str, torch.Tensor]], count: int, size: int) -> None:
        self.samples, self.count, self.size = samples, count, max(1, size)

    def __len__(self) -> int:
        return math.ceil(self.count / self.size)

    def __iter__(self) -> Any:
        group: list[Mapping[str, torch.Tensor]] = []
        try:
            for i, sample in enumerate(self.samples):
                if i >= self.count:
                    break
                group.append(sample)
                if len(group) == self.size:
                    yield self._emit(group)
                    group = []
            if group:
                yield self._emit(group)
        finally:
            _batch.samples = 1

    @staticmethod
    def _emit(group: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        _batch.samples = len(group)
        if len(group) == 1:
            return dict(group[0])
        # a 0-d input (a sample rate, a flag) has no batch axis: every sample of the batch shares the first's
        return {name: torch.cat([s[name] for s in group], dim=0) if group[0][name].dim() else group[0][name]
                for name in group[0]}


#: Calibration batch (samples per forward) by device kind; bounded by _BATCH_BYTES of the largest activation.
_BATCH = {"cpu": 16, "cuda": 32}
_BATCH_BYTES = 256 << 20


def _float_shapes(graph: Any) -> dict[str, list[Any]]:
    """Shapes of the float activations (an empty optional input has no name and no shape)."""
    return {name: list(var.shape) for name, var in graph.variables.items()
            if name and not var.is_parameter and var.shape is not None
            and var.dtype in (DataType.FP32, DataType.FP16, DataType.FP64)}


def _doubled_batch_shapes(executor: Any, graph: Any, trace_inputs: Mapping[str, torch.Tensor]) -> dict | None:
    """Float tensor shapes of a trace with two copies of the sample, or None when that fails."""
    try:
        with _quiet():
            executor.tracing_operation_meta(inputs={k: torch.cat([v, v]) for k, v in trace_inputs.items()})
    except Exception:  # noqa: BLE001  (not batchable; the batch-1 trace decides whether the model runs)
        return None
    return _float_shapes(graph)


def _batch_size(one: Mapping[str, list[Any]], two: Mapping[str, list[Any]] | None, count: int, device: str) -> int:
    """How many samples to calibrate per forward: 1 unless the graph is batch-major throughout.

    ``one`` and ``two`` are the float tensor shapes traced with one sample and with two copies of
    it: every float tensor must have its leading axis doubled and its other axes unchanged (a
    Reshape to a constant batch of 1, a batch moved to another axis, or a failed trace all mean:
    calibrate one sample at a time).
    """
    if count < 2 or two is None:
        return 1
    for name, shape in one.items():
        other = two.get(name)
        if not shape or other is None or len(other) != len(shape) or other[1:] != shape[1:] or \
                not isinstance(shape[0], int) or other[0] != 2 * shape[0]:
            return 1
    largest = max((math.prod(int(d) for d in s) for s in one.values() if all(isinstance(d, int) for d in s)),
                  default=1) * 4
    size = min(_BATCH["cuda" if str(device).startswith("cuda") else "cpu"], max(1, _BATCH_BYTES // largest), count)
    return max(1, size)
