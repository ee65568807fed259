"""Object-centred crops for `bench.detector_spaces`: where in the photo is the thing the model named?

The body's last feature map (7 x 7 cells over the centre square the model sees) scored at every cell
by the backbone's ImageNet classifier row of the class the model predicts (teddy bear, brown bear,
American black bear: a class activation map), then the photo cropped to half its width and height
around the best cell and run through the model again for its pooled features. A teddy that fills a
tenth of a living-room photo fills far more of its crop. Needs torch and the export (the bundle has
no feature map), so it lives here and not in the server.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

# The ImageNet class that stands for each of the default model's classes.
IMAGENET_CLASS = {"black": 295, "grizzly": 294, "teddys": 850}


def crop_features(export: Path, bundle: Any, weight: np.ndarray, files: list[Path]) -> np.ndarray:
    """(photos, d): the pooled features of each photo's object-centred crop."""
    import torch
    from fastai.learner import load_learner

    from app.core.images import decode_image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        body = load_learner(export, cpu=True).model[0].eval()
    vocab = bundle.manifest.classes
    rows = np.stack([weight[IMAGENET_CLASS[name]] for name in vocab])
    prepare, infer = bundle.predictor.prepare, bundle.predictor.infer
    out = []
    for path in files:
        image = decode_image(path.read_bytes())
        batch = prepare(image)[None]
        with torch.no_grad():
            feature_map = body(torch.from_numpy(batch))[0].numpy()  # (channels, 7, 7)
        predicted = int(infer(batch)[0][0].argmax())
        cam = np.tensordot(rows[predicted], feature_map, axes=1)
        row, col = np.unravel_index(cam.argmax(), cam.shape)
        # fastai's validation crop is the centre square: map the cell back into the photo.
        width, height = image.size
        side, cells = min(width, height), cam.shape[0]
        cx = (width - side) / 2 + (col + 0.5) / cells * side
        cy = (height - side) / 2 + (row + 0.5) / cells * side
        x0 = min(max(0.0, cx - width / 4), width / 2)
        y0 = min(max(0.0, cy - height / 4), height / 2)
        crop = image.crop((round(x0), round(y0), round(x0 + width / 2), round(y0 + height / 2)))
        out.append(infer(prepare(crop)[None])[1][0])
    return np.stack(out)
