"""Compile an export into a checked bundle that serves without torch and fastai.

    python -m app.compile EXPORT --out DIR [--check DATA] [--fastai 2.7.19]
    python -m app.compile EXPORT --int8 --calibration DATA --out DIR [--force]

Writes DIR/model.onnx, DIR/detector.npz (for a model with an unfamiliar-image detector) and
DIR/manifest.json (`app.core.bundle`), after checking the compiled model against `learn.predict`
on generated images and, with `--check`, on every photo below DATA. Serve it with
`MODEL_PATH=DIR`. Exits 2 with a one-line message on bad input.

`--int8` writes an INT8 bundle instead (`app.building.int8`): the checked FP32 model quantized
with ONNX Runtime, calibrated on photos of DATA's training split (the split app.train made, from
the seed in the export's model card), its detector fitted again, and its agreement with the FP32
model measured on DATA's validation split. It refuses (exit 2, nothing written) when top-1
agreement is under 99% or accuracy drops by more than 0.5 points, unless `--force`.

`--fastai VERSION` loads an export made with fastai 2.0-2.7, which fastai 2.8 cannot unpickle,
with that fastai release: in an environment made once and cached (`app.building.fastai_env`), where
the bundle is compiled and checked against that fastai's own `learn.predict`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from app.building.bundle import compile_bundle
from app.building.cli import UsageError, add_threads, parser, run_command, threads_or_all
from app.building.datasets import image_files
from app.building.fastai_env import compile_with
from app.building.int8 import CALIBRATION_PHOTOS, ContractNotMet, agreement_summary, compile_int8_bundle
from app.building.quantize import Recipe
from app.core.bundle import BUNDLE_FILES, is_bundle
from app.core.export_kind import installed_fastai
from app.core.model_file import ModelLoadError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser("python -m app.compile", __doc__)
    p.add_argument("export", type=Path, help="the fastai export (learn.export()) to compile")
    p.add_argument("--out", type=Path, required=True, help="the bundle folder to write")
    p.add_argument("--check", type=Path, metavar="DATA",
                   help="also check against learn.predict on every photo below DATA")
    p.add_argument("--code", type=Path, metavar="FILE.py",
                   help="a Python file defining the functions the export refers to (as MODEL_CODE does)")
    p.add_argument("--fastai", metavar="VERSION",
                   help="load the export with this fastai 2 release before 2.8 (e.g. 2.7.19), in a cached environment")
    p.add_argument("--int8", action="store_true", help="write an INT8 bundle, calibrated and measured on --calibration")
    p.add_argument("--calibration", type=Path, metavar="DATA",
                   help="with --int8: the model's training data (one folder per class), as app.train was given it")
    p.add_argument("--calibration-photos", type=int, default=CALIBRATION_PHOTOS,
                   help="with --int8: training photos the activation ranges are measured on")
    p.add_argument("--reduce-range", action="store_true",
                   help="with --int8: 7-bit weights, for CPUs without VNNI (README, INT8 bundles)")
    p.add_argument("--force", action="store_true",
                   help="with --int8: write the bundle even when it misses its agreement contract (it says so)")
    add_threads(p, "compiling and checking")
    return p.parse_args(argv)


def without_fastai_option(argv: list[str]) -> list[str]:
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--fastai":
            skip = True
        elif not arg.startswith("--fastai="):
            rest.append(arg)
    return rest


def check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    # An earlier bundle, or what an unfinished compile left (only a bundle's own files), is replaced.
    if out.is_dir() and not is_bundle(out) and any(p.name not in BUNDLE_FILES for p in out.iterdir()):
        raise UsageError(f"--out {out} holds other files: give an empty or new folder (or an earlier bundle)")


def int8(args: argparse.Namespace, check_files: list[Path]) -> int:
    if args.calibration is None or not args.calibration.is_dir():
        raise UsageError("--int8 needs --calibration DATA, the folder of class folders the model was trained on"
                         + (f" (not found: {args.calibration})" if args.calibration is not None else ""))
    recipe = Recipe(reduce_range=args.reduce_range)
    try:
        manifest = compile_int8_bundle(args.export, args.out, args.calibration, threads_or_all(args.threads),
                                       recipe, args.calibration_photos, args.force, args.code, check_files)
    except (ModelLoadError, ContractNotMet, ValueError) as exc:
        raise UsageError(str(exc)) from None
    print(agreement_summary(manifest, args.out))
    print(f"serve it: MODEL_PATH={args.out} make run")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)

    def run() -> int:
        if not args.export.is_file():
            raise UsageError(f"export not found: {args.export}")
        if args.fastai is not None and args.fastai != installed_fastai():
            check_out(args.out)
            return compile_with(args.fastai, without_fastai_option(argv))
        try:
            args.export.open("rb").close()
        except OSError as exc:
            raise UsageError(f"cannot read {args.export}: {exc.strerror or exc}") from None
        check_out(args.out)
        if args.check is not None and not args.check.is_dir():
            raise UsageError(f"--check folder not found: {args.check}")
        photos = image_files(args.check, recursive=True) if args.check is not None else []
        if args.check is not None and not photos:
            raise UsageError(f"no photos below {args.check}")
        if args.int8:
            return int8(args, photos)
        try:
            manifest = compile_bundle(args.export, args.out, photos, threads_or_all(args.threads), args.code)
        except ModelLoadError as exc:
            raise UsageError(str(exc)) from None
        except OSError as exc:
            raise UsageError(f"cannot write the bundle to {args.out}: {exc.strerror or exc}") from None
        parity = manifest.parity
        print(f"bundle written to {args.out}: {len(manifest.classes)} classes, outputs {', '.join(manifest.outputs)}")
        print(f"parity with {parity['reference']}: largest difference {parity['max_abs_diff']:.2g} on "
              f"{parity['generated_images']} generated images and {parity['photos']} photos")
        print(f"serve it: MODEL_PATH={args.out} make run")
        return 0

    return run_command(run)
