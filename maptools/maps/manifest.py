"""The typed ``manifest.json`` of a map: what was quantized, how, and the sha256 of every artifact.

Stages that add files (``convert``, the map stage) register them in ``artifacts``; readers trust a
file only when its sha256 matches. Unknown keys are kept (a later stage, or a newer maptools, may
add some), so a manifest round-trips unchanged; maps written by maptools 0.1 lack the fields that
have defaults here.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from maptools.errors import ArtifactError
from maptools.placement import PlacementReport

__all__ = ["Manifest", "ModelRecord", "parse_manifest"]

Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow")


class ModelRecord(_Record):
    """The model as given (path, sha256), the input shapes it was quantized for, and its preparation."""

    path: str = Field(description="The model file as the user gave it.")
    sha256: Sha256 = Field(description="sha256 of that file's bytes.")
    input_shapes: dict[str, list[int]] = Field(description="Input name -> the shape it was quantized for.")
    prepared: dict[str, Any] | None = Field(
        None, description="What preparation did: opsets before and after, the steps run, the steps left out "
                          "(fallbacks) and the largest difference from the original in onnxruntime.")


class Manifest(_Record):
    """``manifest.json`` (see the docs' "The map folder" and the generated manifest schema)."""

    mapname: str = Field(description="The map's name: its folder under mapsave/.")
    artifacts: dict[str, Sha256] = Field(description="Artifact file name -> sha256.")
    model: ModelRecord = Field(description="The model that was quantized.")
    maptools_version: str = Field("0.1.0", description="The maptools version that wrote the map.")
    created: str | None = Field(None, description="When the map was written (ISO 8601, UTC).")
    settings: dict[str, Any] = Field(default_factory=dict, description="The quantization settings "
                                     "(QuantSettings.to_dict(), plus the run's budget and thread count).")
    device: str | None = Field(None, description="Where PPQ ran: cpu or cuda[:N].")
    calib_steps_used: int | None = Field(None, description="Calibration samples PPQ read.")
    calibration: dict[str, Any] = Field(default_factory=dict, description="The calibration data: its kind, "
                                        "description, sample count and a sha256 of its content.")
    onnx_export_exact: bool = Field(False, description="Whether quant_model.onnx computes what the integer "
                                    "simulation does (true at every width since the Clip after each "
                                    "DequantizeLinear).")
    profile: str = Field(default="extended", description="The contract quantinfo.pkl/quantparams.pkl follow: seed "
                         "(the original toolchain's) or extended (this package's; maps before 0.3 are).")
    placement: PlacementReport | None = Field(default=None, description="What runs on the device and on the host "
                                              "(and why), and the crossbars' share of the multiply-accumulates.")
    versions: dict[str, str | None] = Field(default_factory=dict, description="Versions of Python and of the "
                                            "packages that decide a result (maptools, ppq, torch, onnx, ...).")
    notes: list[str] = Field(default_factory=list, description="What a user should know about this run: "
                             "samples reused, random calibration data, operators kept on the host, ...")
    seconds: dict[str, float] = Field(default_factory=dict, description="Time of each step of the run.")

    def to_json(self) -> dict[str, Any]:
        """The manifest as written (unknown keys kept, unset defaults left out)."""
        return self.model_dump(mode="json", exclude_unset=True)


def parse_manifest(data: Any, where: str) -> Manifest:
    """``data`` (parsed JSON) as a :class:`Manifest`, or an ArtifactError naming the bad fields."""
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        bad = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'manifest'}: {err['msg']}"
                        for err in e.errors()[:5])
        raise ArtifactError(f"{where} is not a maptools manifest ({bad}).",
                            "re-run quantization for this map; do not edit manifests by hand.") from None
