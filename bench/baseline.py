"""The baseline: a server written the way the fast.ai course starters were.

`load_learner` at start-up and `learn.predict` called inline in the async route, so every
prediction blocks the event loop. Run: `python -m bench.baseline MODEL_PATH PORT`.
"""

from __future__ import annotations

import sys
from contextlib import asynccontextmanager

import uvicorn
from fastai.vision.all import PILImage, load_learner
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

learn = None


@asynccontextmanager
async def lifespan(app):
    global learn
    learn = load_learner(sys.argv[1], cpu=True)
    yield


async def upload(request):
    form = await request.form()
    img = PILImage.create(await form["file"].read())
    with learn.no_bar():
        _, _, probs = learn.predict(img)
    ranked = sorted(zip(learn.dls.vocab, map(float, probs), strict=True), key=lambda p: -p[1])
    return JSONResponse({"predictions": ranked})


async def ready(request):
    return JSONResponse({"status": "ready"})


app = Starlette(routes=[Route("/upload", upload, methods=["POST"]), Route("/readyz", ready)], lifespan=lifespan)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
