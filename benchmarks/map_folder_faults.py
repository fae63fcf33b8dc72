"""The map folder under faults: kill -9 at random moments of a write, and a reader polling a map
while it is rewritten.

    python benchmarks/map_folder_faults.py               # 12 kills, 20 rewrites (~3 min on 2 cores)
    python benchmarks/map_folder_faults.py --kills 30 --rewrites 50

Kills: a child process quantizes the small CNN into an existing map and is SIGKILLed after a
random delay (0.5-6 s, so the kill lands anywhere from calibration to the swap); after each kill
the map must verify, and the next write must leave no staging folder behind. Reads: a thread
verifies the map and reads quantinfo and quantparams in a loop while the main thread rewrites it;
every read must see one whole version. Prints the counts and writes
``benchmarks/results/map_folder_faults.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from maptools import quantize, read_quantinfo, read_quantparams  # noqa: E402
from maptools.maps.artifacts import verify_map  # noqa: E402
from maptools.errors import MaptoolsError  # noqa: E402
from maptools.examples import SMALL_CNN_SHAPES, small_cnn_onnx  # noqa: E402


def _staging(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "mapsave").iterdir() if ".incomplete" in p.name)


def kills(model: Path, root: Path, count: int, rng: random.Random) -> dict[str, int]:
    quantize(SMALL_CNN_SHAPES, "cpu", model, mapname="m", calib_steps=8, output_root=root)
    code = (f"from maptools import quantize\nquantize({SMALL_CNN_SHAPES!r}, 'cpu', {str(model)!r}, mapname='m', "
            f"calib_steps=8, seed=1, output_root={str(root)!r})\n")
    broken = left = completed = 0
    for _ in range(count):
        child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 6.0))
        if child.poll() is not None:
            completed += 1
        child.send_signal(signal.SIGKILL)
        child.wait()
        try:
            verify_map(root / "mapsave" / "m")
        except MaptoolsError:
            broken += 1
        quantize(SMALL_CNN_SHAPES, "cpu", model, mapname="m", calib_steps=8, output_root=root)
        left += bool(_staging(root))
    return {"kills": count, "finished_before_the_kill": completed, "maps_not_verifying_after_a_kill": broken,
            "staging_left_after_the_next_write": left}


def reads(model: Path, root: Path, rewrites: int) -> dict[str, int]:
    quantize(SMALL_CNN_SHAPES, "cpu", model, mapname="r", calib_steps=8, output_root=root)
    stop, counts, failures = threading.Event(), [0], []

    def reader() -> None:
        while not stop.is_set():
            try:
                seed = verify_map(root / "mapsave" / "r")["settings"]["seed"]
                read_quantinfo("r", root), read_quantparams("r", root)
                assert seed in range(rewrites + 1)
                counts[0] += 1
            except Exception as e:  # noqa: BLE001  (every failure is counted and shown)
                failures.append(f"{type(e).__name__}: {e}")

    thread = threading.Thread(target=reader)
    thread.start()
    for seed in range(1, rewrites + 1):
        quantize(SMALL_CNN_SHAPES, "cpu", model, mapname="r", calib_steps=8, seed=seed, output_root=root)
    stop.set()
    thread.join()
    return {"rewrites": rewrites, "reads": counts[0], "inconsistent_reads": len(failures),
            "examples": failures[:3]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=12)
    parser.add_argument("--rewrites", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = small_cnn_onnx(root / "small.onnx")
        results = {"kills": kills(model, root / "k", args.kills, random.Random(args.seed)),
                   "reads": reads(model, root / "r", args.rewrites)}
    print(json.dumps(results, indent=1))
    out = ROOT / "benchmarks" / "results" / "map_folder_faults.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
