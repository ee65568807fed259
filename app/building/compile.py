"""Compile an export into a checked bundle that serves without torch and fastai.

    python -m app.compile EXPORT --out DIR [--check DATA] [--fastai 2.7.19]

Writes DIR/model.onnx, DIR/detector.npz (for a model with an unfamiliar-image detector) and
DIR/manifest.json (`app.core.bundle`), after checking the compiled model against `learn.predict`
on generated images and, with `--check`, on every photo below DATA. Serve it with
`MODEL_PATH=DIR`. Exits 2 with a one-line message on bad input.

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
from app.core.bundle import is_bundle
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
    if out.is_dir() and any(out.iterdir()) and not is_bundle(out):
        raise UsageError(f"--out {out} holds other files: give an empty or new folder (or an earlier bundle)")


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
        try:
            manifest = compile_bundle(args.export, args.out, photos, threads_or_all(args.threads), args.code)
        except ModelLoadError as exc:
            raise UsageError(str(exc)) from None
        except OSError as exc:
            raise UsageError(f"cannot write the bundle to {args.out}: {exc.strerror or exc}") from None
        parity = manifest.parity
        print(f"bundle written to {args.out}: {len(manifest.classes)} classes, outputs {', '.join(manifest.outputs)}")
        print(f"parity with learn.predict: largest difference {parity['max_abs_diff']:.2g} on "
              f"{parity['generated_images']} generated images and {parity['photos']} photos")
        print(f"serve it: MODEL_PATH={args.out} make run")
        return 0

    return run_command(run)
