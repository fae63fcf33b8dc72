"""ONNX conversion: the operator graph of a quantized map, written into the map.

``convert(mapname)`` builds the :class:`~maptools.opgraph.OperatorGraph` of the map's prepared
model (one node per operator, each placed on the device or the host), attaches each operator's
:class:`~maptools.quantinfo.QuantConfig` from ``quantinfo.json`` and writes the graph to
``mapsave/<mapname>/operator_graph.json``, from where :func:`read_graph` loads it back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maptools.errors import ArtifactError, MissingArtifactError, ModelError
from maptools.maps.artifacts import MODEL, QUANTINFO_JSON, QUANTPARAMS_NPZ, MapFolder, load_quantinfo, sha256_file
from maptools.maps.folder import MapVersion
from maptools.maps.roots import MapRef
from maptools.maps.manifest import Manifest
from maptools.opgraph import DEVICE, HOST, OperatorGraph, build_graph, dumps

__all__ = ["OperatorGraph", "ConversionResult", "convert", "read_graph", "graph_of", "build_graph", "GRAPH_FILE", "DEVICE",
           "HOST"]

GRAPH_FILE = "operator_graph.json"


@dataclass(frozen=True)
class ConversionResult:
    """What ``convert`` wrote: the graph file, its size and split, and where it came from."""

    mapname: str
    graph_path: Path
    model_path: Path
    model_sha256: str
    nodes: int
    edges: int
    device_ops: int
    host_ops: int
    quantized: bool
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"mapname": self.mapname, "graph_path": str(self.graph_path), "model_path": str(self.model_path),
                "model_sha256": self.model_sha256, "nodes": self.nodes, "edges": self.edges,
                "device_ops": self.device_ops, "host_ops": self.host_ops, "quantized": self.quantized,
                "seconds": self.seconds}


# --- the conversion step ------------------------------------------------------------------------------

def _check_model(model_path: Path, manifest: Manifest, mapname: str) -> None:
    if model_path.is_dir():
        raise ModelError(f"model {model_path} (for map {mapname!r}) is a folder, not an ONNX model file.",
                         "pass model_path= (--model) pointing at the .onnx file this map was quantized from.")
    if not model_path.is_file():
        raise ModelError(f"model {model_path} (for map {mapname!r}) does not exist.",
                         "pass model_path= (--model) pointing at the model this map was quantized from.")
    digest = sha256_file(model_path)
    if digest != manifest.model.sha256:
        raise ModelError(f"model {model_path} is not the model map {mapname!r} was quantized from (sha256 "
                         f"{digest[:12]}, manifest {manifest.model.sha256[:12]}).",
                         "pass the model that was quantized, or re-run quantize on this model.")


def convert(mapname: str | MapRef, model_path: str | Path | None = None, *, output_root: str | Path | None = None,
            quantized: bool = True) -> ConversionResult:
    """Build the operator graph of a quantized map and write it to ``mapsave/<mapname>/operator_graph.json``.

    The graph is built from the map's ``model.onnx``: the model as quantize prepared it (fixed
    dims, opset 13, folded BatchNorm), so its operators are exactly those quantinfo describes.

    Args:
        mapname: the map written by ``quantize``.
        model_path: optionally, the model that was quantized as the user gave it; it is checked
            against the manifest's sha256 (the graph still comes from the map's prepared copy).
        output_root: where ``mapsave/`` is; default ``$MAPTOOLS_HOME`` or the current directory.
        quantized: attach quantinfo (default). ``False`` writes the float graph only.

    Raises:
        ArtifactError: the map is missing or its artifacts do not match the manifest.
        ModelError: the model is missing or is not the one the map was quantized from.
        ConversionError: unsupported operators, or operators without a required quant config.
    """
    started = time.perf_counter()
    maps = MapFolder(mapname, output_root)  # takes a name or a MapRef
    mapname, version = maps.mapname, maps.open()
    manifest = version.verified(skip=frozenset({GRAPH_FILE}))  # a graph being rebuilt may be gone or stale
    if model_path is not None:
        _check_model(Path(model_path), manifest, mapname)
    path, digest = version.file(MODEL), manifest.artifacts[MODEL]  # checked by verified()
    graph = build_graph(path)
    graph.meta.update({"mapname": mapname, "model_path": str(maps.path / MODEL), "model_sha256": digest,
                       "source_sha256": manifest.model.sha256,
                       "quantinfo_sha256": manifest.artifacts[QUANTINFO_JSON],
                       "quantparams_sha256": manifest.artifacts[QUANTPARAMS_NPZ]})
    if quantized:
        graph.attach_quantinfo(load_quantinfo(version.file(QUANTINFO_JSON)))
    based_on = {k: manifest.artifacts[k] for k in (MODEL, QUANTINFO_JSON, QUANTPARAMS_NPZ)}
    maps.update({GRAPH_FILE: dumps(graph.to_json()).encode()}, {}, based_on=based_on)
    parts = [d["part"] for _, d in graph.graph.nodes(data=True)]
    return ConversionResult(
        mapname=mapname, graph_path=maps.path / GRAPH_FILE, model_path=maps.path / MODEL, model_sha256=digest,
        nodes=graph.graph.number_of_nodes(), edges=graph.graph.number_of_edges(), device_ops=parts.count(DEVICE),
        host_ops=parts.count(HOST), quantized=quantized, seconds=time.perf_counter() - started)


def read_graph(mapname: str | MapRef, output_root: str | Path | None = None, *, verify: bool = True) -> OperatorGraph:
    """Load ``operator_graph.json`` of a map; with ``verify``, check it and the artifacts it came from
    against the manifest (the graph is registered there, so an edited graph is refused)."""
    return graph_of(MapFolder(mapname, output_root).open(), verify=verify)


def graph_of(version: MapVersion, *, verify: bool = True) -> OperatorGraph:
    """:func:`read_graph` of one version of a map, as a stage that reads several of its files opened it."""
    mapname, path = version.mapname, version.file(GRAPH_FILE)
    if not path.is_file():
        raise MissingArtifactError(f"map {mapname!r} has no operator graph ({path.name} does not exist).",
                                   f"run `maptools convert --mapname {mapname}` (or convert({mapname!r})) first.")
    manifest = version.verified() if verify else None
    graph = OperatorGraph.load(path)
    if manifest is not None:
        for key, want in (("model_sha256", manifest.artifacts[MODEL]),
                          ("quantinfo_sha256", manifest.artifacts[QUANTINFO_JSON]),
                          ("quantparams_sha256", manifest.artifacts[QUANTPARAMS_NPZ])):
            if graph.meta.get(key) != want:
                raise ArtifactError(f"{path} was converted from other artifacts than map {mapname!r} now holds "
                                    f"({key} differs).", f"re-run `maptools convert --mapname {mapname}`.")
    return graph
