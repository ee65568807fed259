"""A student's own small dataset: how right, how honest and how watchful `app.train` is at its defaults.

    python -m bench.small_data [--sizes 15 25 35] [--draws 0 1]

For each size, `python -m app.train` at its defaults on that many photos a class of
`../shared/data/not-bears/{cats,dogs}` (a random subset, per draw), then its bundle on what it never
saw: the other cat and dog photos (accuracy, ECE, median top probability, each class's flagged
rate) and the bear photos (flagged rate: a cats/dogs model should call them unfamiliar). At its
defaults, on sets this small, the detector has its ImageNet test; a first row without it
(`--imagenet-test off`) shows what the k-NN test alone does. Then the same with
`--unfamiliar OTHER --outlier-exposure`, OTHER being the rest of not-bears (people, food,
vehicles, objects, plants, scenes, other animals: no bear among them), so that the detector's
second test learns from them; the bears are never among what it learns from. Prints what the
training printed as warnings, a Markdown table, and for each detector how many sets meet both goals
of issue 28 (each class flagged at most 10% of its new photos, bears at least 80%). The benches
that chose the detector's settings (`bench.outlier_keep`, `bench.imagenet_test`) drew their sets
with draws 2-7: report on others.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.servers import ROOT

SHARED = ROOT.parent / "shared" / "data"
CLASSES = ("cats", "dogs")
BEAR_SAMPLE = 150
WORST_CLASS, OTHERS = 0.10, 0.80  # issue 28's goals: each class flagged at most, other things at least


def new_photos_figures(bundle: Path, held_out: dict[str, list[Path]], bears: list[Path]) -> dict[str, float]:
    from app.building.calibration import expected_calibration_error
    from app.building.measure import predict_files
    from app.core.bundle import load_bundle

    loaded = load_bundle(bundle, os.cpu_count() or 1)
    vocab = loaded.manifest.classes
    files = [p for cls in CLASSES for p in held_out[cls]]
    out = predict_files(loaded.predictor, loaded.detector, files)
    targets = np.array([vocab.index(p.parent.name) for p in out.files])
    flags = out.unfamiliar if out.unfamiliar is not None else np.zeros(len(targets), bool)
    others = predict_files(loaded.predictor, loaded.detector, bears)
    figures = {"photos": len(targets), "accuracy": float((out.probs.argmax(1) == targets).mean()),
               "ece": expected_calibration_error(out.probs, targets),
               "median_top": float(np.median(out.probs.max(1))),
               "bears_flagged": float(others.unfamiliar.mean()) if others.unfamiliar is not None else 0.0}
    for i, cls in enumerate(vocab):
        figures[f"{cls}_flagged"] = float(flags[targets == i].mean())
    return figures


def drawn(pool: list[Path], size: int, seed: int) -> list[Path]:
    """The `size` photos of `pool` a set of that size trains on at `seed` (`bench.small_sets`
    draws its sets the same way, for the benches that choose settings)."""
    return random.Random(seed * 1000 + size).sample(pool, size)


def train_and_measure(pools: dict[str, list[Path]], bears: list[Path], size: int, seed: int,
                      options: list[str]) -> tuple[str, bool, list[str]]:
    """`app.train` with `options` on `size` photos a class drawn with `seed`: the rest of a table
    row, whether both goals are met, and the warnings the training printed."""
    with tempfile.TemporaryDirectory() as tmp:
        data, held_out = Path(tmp) / "data", {}
        for cls, pool in pools.items():
            chosen = drawn(pool, size, seed)
            (data / cls).mkdir(parents=True)
            for path in chosen:
                shutil.copy(path, data / cls / path.name)
            held_out[cls] = [p for p in pool if p not in chosen]
        done = subprocess.run([sys.executable, "-m", "app.train", str(data), "--out", str(Path(tmp) / "out"),
                               "--quiet", *options], cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stdout, done.stderr, file=sys.stderr)
            raise SystemExit(f"app.train failed at size {size}")
        warnings = [line.strip() for line in done.stdout.splitlines() if line.strip().startswith("warning")]
        f = new_photos_figures(Path(tmp) / "out" / "bundle", held_out, bears)
        both = max(f[f"{cls}_flagged"] for cls in CLASSES) <= WORST_CLASS and f["bears_flagged"] >= OTHERS
        return (f"{f['accuracy']:.1%} ({f['photos']}) | {f['ece']:.3f} | {f['median_top']:.2f} | "
                f"{f['cats_flagged']:.1%} | {f['dogs_flagged']:.1%} | {f['bears_flagged']:.1%} | {len(warnings)} |",
                both, warnings)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.small_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[15, 25, 35])
    parser.add_argument("--draws", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    pools = {cls: sorted((SHARED / "not-bears" / cls).glob("*.jpg")) for cls in CLASSES}
    bears = sorted((SHARED / "bears").rglob("*.jpg"))
    bears = random.Random(0).sample(bears, min(BEAR_SAMPLE, len(bears)))
    rows = ["| photos a class | draw | detector | accuracy | ECE | median top probability | cats flagged | "
            "dogs flagged | bears flagged | warnings printed |", "|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    with tempfile.TemporaryDirectory() as others:
        for folder in (SHARED / "not-bears").iterdir():
            if folder.is_dir() and folder.name not in CLASSES:
                shutil.copytree(folder, Path(others) / folder.name)
        variants = {"k-NN alone": ["--imagenet-test", "off"], "k-NN joined with the ImageNet test (defaults)": [],
                    "k-NN + outlier exposure": ["--unfamiliar", others, "--outlier-exposure"]}
        met: dict[str, list[bool]] = {name: [] for name in variants}
        for size in args.sizes:
            for draw in args.draws:
                for name, options in variants.items():
                    row, both, warnings = train_and_measure(pools, bears, size, draw, options)
                    met[name].append(both)
                    rows.append(f"| {size} | {draw} | {name} | {row}")
                    print(rows[-1], *warnings, sep="\n  ", file=sys.stderr, flush=True)
    print("\n".join(rows))
    print(f"\nBoth goals (each class flagged <= {WORST_CLASS:.0%} of its new photos, bears >= {OTHERS:.0%}):")
    for name, sets in met.items():
        print(f"- {name}: {sum(sets)} of {len(sets)} sets")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
