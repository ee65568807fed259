"""The bare forward pass, in a process of its own: `python -m bench.bare ONNX BATCH SECONDS THREADS`.

The compiled model alone, with the server's ONNX Runtime settings: no decoding, no HTTP, and no
torch in the process (whose idle OpenMP threads could slow it and flatter the service's ratio to
it). Prints JSON: images per second and CPU milliseconds per image.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from app.core.runner import onnx_runner


def input_size(onnx: Path) -> tuple[int, int]:
    """The (height, width) the compiled model was traced with."""
    import onnx as onnx_format

    dims = onnx_format.load(str(onnx)).graph.input[0].type.tensor_type.shape.dim
    return int(dims[2].dim_value), int(dims[3].dim_value)


def measure(onnx: Path, batch: int, seconds: float, threads: int) -> dict[str, float]:
    run = onnx_runner(onnx, threads)
    x = np.random.default_rng(0).standard_normal((batch, 3, *input_size(onnx))).astype(np.float32)
    run(x)
    n, t0, cpu0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        run(x)
        n += batch
    return {"rate": n / (time.perf_counter() - t0), "cpu_ms": (time.process_time() - cpu0) * 1000 / n}


def in_own_process(onnx: Path, batch: int, seconds: float = 4.0) -> dict[str, float]:
    """`measure` in a fresh process on every core: {"rate": images/s, "cpu_ms": CPU ms per image}."""
    out = subprocess.run([sys.executable, "-m", "bench.bare", str(onnx), str(batch), str(seconds),
                          str(os.cpu_count() or 1)], cwd=Path(__file__).resolve().parent.parent,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def rate_in_own_process(onnx: Path, batch: int, seconds: float = 4.0) -> float:
    return in_own_process(onnx, batch, seconds)["rate"]


if __name__ == "__main__":
    onnx, batch, seconds, threads = sys.argv[1:5]
    print(json.dumps(measure(Path(onnx), int(batch), float(seconds), int(threads))))
