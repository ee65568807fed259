# Cuddle or Not: the service and its model, CPU only. Two images from this one file:
#   docker build -t cuddle-or-not .          the default (the last stage, what platforms build):
#                                            the model's checked bundle served by ONNX Runtime
#                                            alone, no torch or fastai (about 400 MB; fits 512 MB)
#   docker build --target full -t cuddle-or-not:full .   the export itself, its learner loaded at
#                                            start-up (torch, fastai; 1.6 GB of memory at start)
#   docker run -p 8000:8000 cuddle-or-not
# Your own model (README, Deploy):
#   docker build --build-arg MODEL=trained .   the folder app.train wrote: its checked bundle is
#                                              taken as it is, without installing torch
#   docker build --build-arg PRECISION=int8 .  the model's INT8 bundle (README, INT8 bundles)

# The folder the default image's model comes from: what python -m app.train wrote (export.pkl with
# its export.detector.npz, model-card.json and, when it compiled one, the checked bundle/), or a
# bundle folder. Without a bundle, the export is compiled at build time.
ARG MODEL=models
# fp32 (exact learn.predict parity) or int8: MODEL's bundle-int8/, made by app.train --int8 or
# app.compile --int8 (about twice the throughput on a CPU with VNNI; README, INT8 bundles).
ARG PRECISION=fp32

# --- What both images share: settings, the unprivileged user, the health check, the command -----
FROM python:3.11-slim-bookworm AS base

# MALLOC_ARENA_MAX: two malloc arenas instead of one per thread kept 30 MB less after 32 clients
# for 40 s (282 MB instead of 312 MB; README, Memory).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    MALLOC_ARENA_MAX=2

WORKDIR /srv
RUN groupadd --system --gid 10001 cuddle \
    && useradd --uid 10001 --gid 10001 --no-create-home --no-log-init --shell /usr/sbin/nologin cuddle

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=4)"]
CMD ["python", "-m", "app"]

# --- The full runtime: torch, fastai and the project ----------------------------------------------
FROM base AS full-runtime

# CPU-only torch wheels first (about 200 MB instead of several GB of CUDA libraries); the pins in
# requirements.txt are then already satisfied by them.
COPY requirements.txt requirements-serve.txt ./
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
        torch==2.14.1 torchvision==0.29.1 \
    && pip install --no-cache-dir -r requirements.txt

COPY app/ app/
COPY static/ static/
COPY models/ models/

# --- full: the export itself, its learner loaded at start-up (`--target full`) ---------------------
FROM full-runtime AS full

# Load the model once, as the server's first start would: a broken model fails `docker build`, not
# production. This also compiles the ONNX copy next to the export and records its check, so that
# containers are ready in about a second (the learner is then checked again in the background).
RUN python -m app --check
USER 10001:10001

# --- The bundle the default image serves: the one app.train checked in MODEL, taken as it is, or
# one compiled here from MODEL's export and checked against learn.predict (only then is torch
# installed). deploy/choose_bundle.py decides, and refuses a folder holding another export's files.
FROM base AS bundle
ARG MODEL
ARG PRECISION
COPY requirements.txt requirements-serve.txt deploy/choose_bundle.py ./
COPY ${MODEL}/ /model/
RUN python choose_bundle.py /model "$PRECISION" > /chosen \
    && if [ "$(cat /chosen)" = /model/export.pkl ]; then \
        pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
            torch==2.14.1 torchvision==0.29.1 \
        && pip install --no-cache-dir -r requirements.txt; fi
COPY app/ app/
RUN if [ "$(cat /chosen)" = /model/export.pkl ]; then python -m app.compile /model/export.pkl --out /bundle; \
    else cp -r "$(cat /chosen)" /bundle; fi

# --- The default image (the last stage): the bundle served by the serving requirements only -------
FROM base AS slim
ENV MODEL_PATH=/srv/models/bundle

# The serving requirements, without what the server never loads (about 75 MB less: see the script).
COPY requirements-serve.txt deploy/install-serving.sh ./
RUN sh install-serving.sh && rm install-serving.sh

COPY app/ app/
COPY static/ static/
COPY --from=bundle /bundle models/bundle/

# Every part of the bundle is checked before the image is kept, without torch (none is installed).
RUN python -m app --check
USER 10001:10001
