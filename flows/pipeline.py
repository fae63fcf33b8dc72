"""Chaining quantization into the downstream stages (conversion, integer re-simulation).

Two ways, as users chain flows:

* ``quantize-and-simulate``: one flow running ``quantize-model`` as a subflow and passing its typed
  result to the simulation task;
* ``simulate-quantized-run``: a flow deployed with an event trigger on ``prefect.flow-run.Completed``
  of a quantization deployment; it receives the upstream run's id and reads that run's result.
"""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.client.orchestration import get_client
from pydantic import Field

from flows.quantize_model import QuantizeModelResult, quantize_model
from maptools import simulate as integer_simulation
from maptools.artifacts import map_dir
from maptools.conversion import GRAPH_FILE, convert

__all__ = ["quantize_and_simulate", "simulate_quantized_run", "simulate_map"]


@task(name="simulate-map")
def simulate_map(mapname: str, output_root: str, samples: int = 4, seed: int = 0) -> dict[str, Any]:
    """Integer re-simulation of a quantized map on seeded random inputs (converting it first if needed)."""
    if not (map_dir(mapname, output_root) / GRAPH_FILE).is_file():
        convert(mapname, output_root=output_root)
    run = integer_simulation.simulate(mapname, "random", output_root=output_root, seed=seed, batch=samples)
    summary = run.to_json()
    get_run_logger().info("simulated %s on %d inputs in %.2f s", mapname, run.batch, run.seconds)
    return summary


@flow(name="quantize-and-simulate", persist_result=True)
def quantize_and_simulate(
    onnx_path: str,
    input_shapes: dict[str, list[int]],
    mapname: str,
    calib: str | None = None,
    calib_steps: Annotated[int, Field(ge=8, le=512)] = 32,
    device: str = "auto",
    bit_width: Annotated[int, Field(ge=2, le=8)] = 8,
    output_root: str | None = None,
    samples: Annotated[int, Field(ge=1, le=256, description="Random inputs for the simulation.")] = 4,
) -> dict[str, Any]:
    """Quantize (subflow), then run the integer re-simulation on the map the subflow returned."""
    result: QuantizeModelResult = quantize_model(onnx_path, input_shapes, mapname, calib=calib,
                                                 calib_steps=calib_steps, device=device, bit_width=bit_width,
                                                 output_root=output_root)
    root = str(result.quantization.output_root)
    return {"mapname": result.mapname, "map_dir": result.map_dir,
            "simulation": simulate_map(result.mapname, root, samples)}


def _upstream_result(upstream_run: str) -> QuantizeModelResult:
    run_id = UUID(upstream_run.removeprefix("prefect.flow-run."))
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(run_id)
    if flow_run.state is None or not flow_run.state.is_completed():
        raise ValueError(f"upstream flow run {run_id} is not Completed ({flow_run.state}).")
    result = flow_run.state.result()
    # Workers load flows from their files, so the class object may differ from ours: check the shape.
    if type(result).__name__ != QuantizeModelResult.__name__ or not hasattr(result, "quantization"):
        raise TypeError(f"upstream flow run {run_id} returned {type(result).__name__}, not a QuantizeModelResult.")
    return result


@flow(name="simulate-quantized-run", persist_result=True)
def simulate_quantized_run(
    upstream_run: Annotated[str, Field(description="Flow run id of a completed quantize-model run "
                                                   "(the trigger passes {{ event.resource.id }}).")],
    samples: Annotated[int, Field(ge=1, le=256)] = 4,
) -> dict[str, Any]:
    """Event-triggered downstream stage: simulate the map a completed quantize-model run produced."""
    result = _upstream_result(upstream_run)
    get_run_logger().info("upstream run %s quantized map %s", upstream_run, result.mapname)
    root = str(result.quantization.output_root)
    summary = simulate_map(result.mapname, root, samples)
    return {"upstream_run": upstream_run, "mapname": result.mapname, "simulation": summary}
