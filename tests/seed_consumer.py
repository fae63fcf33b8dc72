"""A reference consumer of seed-profile maps, written from the contract's rules (:mod:`maptools.maps.seed`), not
from any code: what the original toolchain's integer simulator assumes and nothing more.

It reads only ``quantinfo.pkl`` and ``quantparams.pkl`` (plain objects: ``OperatorQuantConfig`` attributes,
arrays) and the prepared ``model.onnx``. A device tensor is integer codes on its producer's
``output_scale``, taken as the consumer's ``input_scale`` without requantizing (rule 2); each operator
clamps once, to its one ``[io_min, io_max]`` (rule 1), after scaling by the ratio of its scales (rule 3);
Gemm runs on the host in float with float32 parameters, as the original's ``nn.Linear`` does. It
covers the operators of the CNNs it is tested on (Conv, Relu, Add, pools, Flatten, Reshape, Gemm).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F

__all__ = ["run"]


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _clamp(values: torch.Tensor, cfg: Any) -> torch.Tensor:
    return torch.clamp(torch.round(values), cfg.io_min, cfg.io_max)


def run(map_dir: Path, x: np.ndarray) -> dict[str, tuple[np.ndarray, float | None]]:
    """Every tensor the device computes: ``{name: (codes, scale)}`` (``scale`` None: a float host tensor)."""
    quantinfo = pickle.loads((map_dir / "quantinfo.pkl").read_bytes())
    params = pickle.loads((map_dir / "quantparams.pkl").read_bytes())
    model = onnx.load(str(map_dir / "model.onnx"))
    constants = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    env: dict[str, tuple[torch.Tensor, float | None]] = {model.graph.input[0].name: (torch.from_numpy(x).double(), None)}

    def codes(tensor: str, cfg: Any) -> torch.Tensor:
        value, scale = env[tensor]
        if scale is None:  # a float tensor entering the device: quantized on the operator's input scale
            return _clamp(value / cfg.input_scale, cfg)
        return value  # rule 2: already on this operator's input scale

    for node in model.graph.node:
        cfg = quantinfo.get(node.name)
        op, out = node.op_type, node.output[0]
        if op == "Conv":
            kernel = torch.from_numpy(params[f"{node.name}_conv_weight"].astype(np.float64))
            bias = params[f"{node.name}_conv_bias"]
            pads = list(_attr(node, "pads", [0, 0, 0, 0]))
            acc = F.conv2d(F.pad(codes(node.input[0], cfg), [pads[1], pads[3], pads[0], pads[2]]), kernel,
                           None if bias is None else torch.from_numpy(bias.astype(np.float64)),
                           list(_attr(node, "strides", [1, 1])), 0, list(_attr(node, "dilations", [1, 1])),
                           _attr(node, "group", 1))
            ratio = cfg.weight_scale.double().reshape(1, -1, 1, 1) * cfg.input_scale / cfg.output_scale
            env[out] = (_clamp(acc * ratio, cfg), cfg.output_scale)
        elif op in ("Relu", "MaxPool", "Flatten", "Reshape", "GlobalAveragePool", "AveragePool", "Add"):
            inputs = [codes(t, cfg) for t in node.input if t not in constants]
            if op == "Relu":
                value = torch.relu(inputs[0])
            elif op == "MaxPool":
                pads = list(_attr(node, "pads", [0, 0, 0, 0]))
                value = F.max_pool2d(F.pad(inputs[0], [pads[1], pads[3], pads[0], pads[2]], value=cfg.io_min),
                                     list(_attr(node, "kernel_shape", [1, 1])), list(_attr(node, "strides", [1, 1])))
            elif op == "Flatten":
                value = inputs[0].reshape(inputs[0].shape[0], -1)
            elif op == "Reshape":
                value = inputs[0].reshape([int(d) for d in constants[node.input[1]]])
            elif op == "GlobalAveragePool":
                value = inputs[0].mean(dim=(2, 3), keepdim=True)
            elif op == "AveragePool":
                pads = list(_attr(node, "pads", [0, 0, 0, 0]))
                value = F.avg_pool2d(inputs[0], list(_attr(node, "kernel_shape", [1, 1])),
                                     list(_attr(node, "strides", [1, 1])), [pads[0], pads[1]],
                                     count_include_pad=bool(_attr(node, "count_include_pad", 0)))
            else:  # Add: rule 2 puts both inputs on the adder's one input scale, so codes add as they are
                value = inputs[0] + inputs[1]
            env[out] = (_clamp(value * cfg.input_scale / cfg.output_scale, cfg), cfg.output_scale)
        elif op == "Gemm":  # the host's nn.Linear, in float with float32 parameters
            value, scale = env[node.input[0]]
            weight = torch.from_numpy(params[f"{node.name}_gemm_weight"].astype(np.float64))
            bias = params[f"{node.name}_gemm_bias"]
            real = value * scale if scale is not None else value
            result = real @ (weight.T if _attr(node, "transB", 0) else weight)
            env[out] = (result + (0 if bias is None else torch.from_numpy(bias.astype(np.float64))), None)
        else:
            raise NotImplementedError(f"the reference consumer has no {op}")
    return {name: (value.numpy(), scale) for name, (value, scale) in env.items()}
