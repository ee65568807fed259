"""What a fastai export is, read from the module and class names its pickle mentions, without
running it: which fastai made it, and whether it is an image classifier at all.

fastai 2.8 moved its transforms from `fastcore.transform` (and type dispatch from
`fastcore.dispatch`) to the `fasttransform` and `plum` packages, so an export made with fastai
2.0-2.7 names the old modules and fastai 2.8 cannot unpickle it. Learners for other tasks carry
their own fastai modules or transforms (`fastai.tabular`, `fastai.text`, `PILMask`,
`RegressionSetup`, ...), which name the task before anything is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata

# The last fastai 2.7 release: it loads exports of every fastai 2 before 2.8.
LAST_BEFORE_2_8 = "2.7.19"
OLD_FASTAI_MODULES = ("fastcore.transform", "fastcore.dispatch")

# (imports any of which mark the task, what it is in words), checked in order. Only transforms and
# modules a learner for that task pickles: a classifier's pickle imports some of the tensor types
# too (TensorMask, TensorPoint) because its transforms' dispatch tables name them.
OTHER_TASKS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("fastai.tabular.core", "fastai.tabular.learner", "fastai.tabular.model", "fastai.tabular.data"),
     "a tabular model (fastai.tabular)"),
    (("fastai.text.core", "fastai.text.learner", "fastai.text.data", "fastai.text.models.core",
      "fastai.text.models.awdlstm"), "a text model (fastai.text)"),
    (("fastai.collab",), "a collaborative-filtering model (fastai.collab)"),
    (("fastai.vision.core.PILMask", "fastai.vision.core.AddMaskCodes"),
     "a segmentation model (it predicts a mask per pixel)"),
    (("fastai.vision.core.PointScaler", "fastai.vision.core.BBoxLabeler"), "a keypoint or object-detection model"),
    (("fastai.data.transforms.RegressionSetup",), "a regression model (it predicts numbers, not classes)"),
)


@dataclass(frozen=True)
class ExportKind:
    made_before_2_8: bool  # made with fastai 2.0-2.7
    refusal: str | None  # why it is not an image classifier this server serves (None: it is)


def installed_fastai() -> str | None:
    """The installed fastai's version, read without importing it (None: not installed)."""
    try:
        return metadata.version("fastai")
    except metadata.PackageNotFoundError:
        return None


def before_2_8(version: str) -> bool:
    parts = version.split(".")
    try:
        return (int(parts[0]), int(parts[1])) < (2, 8)
    except (ValueError, IndexError):
        return False


def export_kind(names: set[str]) -> ExportKind:
    """What the imports of an export's pickle (`app.core.model_file.pickle_names`) say it is."""
    old = any(name in names for name in OLD_FASTAI_MODULES)
    for markers, what in OTHER_TASKS:
        if any(marker in names for marker in markers):
            return ExportKind(old, f"{what}: only image classifiers are served")
    if not {"fastai.vision.core.PILImage", "fastai.vision.core.PILImageBW"} & names:
        return ExportKind(old, "a fastai export whose inputs are not images: only image classifiers are served")
    return ExportKind(old, None)


def old_fastai_message(path: object, installed: str | None) -> str:
    """The one line for an export made with fastai 2.0-2.7 on a server that cannot load it."""
    here = f"this server has fastai {installed}" if installed else "this server has no fastai"
    return (f"{path} was exported with fastai 2.0-2.7 (its pickle names fastcore.transform, which fastai 2.8 "
            f"replaced) and {here}: compile it into a checked bundle with the fastai it was made with, "
            f"`python -m app.compile {path} --out model-bundle --fastai {LAST_BEFORE_2_8}`, then serve "
            "MODEL_PATH=model-bundle")
