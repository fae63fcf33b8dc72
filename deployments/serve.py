"""Serve maptools' deployments from one lab machine, without a work pool or worker.

    python deployments/serve.py      # Ctrl-C (SIGTERM) stops serving and pauses the schedules

Same deployments as prefect.yaml (the nightly example schedule starts paused), run by this process.
"""

from __future__ import annotations

from prefect import serve
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
from prefect.schedules import Cron

from maptools_flows.pipeline import (map_and_simulate, quantize_and_simulate, quantize_map_simulate,
                                     simulate_quantized_run)
from maptools_flows.quantize_model import quantize_model

UPSTREAM = ["resnet18-example", "quantize"]


def deployments() -> list:
    """The served deployments: example (paused schedule), parameterised, event-triggered, chained."""
    return [
        quantize_model.to_deployment(
            name="resnet18-example", tags=["maptools"],
            parameters={"onnx_path": "example:resnet18", "input_shapes": {"input": [1, 3, 224, 224]},
                        "mapname": "resnet18", "calib_steps": 32, "device": "auto"},
            schedules=[Cron("0 2 * * *", timezone="UTC", active=False)],
        ),
        quantize_model.to_deployment(name="quantize", tags=["maptools"]),
        simulate_quantized_run.to_deployment(
            name="simulate-on-quantized", tags=["maptools"],
            triggers=[DeploymentEventTrigger(
                expect={"prefect.flow-run.Completed"},
                match={"prefect.resource.id": "prefect.flow-run.*"},
                match_related={"prefect.resource.role": "deployment", "prefect.resource.name": UPSTREAM},
                parameters={"upstream_run": "{{ event.resource.id }}"},
            )],
        ),
        quantize_and_simulate.to_deployment(name="quantize-and-simulate", tags=["maptools"]),
        map_and_simulate.to_deployment(name="map-and-simulate", tags=["maptools"]),
        quantize_map_simulate.to_deployment(name="quantize-map-simulate", tags=["maptools"]),
    ]


if __name__ == "__main__":
    serve(*deployments())
