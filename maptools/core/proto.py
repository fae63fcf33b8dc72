"""The class the original toolchain's ``quantinfo.pkl`` holds, at the path its downstream imports.

Upstream maptools 1.0 reads ``quantinfo.pkl`` as ``{op name: maptools.core.proto.OperatorQuantConfig}``;
a pickle names its classes by module and name, so a seed-profile map (:mod:`maptools.maps.seed`) writes
instances of this class. It is a plain attribute holder, as the original's is (its ``__init__`` only
updates ``__dict__``), so either side restores the other's instances from their ``__dict__``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["OperatorQuantConfig"]


class OperatorQuantConfig:
    """Attributes: ``name``, ``op_type``, ``io_bits``, ``io_min``, ``io_max``, ``input_scale``, ``output_scale``;
    for Conv and Gemm also ``weight_bits``, ``weight_min``, ``weight_max``, ``weight_scale`` (a float32
    ``torch.Tensor``, one value per output channel)."""

    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)

    def __repr__(self) -> str:
        return f"OperatorQuantConfig({', '.join(f'{k}={v!r}' for k, v in self.__dict__.items())})"
