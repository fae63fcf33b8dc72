"""The design sweep's configuration: models x grid (any quantization setting, crossbar axes), read from YAML
or TOML, and the points it expands to (``SweepPoint``: one quantization each, its mapname and table row)."""

from __future__ import annotations

import itertools
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from maptools.errors import SweepConfigError
from maptools.evaluation import EVAL_SEED
from maptools.examples import EXAMPLES
from maptools.crossbar.device import DEVICE_PRESETS, DeviceModel
from maptools.crossbar.mapping import CrossbarSpec
from maptools.settings import QuantSettings
from maptools.maps.store import is_url

__all__ = ["SweepConfig", "ModelSpec", "Grid", "SweepPoint", "SweepConfigError", "load_config", "COLUMNS",
           "DEDICATED_AXES", "CROSSBAR_AXES"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """One model of the sweep: an ONNX file (with its input shapes) or a built-in example."""

    name: str | None = Field(None, description="Short name for mapnames and the table (default: file stem / example).")
    path: str | None = Field(None, description="ONNX model file.")
    example: Literal["small_cnn", "resnet18"] | None = Field(None, description="A built-in example model instead.")
    input_shapes: dict[str, list[int]] | None = Field(None, description="Shape of every input, e.g. "
                                                      "{input: [1, 3, 224, 224]}; default for examples.")
    calib: str | None = Field(None, description="'random' (default) or a folder of images / .npy / .npz files.")
    eval_set: str | None = Field(None, description="Labelled evaluation set: .npz with 'labels' and one array per "
                                                   "input, or a folder of samples; default: the calibration folder "
                                                   "from the first sample a point's quantization did not read "
                                                   "(seeded random inputs where calib is random).")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.path is None) == (self.example is None):
            raise ValueError("give exactly one of 'path' (an ONNX file) or 'example' (small_cnn or resnet18)")
        if self.path is not None and self.input_shapes is None:
            raise ValueError("'input_shapes' is required with 'path', e.g. {input: [1, 3, 224, 224]}")
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", self.name):
            raise ValueError(f"name {self.name!r} must be letters, digits, '.', '_' or '-'")
        return self

    @property
    def label(self) -> str:
        return self.name or self.example or Path(str(self.path)).stem

    def shapes(self) -> dict[str, list[int]]:
        if self.input_shapes is not None:
            return self.input_shapes
        return {k: list(v) for k, v in EXAMPLES[str(self.example)][1].items()}


#: crossbar fields the grid varies with an axis of its own
CROSSBAR_AXES = {"rows": "xbar", "cols": "xbar", "cell_bits": "cell_bits", "adc_bits": "adc_bits",
                       "adc_range": "adc_range"}
#: settings the grid varies with an axis of its own
DEDICATED_AXES = {"weight_bits": "bits", "activation_bits": "bits", "per_channel": "per_channel",
              "algorithm": "algorithms", "calib_steps": "calib_samples", "seed": "seed (the config's)"}


def _more_axes(value: dict[str, list[Any]], where: str, model: type[BaseModel], dedicated: dict[str, str],
               what: str) -> dict[str, list[Any]]:
    """Axes of any field of ``model`` but the ``dedicated`` ones, each with values."""
    for name, values in value.items():
        if name in dedicated:
            raise ValueError(f"vary {name} with the grid's {dedicated[name]!r} axis")
        if name not in model.model_fields:
            raise ValueError(f"{name!r} is not {what} (one of: "
                             f"{', '.join(n for n in model.model_fields if n not in dedicated)})")
        if not values:
            raise ValueError(f"{where}.{name} has no values")
    return value


class Grid(_Strict):
    """The design space. Values are checked per point (a bad one fails only its points, with maptools' message)."""

    bits: list[int] = Field(min_length=1, description="Weight and activation bits (2..8).")
    per_channel: list[bool] = Field([True], min_length=1, description="Per-channel (true) / per-tensor (false).")
    algorithms: list[str] = Field(["percentile"], min_length=1,
                                  description="percentile (one calibration a point), minmax, kl, mse, auto.")
    calib_samples: list[int] = Field([32], min_length=1, description="Calibration samples (8..512).")
    xbar: list[str] = Field([], description="Crossbar sizes ROWSxCOLS; with adc_bits, every quantized point is "
                                            "also mapped and simulated on each crossbar.")
    cell_bits: list[int] = Field([2], min_length=1, description="Bits per cell of the crossbar points.")
    adc_bits: list[int] = Field([], description="ADC bits of the crossbar points (e.g. [4, 5, 6, 7, 8]).")
    adc_range: list[str] = Field(["full"], min_length=1, description="ADC ranges of the crossbar points: full, "
                                                                    "calibrated, max (see CrossbarSpec.adc_range).")
    settings: dict[str, list[Any]] = Field({}, description="More axes: any other quantization setting (a field of "
                                                           "maptools.settings.QuantSettings) and its values, e.g. "
                                                           "{scale_policy: [float, pow2]}.")
    crossbar: dict[str, list[Any]] = Field({}, description="More crossbar axes: any other field of "
                                                           "maptools.CrossbarSpec (dac_bits, encoding, max_arrays) and "
                                                           "its values, e.g. {encoding: [differential, offset]}.")
    device: dict[str, list[Any]] = Field({}, description="Device axes: 'preset' (names of maptools.DEVICE_PRESETS, or "
                                                         "null for ideal cells) and any field of maptools.DeviceModel, "
                                                         "e.g. {preset: [pcm], compensation: [true, false]}; every "
                                                         "crossbar point is also simulated on each device, read at "
                                                         "each of 'times'.")
    times: list[float] = Field([0.0], min_length=1, description="Times after programming (s) at which the device "
                                                                "points are read, e.g. [1, 3600, 86400, 31536000].")
    device_trials: int = Field(8, ge=1, le=1000, description="Monte Carlo trials of each device point.")

    @field_validator("settings")
    @classmethod
    def _setting_axes(cls, value: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return _more_axes(value, "settings", QuantSettings, DEDICATED_AXES, "a quantization setting")

    @field_validator("crossbar")
    @classmethod
    def _more_crossbar_axes(cls, value: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return _more_axes(value, "crossbar", CrossbarSpec, CROSSBAR_AXES, "a crossbar setting")

    @field_validator("device")
    @classmethod
    def _device_axes(cls, value: dict[str, list[Any]]) -> dict[str, list[Any]]:
        unknown = [p for p in value.get("preset", []) if p is not None and p not in DEVICE_PRESETS]
        if unknown or ("preset" in value and not value["preset"]):
            raise ValueError(f"device.preset: {unknown or 'no values'}; use names of maptools.DEVICE_PRESETS "
                             f"({', '.join(DEVICE_PRESETS)}) or null")
        _more_axes({k: v for k, v in value.items() if k != "preset"}, "device", DeviceModel, {}, "a device setting")
        return value

    @model_validator(mode="after")
    def _crossbar_axes(self) -> Grid:
        if bool(self.xbar) != bool(self.adc_bits):
            raise ValueError("give both 'xbar' and 'adc_bits' for crossbar points (or neither)")
        if self.device and not self.xbar:
            raise ValueError("device points need crossbar points: give 'xbar' and 'adc_bits' too")
        return self

    def device_runs(self) -> DeviceRuns | None:
        """The device points of every crossbar point (None without device axes)."""
        if not self.device:
            return None
        return DeviceRuns([dict(zip(self.device, v)) for v in itertools.product(*self.device.values())],
                          list(self.times), self.device_trials)

    def crossbars(self) -> list[dict[str, Any]]:
        """The axes of every crossbar point: ``xbar``, ``cell_bits``, ``adc_bits``, ``adc_range`` and those of
        ``crossbar`` (checked when it runs)."""
        axes = {"xbar": self.xbar, "cell_bits": self.cell_bits, "adc_bits": self.adc_bits,
                "adc_range": self.adc_range, **self.crossbar}
        return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


@dataclass(frozen=True)
class DeviceRuns:
    """Each device point's axes (``preset`` and DeviceModel fields), the read times and the trials."""

    axes: list[dict[str, Any]]
    times: list[float]
    trials: int

    @staticmethod
    def model(axes: dict[str, Any]) -> DeviceModel:
        """The device of one point: the preset (ideal cells without one) with the other axes' values."""
        preset = axes.get("preset")
        base = DEVICE_PRESETS[preset] if preset is not None else DeviceModel()
        return base.replace(**{k: v for k, v in axes.items() if k != "preset"})


class SweepConfig(_Strict):
    """A design-space sweep: models x grid, where it runs and what it writes."""

    name: str = Field("sweep", pattern=r"^[a-z0-9][a-z0-9-]{0,63}$",
                      description="Sweep name: folder sweeps/<name>/ and artifact keys (lowercase, digits, dashes).")
    models: list[ModelSpec] = Field(min_length=1)
    grid: Grid
    device: str = Field("cpu", description="cpu, cuda or auto; with cuda one point runs per GPU at a time.")
    seed: int = Field(0, ge=0, description="Seed of random calibration data.")
    eval_samples: int = Field(32, ge=1, le=10000, description="Evaluation samples (random inputs, or the first N "
                                                              "of a labelled set).")
    eval_seed: int = Field(EVAL_SEED, ge=0, description="Seed of random evaluation inputs (held out from calibration).")
    simplify: bool = Field(True, description="onnxsim each model while preparing it.")
    output_root: str | None = Field(None, description="Where mapsave/ and sweeps/ go (default $MAPTOOLS_HOME or the "
                                                      "working directory).")
    workers: int = Field(2, ge=1, le=256, description="Workers of the local Dask cluster (ignored with dask_address).")
    dask_address: str | None = Field(None, description="An existing Dask scheduler, e.g. tcp://host:8786.")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", value.strip().lower()):
            raise ValueError("use cpu, cuda, cuda:N or auto")
        return value.strip().lower()

    @model_validator(mode="after")
    def _unique_models(self) -> SweepConfig:
        labels = [m.label for m in self.models]
        duplicates = sorted({x for x in labels if labels.count(x) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique; repeated: {', '.join(duplicates)} (set 'name')")
        return self

    def points(self) -> list[SweepPoint]:
        g = self.grid
        extra = [[(name, v) for v in values] for name, values in g.settings.items()]
        return [SweepPoint(m.label, b, pc, a, n, tuple(more)) for m in self.models
                for b, pc, a, n, *more in itertools.product(g.bits, g.per_channel, g.algorithms, g.calib_samples,
                                                            *extra)]


def _summarise(error: ValidationError) -> str:
    parts = []
    for e in error.errors():
        where = ".".join(str(x) for x in e["loc"]) or "config"
        parts.append(f"{where}: {e['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def load_config(path: str | Path, **overrides: Any) -> SweepConfig:
    """Read a YAML (.yaml/.yml) or TOML (.toml) sweep config; relative paths in it are relative to the file.

    Raises:
        SweepConfigError: a missing file, a syntax error, or bad fields (all of them, in one line).
    """
    path = Path(path)
    if not path.is_file():
        raise SweepConfigError(f"sweep config {path} does not exist.", "pass a .yaml or .toml file (see "
                                                                       "examples/sweep.yaml).")
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SweepConfigError(f"{path} is not valid {'TOML' if path.suffix.lower() == '.toml' else 'YAML'}: "
                               f"{' '.join(str(e).split())}", "fix the syntax.") from None
    if not isinstance(data, dict):
        raise SweepConfigError(f"{path} holds {type(data).__name__}, not a mapping of settings.",
                               "start from examples/sweep.yaml.")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        config = SweepConfig.model_validate(data)
    except ValidationError as e:
        raise SweepConfigError(f"{path}: {_summarise(e)}.", "see examples/sweep.yaml for the fields.") from None
    return config.model_copy(update={"models": [_resolve_paths(m, path.parent) for m in config.models],
                                     "output_root": _relative_to(config.output_root, path.parent)})


def _relative_to(value: str | None, base: Path) -> str | None:
    if value is None or value == "random" or is_url(value):
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _resolve_paths(model: ModelSpec, base: Path) -> ModelSpec:
    return model.model_copy(update={k: _relative_to(getattr(model, k), base) for k in ("path", "calib", "eval_set")})


#: the columns of the sweep's table (results.csv), one row per point and per crossbar evaluation of it
COLUMNS = ["model", "bits", "per_channel", "algorithm", "calib_samples", "settings", "mapname", "status", "cached", "rel_l2",
           "cosine", "top1_agreement", "accuracy", "float_accuracy", "worst_snr", "worst_layer", "median_snr",
           "weight_bytes", "artifact_bytes", "seconds", "quantize_seconds", "verified", "worker", "map_dir", "error",
           "xbar", "cell_bits", "adc_bits", "adc_range", "crossbar", "arrays", "utilization", "integer_rel_l2",
           "integer_agreement", "energy_uj", "latency_us", "device", "time_s", "trials", "rel_l2_std",
           "accuracy_std"]


@dataclass(frozen=True)
class SweepPoint:
    model: str
    bits: int
    per_channel: bool
    algorithm: str
    calib_samples: int
    settings: tuple[tuple[str, Any], ...] = ()  # the grid's other axes: (QuantSettings field, value)

    @property
    def mapname(self) -> str:
        algorithm = re.sub(r"[^A-Za-z0-9]+", "_", str(self.algorithm)) or "_"
        more = "".join(f"-{re.sub(r'[^A-Za-z0-9]+', '_', f'{n}_{v}')}" for n, v in self.settings)
        return f"{self.model}-w{self.bits}-{'pc' if self.per_channel else 'pt'}-{algorithm}-n{self.calib_samples}{more}"

    def quant_settings(self, seed: int) -> QuantSettings:
        """The point's settings (SettingsError for a value maptools refuses: only this point fails)."""
        return QuantSettings(weight_bits=self.bits, activation_bits=self.bits, per_channel=self.per_channel,
                             algorithm=self.algorithm, calib_steps=self.calib_samples, seed=seed,
                             **dict(self.settings))

    def row(self, **values: Any) -> dict[str, Any]:
        base = {c: None for c in COLUMNS}
        base.update(model=self.model, bits=self.bits, per_channel=self.per_channel, algorithm=self.algorithm,
                    calib_samples=self.calib_samples, mapname=self.mapname,
                    settings=json.dumps(dict(self.settings), default=str) if self.settings else None)
        base.update(values)
        return base


