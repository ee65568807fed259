"""How to quantize, on the CPU it runs on: INT8 recipes side by side.

    python -m bench.quantization [--model models] [--data ../shared/data/bears] [--seconds 3]

For each `app.building.quantize.Recipe` (QDQ or QOperator; uint8 or int8 activations and weights;
per-channel or per-tensor weights; 7-bit weights; MinMax, entropy or percentile ranges; the stem or
the head kept in float; with or without ONNX Runtime's fusions first): the model is quantized from
the same training-split photos (`app.building.int8.CALIBRATION_PHOTOS`; fewer for the entropy and
percentile calibrators, `SMALL_CALIBRATION`), timed alone at batch 8 and 1 (`bench.bare`,
alternating with the FP32 graph), and compared with the FP32 graph on the validation split (which
neither training nor calibration used): top-1 agreement, accuracy, largest probability change.
Prints a Markdown table headed by the CPU's model and its SIMD flags.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from app.building.datasets import class_files, require_classes, split
from app.building.int8 import CALIBRATION_PHOTOS, calibration_sample
from app.building.quantize import Recipe, batched, quantize
from app.core.bundle import MODEL_NAME, load_bundle
from app.core.prediction import prepare_image
from app.core.runner import onnx_runner, softmax
from bench.bare import rate_in_own_process as bare

ROOT = Path(__file__).resolve().parent.parent
SMALL_CALIBRATION = 32
RECIPES: dict[str, Recipe] = {
    "QOperator U8S8 per-channel MinMax (default)": Recipe(),
    "QDQ U8S8 per-channel": Recipe(format="qdq"),
    "QDQ S8S8 per-channel": Recipe(format="qdq", activations="s8"),
    "QOperator U8U8 per-channel": Recipe(weights="u8"),
    "QOperator U8S8 per-tensor": Recipe(per_channel=False),
    "QOperator U8S8 reduce_range (7-bit weights)": Recipe(reduce_range=True),
    # ONNX Runtime's entropy and percentile calibrators hold histograms of every tensor: with 200
    # photos they outgrew 16 GB here, so they see fewer (SMALL_CALIBRATION).
    "QOperator U8S8 entropy ranges": Recipe(method="entropy"),
    "QOperator U8S8 percentile ranges": Recipe(method="percentile"),
    "QOperator U8S8, head in float": Recipe(keep_float=("head",)),
    "QOperator U8S8, stem and head in float": Recipe(keep_float=("stem", "head")),
    "QOperator U8S8 without fusions first": Recipe(optimize=False),
}


def cpu_description() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                "unknown CPU")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    simd = [f for f in flags if f.startswith(("avx", "amx")) or "vnni" in f]
    return f"{name}, {os.cpu_count()} cores; SIMD: {' '.join(simd) or 'none listed'}"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quantization", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models", help="folder with export.pkl (or bundle/)")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "bears")
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--only", default="", help="only the recipes whose name contains this")
    args = parser.parse_args()
    card = json.loads((args.model / "model-card.json").read_text())
    files = class_files(args.data, require_classes(args.data))
    train, valid = split(files, card["valid_pct"], card["seed"])
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model / "bundle"
        if not folder.is_dir():
            folder = Path(tmp) / "fp32"
            subprocess.run([sys.executable, "-m", "app.compile", str(args.model / "export.pkl"), "--out", str(folder)],
                           cwd=ROOT, check=True, capture_output=True)
        fp32 = load_bundle(folder, os.cpu_count() or 1)
        vocab = fp32.manifest.classes
        inputs = np.stack([prepare_image(p.read_bytes(), fp32.predictor) for p in valid])
        targets = np.array([vocab.index(p.parent.name) for p in valid])
        reference = fp32.predictor.infer(inputs)[0]
        sample = calibration_sample(train, CALIBRATION_PHOTOS)
        calibration = [prepare_image(p.read_bytes(), fp32.predictor) for p in sample]
        fp32_rates = (bare(folder / MODEL_NAME, 8, args.seconds), bare(folder / MODEL_NAME, 1, args.seconds))
        lines = [f"# INT8 recipes: {cpu_description()}",
                 f"{len(calibration)} calibration photos (training split), {len(valid)} validation photos; FP32 "
                 f"accuracy {(reference.argmax(1) == targets).mean():.2%}", "",
                 "| recipe | batch 8 img/s | batch 1 img/s | x FP32 (batch 8) | top-1 agreement | accuracy | "
                 "largest probability change |", "|---|---:|---:|---:|---:|---:|---:|",
                 f"| FP32 | {fp32_rates[0]:.0f} | {fp32_rates[1]:.0f} | 1.00 | - | "
                 f"{(reference.argmax(1) == targets).mean():.2%} | - |"]
        for name, recipe in RECIPES.items():
            if args.only not in name:
                continue
            model = Path(tmp) / "int8.onnx"
            photos = calibration if recipe.method == "minmax" else calibration[::len(calibration) // SMALL_CALIBRATION]
            quantize(folder / MODEL_NAME, model, batched(iter(photos)), recipe)
            run = onnx_runner(model, os.cpu_count() or 1)
            probs = np.concatenate([softmax(run(chunk)[0]) for chunk in np.array_split(inputs, 20)])
            fp32_now = bare(folder / MODEL_NAME, 8, args.seconds)  # alternating: the machine's speed drifts
            rate8, rate1 = bare(model, 8, args.seconds), bare(model, 1, args.seconds)
            if len(photos) != len(calibration):
                name += f" ({len(photos)} calibration photos)"
            lines.append(f"| {name} | {rate8:.0f} | {rate1:.0f} | {rate8 / fp32_now:.2f} | "
                         f"{(probs.argmax(1) == reference.argmax(1)).mean():.2%} | "
                         f"{(probs.argmax(1) == targets).mean():.2%} | {np.abs(probs - reference).max():.3f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
