"""The ``quantize-model`` flow: prepare -> calibset -> quantize -> report -> convert."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Literal

from prefect import flow, get_run_logger
from pydantic import Field

from maptools_flows.credentials import AwsCredentialsBlock, credentials
from maptools_flows.params import choice, documented, setting
from maptools_flows.results import SERIALIZER, ensure_result_storage
from maptools_flows.tasks import (EvaluationSpec, build_calibset, convert, evaluate_quantized, is_transient,
                                  prepare_model, publish_report, run_quantization)
from maptools.maps.artifacts import output_location, validate_mapname
from maptools.conversion import GRAPH_FILE, ConversionResult
from maptools.device import resolve_device
from maptools.errors import SettingsError
from maptools.evaluation import EVAL_SEED, OutputError
from maptools.quantization.mixed_precision import Budget
from maptools.quantization import QuantizationResult
from maptools.settings import MULTIPLIER_BITS, QuantSettings
from maptools.stages import CalibrationSpec, PreparedOnnx, has_artifact, located

__all__ = ["quantize_model", "QuantizeModelResult"]


@dataclass(frozen=True)
class QuantizeModelResult:
    """What the flow produced; another flow consumes this instead of re-deriving paths."""

    mapname: str
    model: PreparedOnnx
    calibration: CalibrationSpec
    quantization: QuantizationResult
    conversion: ConversionResult | None
    quantization_cached: bool
    seconds: dict[str, float]
    #: output error of quant_model.onnx against float on held-out inputs (None with eval_samples=0; its ``source``
    #: says which)
    evaluation: OutputError | None = None

    @property
    def map_dir(self) -> str:
        return str(self.quantization.map_dir)


#: the values of the QuantSettings fields a form offers as a drop-down
Algorithm = choice(QuantSettings, "algorithm")
Sign = choice(QuantSettings, "activation_sign")
Pass = choice(QuantSettings, "optimization")
ScaleKind = choice(QuantSettings, "scale_policy")
ProfileName = choice(QuantSettings, "profile")


@flow(name="quantize-model", persist_result=True, result_serializer=SERIALIZER)
@documented
def quantize_model(
    onnx_path: Annotated[str, Field(description="ONNX model file as exported (prepared here: fixed dims, opset "
                                                "13, onnxsim unless simplify=false), or "
                                                "a built-in example: example:resnet18, example:small_cnn.")],
    input_shapes: Annotated[dict[str, list[int]], Field(description="Shape of every model input, e.g. "
                                                                    '{"input": [1, 3, 224, 224]}.')],
    mapname: Annotated[str, Field(description="Folder name under mapsave/.")],
    calib: Annotated[str | None, Field(description="'random' (or null) for seeded random data, or a folder "
                                                   "of images / .npy / .npz files.")] = None,
    calib_steps: Annotated[int, setting(QuantSettings, "calib_steps")] = 32,
    device: Annotated[str, Field(description="cpu, cuda or auto (auto may fall back to cpu).")] = "auto",
    bit_width: Annotated[Annotated[int, Field(ge=2, le=8)] | Literal["auto"], Field(
        description="Weight and activation bits, or auto: per-layer widths under max_output_error, max_error_ratio or "
                    "max_weight_bytes.")] = 8,
    weight_bits: Annotated[int | None, setting(QuantSettings, "weight_bits", " Overrides bit_width.")] = None,
    activation_bits: Annotated[int | None,
                               setting(QuantSettings, "activation_bits", " Overrides bit_width.")] = None,
    per_channel: Annotated[bool, setting(QuantSettings, "per_channel")] = True,
    algorithm: Annotated[Algorithm, setting(QuantSettings, "algorithm")] = "auto",
    seed: Annotated[int, setting(QuantSettings, "seed")] = 0,
    activation_sign: Annotated[Sign | None,
                               setting(QuantSettings, "activation_sign")] = None,
    optimization: Annotated[Pass,
                            setting(QuantSettings, "optimization")] = "none",
    scale_policy: Annotated[ScaleKind,
                            setting(QuantSettings, "scale_policy")] = "float",
    shared_scales: Annotated[bool | None, setting(QuantSettings, "shared_scales")] = None,
    profile: Annotated[ProfileName, setting(QuantSettings, "profile")] = "seed",
    multiplier_bits: Annotated[int, setting(QuantSettings, "multiplier_bits")] = MULTIPLIER_BITS,
    layer_bits: Annotated[dict[str, list[int]] | None, setting(QuantSettings, "layer_bits")] = None,
    max_output_error: Annotated[float | None, Field(gt=0, description="bit_width=auto: the largest output error "
                                                                       "(rel. L2 against float) allowed.")] = None,
    max_error_ratio: Annotated[float | None, Field(ge=1, description="bit_width=auto: the largest output error "
                                                                     "as a multiple of the all-8-bit error.")] = None,
    max_weight_bytes: Annotated[int | None, Field(gt=0, description="bit_width=auto: the largest weight memory "
                                                                    "(bytes) allowed.")] = None,
    threads: Annotated[int | None, Field(ge=1, description="torch threads while PPQ runs (default: the cores "
                                                           "free when it starts); not part of the cache key.")
    ] = None,
    output_root: Annotated[str | None, Field(description="Where mapsave/ goes (default: $MAPTOOLS_HOME or the "
                                                         "working directory).")] = None,
    simplify: Annotated[bool, Field(description="Run onnxsim while preparing (checked against the original).")
                        ] = True,
    refresh: Annotated[bool, Field(description="Recompute even if a cached result exists.")] = False,
    run_conversion: Annotated[bool, Field(description="Build the operator graph after quantizing.")] = True,
    strict: Annotated[bool, Field(description="Fail where PPQ fails at an operator (or preparation leaves a step "
                                              "out), instead of keeping that operator on the host in float.")] = False,
    keep_on_host: Annotated[list[str] | None, Field(description="Operators of the prepared model to keep on the "
                                                                "host in float.")] = None,
    eval_samples: Annotated[int, Field(ge=0, le=10000, description="Held-out inputs the summary's output error "
                                                                   "against float is measured on (0 skips it).")] = 16,
    eval_set: Annotated[str | None, Field(description="A labelled .npz (inputs and labels) to measure the output "
                                                      "error and accuracy on, or a folder of samples; default: the "
                                                      "calibration folder, from the first sample quantization did not "
                                                      "read (seeded random inputs where calib is random).")] = None,
    aws_credentials: AwsCredentialsBlock = None,
) -> QuantizeModelResult:
    """Quantize an ONNX model with PPQ and hand its quantinfo to the conversion stage.

    Quantization is cached on content (model bytes, calibration data, settings, code): a rerun
    with the same inputs returns the previous artifacts after checking their sha256.
    """
    with credentials(aws_credentials):
        logger = get_run_logger()
        ensure_result_storage()
        seconds: dict[str, float] = {}
        started = time.perf_counter()
        # Bad settings fail here, once, before any work (they are never retried).
        budget = None
        limits = {"output_error": max_output_error, "error_ratio": max_error_ratio, "weight_bytes": max_weight_bytes}
        if bit_width == "auto" or any(v is not None for v in limits.values()):
            if bit_width != "auto":
                raise SettingsError("max_output_error / max_error_ratio / max_weight_bytes apply to bit_width='auto' "
                                    "only.", "pass bit_width='auto', or drop the budget.")
            budget = Budget.of({k: v for k, v in limits.items() if v is not None}).to_json()
        if budget and (weight_bits is not None or activation_bits is not None or layer_bits):
            raise SettingsError("bit_width='auto' chooses the widths; weight_bits, activation_bits and layer_bits "
                                "cannot be given with it.", "drop them, or pass a number as bit_width.")
        bits = max(Budget.of(budget).weight_choices) if budget else bit_width
        settings = QuantSettings(
            weight_bits=bits if weight_bits is None else weight_bits,
            activation_bits=bits if activation_bits is None else activation_bits,
            per_channel=per_channel, algorithm=algorithm, calib_steps=calib_steps, seed=seed,
            activation_sign=activation_sign, optimization=optimization, scale_policy=scale_policy,
            shared_scales=shared_scales, multiplier_bits=multiplier_bits, layer_bits=layer_bits or {}, profile=profile)
        validate_mapname(mapname)
        resolved_device = resolve_device(device)
        root = str(output_location(output_root))

        t = time.perf_counter()
        model = prepare_model(onnx_path, input_shapes, simplify, root, calib)
        seconds["prepare"] = time.perf_counter() - t
        logger.info("prepared %s -> %s: %s (max |diff| from the original on random inputs: %.2e)", onnx_path,
                    model.path, "; ".join(model.steps) or "nothing to change", model.max_abs_diff)
        if calib is None or calib == "random":
            logger.warning("calibrating on seeded random data: fine for trying the pipeline, not for accuracy; "
                           "pass calib=<folder of real samples>")
        t = time.perf_counter()
        calibration = build_calibset(calib, input_shapes, calib_steps, seed)
        seconds["calibset"] = time.perf_counter() - t

        args = dict(model=model, calibration=calibration, input_shapes=input_shapes, mapname=mapname, device=device,
                    settings=settings, output_root=root, budget=budget, threads=threads, strict=strict,
                    keep_on_host=keep_on_host or [])
        t = time.perf_counter()
        state = run_quantization.with_options(refresh_cache=refresh)(**args, return_state=True)
        if state.is_failed() and device == "auto" and resolved_device != "cpu" and is_transient(None, None, state):
            logger.warning("quantization on %s failed after retries (%s); device='auto' allows falling back to cpu",
                           resolved_device, state.result(raise_on_failure=False))
            state = run_quantization.with_options(refresh_cache=True)(**{**args, "device": "cpu"}, return_state=True)
        result: QuantizationResult = state.result()
        cached = state.name == "Cached"
        here = located(result) if cached else result  # a hit may come from another machine: checked (and fetched) here
        if here is None:
            logger.warning("cached artifacts of %s in %s are missing or changed; recomputing", mapname, result.map_dir)
            result = run_quantization.with_options(refresh_cache=True)(**args)
            cached = False
        else:
            result = here
        seconds["quantize"] = time.perf_counter() - t

        t = time.perf_counter()
        converted = convert(result) if run_conversion else None
        if converted is not None and not has_artifact(mapname, root, GRAPH_FILE):
            converted = convert.with_options(refresh_cache=True)(result)
        seconds["convert"] = time.perf_counter() - t
        evaluation = None
        if eval_samples:
            t = time.perf_counter()
            # by default the calibration folder after the calibrated samples: keyed on the hash build-calibset took
            spec = EvaluationSpec.of(eval_set, eval_samples, EVAL_SEED) if eval_set else \
                EvaluationSpec(calibration.source, calibration.sha256 if calibration.source else None, eval_samples,
                               EVAL_SEED)
            evaluation = evaluate_quantized(result, spec)
            seconds["evaluate"] = time.perf_counter() - t
            agreement = evaluation.top1_agreement
            logger.info("%s: output error against float %.3f%% (rel. L2)%s on %d inputs (%s)", mapname,
                        100 * evaluation.rel_l2,
                        "" if agreement is None else f", top-1 agreement {100 * agreement:.1f}%", evaluation.samples,
                        evaluation.source)
        seconds["total"] = time.perf_counter() - started
        publish_report(result, seconds, onnx_path, evaluation)
        logger.info("%s: artifacts in %s (%s)", mapname, result.map_dir, "cached" if cached else "computed")
        return QuantizeModelResult(mapname=mapname, model=model, calibration=calibration, quantization=result,
                                   conversion=converted, quantization_cached=cached, seconds=seconds,
                                   evaluation=evaluation)
