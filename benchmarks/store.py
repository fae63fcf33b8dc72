"""Maps on an S3-compatible store against local disk: upload, download and end-to-end quantize of ResNet18.

    python benchmarks/store.py             # 5 rounds of each transfer, 3 quantizations each way (~3 min)
    python benchmarks/store.py --rounds 9

Starts ``moto_server`` on loopback (the same S3-compatible server as the tests; on a real bucket the
network sets the times), quantizes ResNet18 (random weights, 32 random samples) once, then measures,
as medians in one run:
- upload of the whole map as a new version (all artifacts new), and of an unchanged map (the store
  copies identical artifacts itself), against copying the files into a new local version;
- download into an empty mirror, sha256 of every file checked, against verifying the local map;
- ``quantize`` end to end with ``output_root`` on the store against a local folder.
Writes ``benchmarks/results/store.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable
from typing import Any
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from maptools import quantize  # noqa: E402
from maptools.examples import RESNET18_SHAPES, resnet18_onnx  # noqa: E402
from maptools.maps.folder import MapFolder  # noqa: E402
from maptools.maps.store import StoreMapFolder  # noqa: E402
from benchmarks.crossbar import _median  # noqa: E402
from tests.s3 import new_bucket, start_s3_server  # noqa: E402


def median_seconds(rounds: int, step: Callable[[], Any]) -> float:
    return _median(step, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quantize-rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="maptools-store-"))
    with start_s3_server(work) as env:
        os.environ.update(env)
        os.environ["MAPTOOLS_CACHE"] = str(work / "cache")
        url = f"s3://{new_bucket()}/bench"
        model = resnet18_onnx(work / "resnet18.onnx")
        local = quantize(RESNET18_SHAPES, "cpu", model, mapname="r18", calib_steps=32, output_root=work / "local",
                         threads=1)
        version = local.version_dir
        size = sum(p.stat().st_size for p in version.iterdir())

        def upload_new() -> None:
            target = StoreMapFolder(f"r18-{uuid.uuid4().hex[:6]}", url)
            with target.lock():
                target._upload(version)

        unchanged = StoreMapFolder("r18-same", url)

        def upload_unchanged() -> None:
            with unchanged.lock():
                unchanged._upload(version)

        def copy_local() -> None:
            folder = MapFolder(f"r18-{uuid.uuid4().hex[:6]}", work / "copies")
            with folder.write() as stage:
                for f in version.iterdir():
                    shutil.copy2(f, stage / f.name)

        def download() -> None:
            os.environ["MAPTOOLS_CACHE"] = str(work / f"mirror-{uuid.uuid4().hex[:6]}")
            StoreMapFolder("r18-same", url).open()

        upload_unchanged()  # the map exists, so later rounds re-upload it unchanged
        times = {
            "upload_new": median_seconds(args.rounds, upload_new),
            "upload_unchanged": median_seconds(args.rounds, upload_unchanged),
            "local_copy": median_seconds(args.rounds, copy_local),
            "download_verified": median_seconds(args.rounds, download),
            "local_verify": median_seconds(args.rounds, lambda: MapFolder("r18", work / "local").open().verify()),
        }
        os.environ["MAPTOOLS_CACHE"] = str(work / "cache")
        times["quantize_local"] = median_seconds(args.quantize_rounds, lambda: quantize(
            RESNET18_SHAPES, "cpu", model, mapname="r18q", calib_steps=32, output_root=work / "local", threads=1))
        times["quantize_store"] = median_seconds(args.quantize_rounds, lambda: quantize(
            RESNET18_SHAPES, "cpu", model, mapname=f"r18q-{uuid.uuid4().hex[:6]}", calib_steps=32, output_root=url,
            threads=1))
    shutil.rmtree(work, ignore_errors=True)
    result = {"map_mb": round(size / 1e6, 1), "rounds": args.rounds, **{k: round(v, 3) for k, v in times.items()},
              "upload_vs_local_copy": round(times["upload_new"] / times["local_copy"], 2),
              "download_vs_local_verify": round(times["download_verified"] / times["local_verify"], 2),
              "quantize_store_vs_local": round(times["quantize_store"] / times["quantize_local"], 3)}
    print(f"ResNet18 map, {result['map_mb']} MB, medians of {args.rounds} (quantize: {args.quantize_rounds}):")
    print(f"  upload, new version      {times['upload_new']:.2f} s  ({result['upload_vs_local_copy']}x a local copy, "
          f"{times['local_copy']:.2f} s)")
    print(f"  upload, unchanged map    {times['upload_unchanged']:.2f} s  (identical artifacts copied on the store)")
    print(f"  download + verify        {times['download_verified']:.2f} s  ({result['download_vs_local_verify']}x "
          f"verifying the local map, {times['local_verify']:.2f} s)")
    print(f"  quantize to the store    {times['quantize_store']:.2f} s  vs local {times['quantize_local']:.2f} s "
          f"({result['quantize_store_vs_local']}x)")
    out = ROOT / "benchmarks" / "results" / "store.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
