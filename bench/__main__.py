"""Side-by-side benchmark of this service against the course-starter baseline.

    python -m bench                      # default model (make bench)
    python -m bench --resnet34           # also a resnet34 export with random weights
    python -m bench --quick              # shorter runs, for a smoke test
    python -m bench --model DIR          # INT8 vs FP32 bundle vs the course starter (bench/precision.py)

Starts both servers on free loopback ports on the same export, drives them from a separate load
process with the same images and concurrency, times the bare forward pass in-process, and prints
one table with ratios. Everything is measured in this one run on this machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.bare import in_own_process
from bench.precision import compare
from bench.servers import ROOT, LoadResult, Server, photo, start_baseline, start_ours

MAX_BATCH = 8  # the service's default


# --- Inputs --------------------------------------------------------------------------------------


def resnet34_export(folder: Path) -> Path:
    """A resnet34 learner with random weights and the bear classes, for timing only."""
    from fastai.vision.all import (
        CategoryBlock,
        DataBlock,
        ImageBlock,
        Learner,
        Normalize,
        RandomResizedCrop,
        accuracy,
        create_vision_model,
        get_image_files,
        imagenet_stats,
        parent_label,
    )
    from torchvision.models import resnet34

    images = folder / "images"
    for cls in ("black", "grizzly", "teddys"):
        (images / cls).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            Image.new("RGB", (64, 64), (i * 90, 80, 120)).save(images / cls / f"{i}.jpg")
    block = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files,
                      get_y=parent_label, item_tfms=RandomResizedCrop(224, min_scale=0.5),
                      batch_tfms=[Normalize.from_stats(*imagenet_stats)])
    dls = block.dataloaders(images, bs=2, num_workers=0)
    learn = Learner(dls, create_vision_model(resnet34, 3, pretrained=False), metrics=accuracy)
    path = folder / "export.pkl"
    learn.export(path)
    return path


# --- Measurements --------------------------------------------------------------------------------


def bare_onnx(model: Path, batch: int, seconds: float = 4.0) -> dict[str, float]:
    """The server's compiled ONNX model alone (no decoding, no HTTP), in a process of its own:
    images per second ("rate") and CPU milliseconds per image ("cpu_ms")."""
    from app.core.detector import detector_path
    from app.core.files import sha256_file
    from app.core.runner import onnx_cache_path

    # The file the server compiled: with the detector's second output when the model has one.
    compiled = onnx_cache_path(model, sha256_file(model), with_features=detector_path(model).exists())
    return in_own_process(compiled, batch, seconds)


def bare_torch(model: Path, batch: int, seconds: float = 4.0) -> float:
    """Images per second of the learner's torch model alone, in this process."""
    import torch
    from fastai.learner import load_learner

    from bench.bare import input_size

    learn = load_learner(model, cpu=True)
    compiled = next(model.parent.glob(f"{model.stem}.*.onnx"))
    shape = (batch, 3, *input_size(compiled))
    x = torch.from_numpy(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    torch.set_num_threads(os.cpu_count() or 1)
    with torch.inference_mode():
        learn.model.eval()(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            learn.model(x)
            n += batch
    return n / (time.perf_counter() - t0)


def decode_times(data: bytes, repeat: int = 10) -> tuple[float, float]:
    """ms to decode and prepare a photo, with and without JPEG draft decoding."""
    from app.core.images import decode_image

    def timed(draft):
        t0 = time.perf_counter()
        for _ in range(repeat):
            img = decode_image(data, draft_size=draft)
            img.resize((224, 224), Image.BILINEAR)
        return (time.perf_counter() - t0) / repeat * 1000

    return timed(None), timed((512, 512))


# --- Report --------------------------------------------------------------------------------------


def bench_model(label: str, model: Path, images: dict[str, Path], levels: list[int], seconds: float,
                max_requests: int) -> list[str]:
    lines = [f"\n## {label}: {model.name} ({model.stat().st_size / 1e6:.1f} MB)"]
    for compiled in [*model.parent.glob(f"{model.stem}.*.onnx"), *model.parent.glob(f"{model.stem}.*.onnx.json")]:
        compiled.unlink()  # a first start: no ONNX cache, no record of its check
    ours = start_ours(model)
    cold_uncached = ours.cold_start_s
    ours.stop()
    ours = start_ours(model)
    baseline = start_baseline(model)
    results: dict[tuple[str, str, int], LoadResult] = {}
    try:
        for image_name, image in images.items():
            for c in levels:
                for server in (ours, baseline):
                    results[(server.name, image_name, c)] = LoadResult.run(server, image, c, seconds, max_requests)
        unbatched = start_ours(model, MAX_BATCH="1")
        try:
            for c in levels[1:]:
                results[("ours MAX_BATCH=1", "640x480", c)] = LoadResult.run(unbatched, images["640x480"], c, seconds,
                                                                             max_requests)
        finally:
            unbatched.stop()
        # This machine's speed drifts by 10-20% over minutes, so the service and the bare forward
        # pass are measured in alternating rounds and compared round by round.
        rounds = [(bare_onnx(model, MAX_BATCH), LoadResult.run(ours, images["640x480"], levels[-1], seconds,
                                                               max_requests)) for _ in range(3)]
        detector_rounds = detector_cost(model, ours, images["640x480"], levels[-1], seconds, max_requests)
        rss = {s.name: s.peak_rss_mb() for s in (ours, baseline)}
    finally:
        ours.stop()
        baseline.stop()

    lines.append(f"cold start to /readyz: ours {ours.cold_start_s:.1f} s with the checked ONNX cache (learner "
                 f"loaded in the background by {ours.learner_s:.1f} s), {cold_uncached:.1f} s on a first start; "
                 f"baseline {baseline.cold_start_s:.1f} s")
    lines.append(f"peak RSS: ours {rss['ours']:.0f} MB, baseline {rss['baseline']:.0f} MB")
    lines.append("")
    lines.append("| server | image | conc. | p50 ms | p99 ms | req/s | ok | errors | CPU ms/req server + load gen. |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---|---:|")
    for (name, image_name, c), r in results.items():
        lines.append(f"| {name} | {image_name} | {c} | {r.p50_ms:.0f} | {r.p99_ms:.0f} | {r.rps:.1f} | {r.ok} | "
                     f"{r.errors or '-'} | {r.server_cpu_ms:.1f} + {r.client_cpu_ms:.1f} |")
    lines.append("")
    for image_name in images:
        one = results[("ours", image_name, 1)], results[("baseline", image_name, 1)]
        top = results[("ours", image_name, levels[-1])], results[("baseline", image_name, levels[-1])]
        lines.append(f"{image_name}: p50 at concurrency 1 is {one[1].p50_ms / one[0].p50_ms:.1f}x lower than the "
                     f"baseline; throughput at concurrency {levels[-1]} is {top[0].rps / top[1].rps:.1f}x the baseline")
    ratios = [load.rps / bare["rate"] for bare, load in rounds]
    lines.append(f"bare ONNX forward pass at batch {MAX_BATCH} against ours at concurrency {levels[-1]} (640x480), "
                 "in alternating rounds: " + "; ".join(f"{bare['rate']:.1f} img/s vs {load.rps:.1f} req/s"
                                                      for bare, load in rounds)
                 + f"; ours reaches {', '.join(f'{r:.0%}' for r in ratios)} (median {sorted(ratios)[1]:.0%})")
    bare, load = rounds[ratios.index(sorted(ratios)[1])]
    lines.append(f"CPU per image in that round: the bare forward pass {bare['cpu_ms']:.1f} ms; "
                 f"ours {load.server_cpu_ms:.1f} ms in the server + {load.client_cpu_ms:.1f} ms in the load "
                 f"generator (all on the same {os.cpu_count()} cores)")
    lines.append(f"bare torch forward pass at batch {MAX_BATCH}: {bare_torch(model, MAX_BATCH):.1f} img/s; "
                 f"ONNX Runtime at batch 1: {bare_onnx(model, 1)['rate']:.1f} img/s")
    if detector_rounds:
        ratios = [with_.rps / without.rps for with_, without in detector_rounds]
        lines.append(f"unfamiliar-image detector: {detector_ms_per_image(model):.3f} ms per image on its own; at "
                     f"concurrency {levels[-1]} (640x480), in alternating rounds with the same export served "
                     "without it: " + "; ".join(f"{w.rps:.1f} vs {wo.rps:.1f} req/s" for w, wo in detector_rounds)
                     + f"; with the detector {', '.join(f'{r:.0%}' for r in ratios)} of the rate without "
                       f"(median {sorted(ratios)[1]:.0%})")
    return lines


def detector_cost(model: Path, ours: Server, image: Path, concurrency: int, seconds: float,
                  max_requests: int) -> list[tuple[LoadResult, LoadResult]]:
    """Ours with the model's detector against ours on a copy of the export without one, in
    alternating rounds: (with, without) per round; empty if the model has no detector."""
    from app.core.detector import detector_path

    if not detector_path(model).exists():
        return []
    with tempfile.TemporaryDirectory() as tmp:
        bare_model = Path(tmp) / model.name
        shutil.copy(model, bare_model)
        check = subprocess.run([sys.executable, "-m", "app", "--check"], cwd=ROOT, capture_output=True,
                               env={**os.environ, "MODEL_PATH": str(bare_model)})
        assert check.returncode == 0, check.stderr
        without = start_ours(bare_model)
        try:
            return [(LoadResult.run(ours, image, concurrency, seconds, max_requests),
                     LoadResult.run(without, image, concurrency, seconds, max_requests)) for _ in range(3)]
        finally:
            without.stop()


def detector_ms_per_image(model: Path, batch: int = MAX_BATCH, repeat: int = 200) -> float:
    """The detector's own work for a batch (one matrix product against the training features)."""
    from app.core.detector import Detector, detector_path
    from app.core.files import sha256_file

    detector = Detector.load(detector_path(model), sha256_file(model))
    features = np.random.default_rng(0).standard_normal((batch, detector.reference.shape[1])).astype(np.float32)
    t0 = time.perf_counter()
    for _ in range(repeat):
        detector.unfamiliar(features, np.zeros(batch, dtype=int))
    return (time.perf_counter() - t0) / repeat / batch * 1000


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "export.pkl",
                        help="an export; or a model folder with export.pkl and bundle-int8/, to compare precisions")
    parser.add_argument("--resnet34", action="store_true", help="also benchmark a resnet34 export (random weights)")
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test, not for reporting)")
    parser.add_argument("--seconds", type=float, default=10, help="seconds per load level")
    args = parser.parse_args()
    seconds = 2 if args.quick else args.seconds
    max_requests = 40 if args.quick else 2000
    levels = [1, 8, 32]

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        images = {"640x480": tmp_path / "640x480.jpg", "12MP": tmp_path / "12mp.jpg"}
        images["640x480"].write_bytes(photo((640, 480)))
        images["12MP"].write_bytes(photo((4000, 3000)))
        full, drafted = decode_times(images["12MP"].read_bytes())
        lines = [f"# Cuddle or Not benchmark: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                 f"Python {platform.python_version()}",
                 f"12 MP JPEG ({images['12MP'].stat().st_size / 1e6:.1f} MB) decode + resize: {full:.0f} ms full, "
                 f"{drafted:.0f} ms with JPEG draft ({full / drafted:.1f}x)"]
        if args.model.is_dir():
            lines += compare(args.model, images["640x480"], levels, seconds, max_requests)
        else:
            lines += bench_model("default model", args.model, images, levels, seconds, max_requests)
        if args.resnet34:
            lines += bench_model("resnet34 (random weights)", resnet34_export(tmp_path / "r34"), images, levels,
                                 seconds, max_requests)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
