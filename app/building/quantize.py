"""Static INT8 quantization of a compiled model, with ONNX Runtime's own tools only.

`quant_pre_process` (shape inference and ONNX Runtime's graph fusions), then `quantize_static`
calibrated on model inputs the caller prepares (the server's own decoding and preprocessing of
training photos). A `Recipe` names every choice, so a bundle records how it was made and the
bench (`bench/quantization.py`) can compare them on the CPU it runs on. No hand-written numerics.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from app.core.files import write_atomically

Format = Literal["qoperator", "qdq"]
Integer = Literal["u8", "s8"]
Method = Literal["minmax", "entropy", "percentile"]
# ONNX Runtime's calibrators keep every intermediate tensor of every calibration photo until the
# end (its CalibMaxIntermediateOutputs option drops, not merges, what it has collected: calibrate.py,
# onnxruntime 1.32), so the number of photos bounds the memory quantizing takes.


@dataclass(frozen=True)
class Recipe:
    """How a model is quantized. The default is what measured best on this project's CPUs
    (README, "INT8 bundles"): QOperator, uint8 activations, int8 weights per output channel, ranges
    from the calibration photos' minimum and maximum."""

    format: Format = "qoperator"
    activations: Integer = "u8"
    weights: Integer = "s8"
    per_channel: bool = True
    # Weights on 7 bits: on CPUs without VNNI, u8 x s8 products summed in pairs can saturate int16.
    reduce_range: bool = False
    method: Method = "minmax"
    keep_float: tuple[str, ...] = ()  # "head" (the final Gemm/MatMul), "stem" (the first Conv)
    optimize: bool = True  # ONNX Runtime's graph fusions before quantizing (quant_pre_process)

    def describe(self) -> dict[str, Any]:
        return {**asdict(self), "keep_float": list(self.keep_float), "tool": "onnxruntime.quantization"}


DEFAULT_RECIPE = Recipe()


class _Inputs:
    """ONNX Runtime's `CalibrationDataReader` protocol over prepared model inputs, one batch a call."""

    def __init__(self, batches: Iterable[np.ndarray]) -> None:
        self._batches: Iterator[np.ndarray] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {"input": batch}


def batched(inputs: Iterable[np.ndarray], size: int = 1) -> Iterator[np.ndarray]:
    """Model inputs (C, H, W) stacked into batches of `size` (of one shape each)."""
    pending: list[np.ndarray] = []
    for array in inputs:
        if pending and (array.shape != pending[0].shape or len(pending) == size):
            yield np.stack(pending)
            pending = []
        pending.append(array)
    if pending:
        yield np.stack(pending)


def _nodes_kept_float(model_path: Path, keep: tuple[str, ...]) -> list[str]:
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    chosen = []
    if "stem" in keep:
        chosen += [n.name for n in graph.node if n.op_type == "Conv"][:1]
    if "head" in keep:
        chosen += [n.name for n in graph.node if n.op_type in ("Gemm", "MatMul")][-1:]
    return chosen


def quantize(fp32: Path, dest: Path, calibration: Iterable[np.ndarray], recipe: Recipe = DEFAULT_RECIPE) -> None:
    """Write the INT8 copy of the ONNX model `fp32` to `dest` (atomically), its activation ranges
    measured on `calibration`, batches of model inputs."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    types = {"u8": QuantType.QUInt8, "s8": QuantType.QInt8}
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    with tempfile.TemporaryDirectory() as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_optimization=not recipe.optimize)
        quantize_static(
            prepared, quantized, _Inputs(calibration),
            quant_format=QuantFormat.QOperator if recipe.format == "qoperator" else QuantFormat.QDQ,
            activation_type=types[recipe.activations], weight_type=types[recipe.weights],
            per_channel=recipe.per_channel, reduce_range=recipe.reduce_range,
            calibrate_method=methods[recipe.method],
            nodes_to_exclude=_nodes_kept_float(prepared, recipe.keep_float),
        )
        write_atomically(dest, quantized.read_bytes())
