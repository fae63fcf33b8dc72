"""Serve maptools' deployments from one lab machine, without a work pool or worker.

    python deployments/serve.py                          # all of them; Ctrl-C (SIGTERM) stops serving
    python deployments/serve.py quantize                 # only some: e.g. quantization on the GPU box ...
    python deployments/serve.py simulate-on-quantized    # ... and the triggered downstream stage on a CPU box

Same deployments as prefect.yaml (the nightly example schedule starts paused), run by this process.
On several machines, keep maps and results on a shared store (docs/s3.md, "Several machines").
"""

from __future__ import annotations

import sys

from prefect import serve
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
from prefect.schedules import Cron
from prefect.types.entrypoint import EntrypointType

from maptools_flows.pipeline import (map_and_simulate, quantize_and_simulate, quantize_map_simulate,
                                     simulate_quantized_run)
from maptools_flows.quantize_model import quantize_model

UPSTREAM = ["resnet18-example", "quantize"]


def deployments() -> list:
    """The served deployments: example (paused schedule), parameterised, event-triggered, chained.

    Entry points are module paths (``maptools_flows.quantize_model.quantize_model``), as in prefect.yaml, so
    results name the installed package's types (a file path would load the flows as bare modules)."""
    module = {"entrypoint_type": EntrypointType.MODULE_PATH}
    return [
        quantize_model.to_deployment(
            name="resnet18-example", tags=["maptools"], **module,
            parameters={"onnx_path": "example:resnet18", "input_shapes": {"input": [1, 3, 224, 224]},
                        "mapname": "resnet18", "calib_steps": 32, "device": "auto"},
            schedules=[Cron("0 2 * * *", timezone="UTC", active=False)],
        ),
        quantize_model.to_deployment(name="quantize", tags=["maptools"], **module),
        simulate_quantized_run.to_deployment(
            name="simulate-on-quantized", tags=["maptools"], **module,
            triggers=[DeploymentEventTrigger(
                expect={"prefect.flow-run.Completed"},
                match={"prefect.resource.id": "prefect.flow-run.*"},
                match_related={"prefect.resource.role": "deployment", "prefect.resource.name": UPSTREAM},
                parameters={"upstream_run": "{{ event.resource.id }}"},
            )],
        ),
        quantize_and_simulate.to_deployment(name="quantize-and-simulate", tags=["maptools"], **module),
        map_and_simulate.to_deployment(name="map-and-simulate", tags=["maptools"], **module),
        quantize_map_simulate.to_deployment(name="quantize-map-simulate", tags=["maptools"], **module),
    ]


def selected(names: list[str]) -> list:
    """The deployments named (all when none is); an unknown name is an error listing the known ones."""
    known = {d.name: d for d in deployments()}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown deployment(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return [known[n] for n in names] if names else list(known.values())


if __name__ == "__main__":
    serve(*selected(sys.argv[1:]))
