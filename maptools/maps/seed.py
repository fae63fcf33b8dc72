"""The seed contract: ``quantinfo.pkl`` / ``quantparams.pkl`` as the original toolchain reads them.

The seed document's quantization step writes pickles that its next stage (upstream maptools 1.0:
ONNX converter, tile mapper, integer simulator) loads as they are. That downstream assumes, without
checking, that (rules, by number):

1. an operator has ONE signed integer range for its inputs and its output (``io_min``/``io_max``);
2. every edge between device operators, and every input of an adder, is on ONE scale: a producer's
   ``output_scale`` is its consumer's ``input_scale`` (it adds and moves codes without requantizing);
3. every requantization ratio (``weight_scale * input_scale / output_scale`` of a crossbar layer,
   ``input_scale / output_scale`` of the others) is below 2^7;
4. offsets are zero and input bits equal output bits;
5. the model it is given names its nodes as quantinfo does and records every intermediate shape.

A ``profile='seed'`` map (the default) is quantized so these hold (signed ranges, shared scales),
checked by :func:`check` before it is written, and its pickles hold the original's own types
(:func:`seed_quantinfo`, :func:`seed_quantparams`, written by :func:`dumps`): ``OperatorQuantConfig``
instances (:mod:`maptools.core.proto`) with python ints and floats and a float32 ``torch.Tensor`` of
weight scales, int8 Conv weights and int32 biases, float32 Gemm parameters. A map the contract
cannot represent is written with this package's own pickle types, which the original refuses to
load, so it is never read wrong. :func:`check_map` checks a written map against every rule.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from maptools.core.proto import OperatorQuantConfig
from maptools.maps.artifacts import MODEL, QUANTINFO_PKL, QUANTPARAMS_PKL, load_quantinfo, one_copy, safe_load_pickle
from maptools.maps.roots import MapRef
from maptools.quantinfo import QuantConfig, param_key

__all__ = ["Violation", "check", "check_map", "check_seed", "seed_quantinfo", "seed_quantparams", "dumps",
           "RATIO_LIMIT"]

#: Largest requantization ratio the original downstream handles (an 8-bit mantissa and a shift).
RATIO_LIMIT = 2.0**7


@dataclass(frozen=True)
class Violation:
    """One place a map breaks the seed contract: which rule, where, what, and the setting that fixes it."""

    rule: int
    where: str
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"rule {self.rule}, {self.where}: {self.problem} (fix: {self.fix})"


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b))


def check(quantinfo: Mapping[str, QuantConfig], model: onnx.ModelProto) -> list[Violation]:
    """Every place ``quantinfo`` (of the prepared ``model``) breaks the seed contract's rules 1-5."""
    found: list[Violation] = []
    nodes = {n.name: n for n in model.graph.node}
    producer = {t: n.name for n in model.graph.node for t in n.output}
    constants = {i.name for i in model.graph.initializer}
    for name, cfg in quantinfo.items():
        ranges = {*(cfg.in_range(i) for i in range(max(1, len(cfg.input_scales)))), cfg.out_range}
        signed = (-(2 ** (cfg.io_bits - 1)), 2 ** (cfg.io_bits - 1) - 1)
        if ranges != {signed}:
            found.append(Violation(1, name, f"integer ranges {sorted(ranges)} where one signed range {signed} is read",
                                   "activation_sign='signed' and one width for every activation (no layer_bits)"))
        node = nodes.get(name)
        if node is None:
            found.append(Violation(5, name, "no node of the model has this name", "quantize the model again"))
            continue
        acts = [t for t in node.input if t and t not in constants]
        for index, tensor in enumerate(acts):
            source = quantinfo.get(producer.get(tensor, ""))
            mine = cfg.input_scales[index] if index < len(cfg.input_scales) else None
            if source is None or source.output_scale is None or mine is None:
                continue  # from the host: quantized where it enters the device
            if not _close(source.output_scale, mine):
                found.append(Violation(2, name, f"input {index} is on scale {mine:.6g}, its producer {producer[tensor]} "
                                                f"writes {source.output_scale:.6g}",
                                       "shared_scales=True (a tensor that feeds two adders can sit on one grid only: "
                                       "profile='extended')"))
        scales = [s for s in cfg.input_scales if s is not None]
        if cfg.op_type in ("Add", "Sub") and len(scales) > 1 and not all(_close(s, scales[0]) for s in scales):
            found.append(Violation(2, name, f"the adder's inputs are on scales {[f'{s:.6g}' for s in scales]}",
                                   "shared_scales=True"))
        if cfg.output_scale is not None and cfg.input_scale is not None:
            ratios = (cfg.weight_scale.astype(np.float64) * cfg.input_scale if cfg.has_weights
                      else np.array([cfg.input_scale])) / cfg.output_scale
            if float(ratios.max()) >= RATIO_LIMIT:
                found.append(Violation(3, name, f"requantization ratio {float(ratios.max()):.4g} >= 2^7",
                                       "more activation bits, or profile='extended'"))
    shapes = {vi.name for vi in [*model.graph.value_info, *model.graph.output]}
    missing = [t for n in model.graph.node for t in n.output if t and t not in shapes]
    if missing:
        found.append(Violation(5, "model.onnx", f"no recorded shape for {len(missing)} tensors ({', '.join(missing[:4])})",
                               "quantize through maptools.quantize, which prepares the model"))
    return found


def seed_quantinfo(quantinfo: Mapping[str, QuantConfig]) -> dict[str, OperatorQuantConfig]:
    """``quantinfo`` as the original's ``OperatorQuantConfig`` objects, with its attribute types."""
    import torch

    out = {}
    for name, cfg in quantinfo.items():
        attrs: dict[str, Any] = dict(name=name, op_type=cfg.op_type, io_bits=int(cfg.io_bits), io_min=int(cfg.io_min),
                                     io_max=int(cfg.io_max), input_scale=_float(cfg.input_scale),
                                     output_scale=_float(cfg.output_scale))
        if cfg.has_weights:
            attrs.update(weight_bits=int(cfg.weight_bits), weight_min=int(cfg.weight_min),
                         weight_max=int(cfg.weight_max),
                         weight_scale=torch.from_numpy(np.ascontiguousarray(cfg.weight_scale, dtype=np.float32)))
        out[name] = OperatorQuantConfig(**attrs)
    return out


def _float(value: float | None) -> float | None:
    return None if value is None else float(value)


def seed_quantparams(quantparams: Mapping[str, np.ndarray | None], quantinfo: Mapping[str, QuantConfig],
                     model: onnx.ModelProto) -> dict[str, np.ndarray | None]:
    """``quantparams`` as the original reads them: Conv codes as they are, Gemm parameters in float32 (its host
    runs the classifier with ``nn.Linear``): the weights dequantized, the bias the model's."""
    params = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    out = dict(quantparams)
    for name, cfg in quantinfo.items():
        if cfg.op_type != "Gemm" or not cfg.has_weights:
            continue
        node = nodes[name]
        wkey, bkey = param_key(name, "Gemm", "weight"), param_key(name, "Gemm", "bias")
        codes = quantparams[wkey].astype(np.float32)
        axis = 0 if cfg.weight_scale.size == 1 or _trans_b(node) else 1
        shape = [1, 1]
        shape[axis] = -1
        out[wkey] = codes * cfg.weight_scale.astype(np.float32).reshape(shape)
        bias = params.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        out[bkey] = None if bias is None else bias.astype(np.float32).reshape(-1)
    return out


def _trans_b(node: onnx.NodeProto) -> bool:
    return any(a.name == "transB" and a.i for a in node.attribute)


class _Pickler(pickle.Pickler):
    """Pickles a float32 ``torch.Tensor`` as ``torch.Tensor([values])``: the original unpickles it with torch,
    and this package's allow-list reader needs no storage rebuilders (torch's run ``torch.load`` on bytes)."""

    def reducer_override(self, obj: Any) -> Any:
        import torch

        if isinstance(obj, torch.Tensor):
            if obj.dtype != torch.float32 or obj.dim() != 1:
                raise TypeError("seed pickles hold 1-D float32 tensors only")
            return torch.Tensor, ([float(v) for v in obj.detach().cpu().tolist()],)
        return NotImplemented


def dumps(data: Mapping[str, Any]) -> bytes:
    """A seed pickle (protocol 4, which the original's Python reads)."""
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=4).dump(one_copy(data))
    return buffer.getvalue()


def check_map(map_dir: Path) -> list[Violation]:
    """A written map against the seed contract: its pickles' classes and attribute types as the original reads
    them, and rules 1-5 on its quantinfo (``quantinfo.json``) and ``model.onnx``."""
    from maptools.errors import UnsafePickleError

    quantinfo = load_quantinfo(map_dir / "quantinfo.json")
    model = onnx.load(str(map_dir / MODEL))
    found = check(quantinfo, model)
    fix = "quantize with profile='seed' (the default)"
    try:
        objects = safe_load_pickle(map_dir / QUANTINFO_PKL, seed=True)
    except UnsafePickleError as e:
        return [Violation(0, QUANTINFO_PKL, f"not the original's classes: {e.problem}", fix), *found]
    if set(objects) != set(quantinfo) or not all(isinstance(o, OperatorQuantConfig) for o in objects.values()):
        found.append(Violation(0, QUANTINFO_PKL, "does not map every operator to an OperatorQuantConfig", fix))
    for name, obj in objects.items():
        found += [Violation(0, f"{QUANTINFO_PKL} {name}", problem, fix) for problem in _attribute_types(obj)]
    params = safe_load_pickle(map_dir / QUANTPARAMS_PKL, seed=True)
    for name, cfg in quantinfo.items():
        if not cfg.has_weights:
            continue
        weight, bias = params.get(param_key(name, cfg.op_type, "weight")), params.get(param_key(name, cfg.op_type, "bias"))
        want = (np.float32, np.float32) if cfg.op_type == "Gemm" else (np.int8, np.int32)
        if not isinstance(weight, np.ndarray) or weight.dtype != want[0] or (
                bias is not None and (not isinstance(bias, np.ndarray) or bias.dtype != want[1])):
            found.append(Violation(0, f"{QUANTPARAMS_PKL} {name}", f"{cfg.op_type} parameters are not "
                                   f"{np.dtype(want[0]).name}/{np.dtype(want[1]).name} arrays", fix))
    return found


def _attribute_types(obj: OperatorQuantConfig) -> list[str]:
    import torch

    attrs = obj.__dict__
    problems = [f"{key} is {type(attrs.get(key)).__name__}, not {kind.__name__}"
                for key, kind in (("name", str), ("op_type", str), ("io_bits", int), ("io_min", int), ("io_max", int))
                if type(attrs.get(key)) is not kind]
    problems += [f"{key} is {type(attrs.get(key)).__name__}, not float" for key in ("input_scale", "output_scale")
                 if attrs.get(key) is not None and type(attrs[key]) is not float]
    if attrs.get("op_type") in ("Conv", "Gemm") and "weight_scale" in attrs:
        scale = attrs["weight_scale"]
        if not (isinstance(scale, torch.Tensor) and scale.dtype == torch.float32 and scale.dim() == 1):
            problems.append(f"weight_scale is {type(scale).__name__}, not a 1-D float32 torch.Tensor")
        problems += [f"{key} is not int" for key in ("weight_bits", "weight_min", "weight_max")
                     if type(attrs.get(key)) is not int]
    return problems


def check_seed(mapname: str | MapRef, output_root: str | Path | None = None) -> list[Violation]:
    """The violations of the seed contract in map ``mapname`` (its current version, verified against its
    manifest first): empty when the original toolchain reads it as it is (:func:`check_map`)."""
    from maptools.maps.folder import MapFolder

    version = MapFolder(mapname, output_root).open()
    version.verify()
    return check_map(version.path)
