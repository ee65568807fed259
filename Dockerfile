# Cuddle or Not: the service and its default model, CPU only. Two images from this one file:
#   docker build -t cuddle-or-not .                     loads the learner at start-up (torch, fastai)
#   docker build --target slim -t cuddle-or-not:slim .  serves the checked bundle of the same model
#                                                       with ONNX Runtime alone: no torch, no fastai
#   docker run -p 8000:8000 cuddle-or-not

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

# --- The default model compiled into a bundle, checked against learn.predict ----------------------
FROM full-runtime AS bundle
RUN python -m app.compile models/export.pkl --out /bundle

# --- slim: the bundle served by the serving requirements only -------------------------------------
FROM base AS slim
ENV MODEL_PATH=/srv/models/bundle

# What the server never loads is left out (tests/test_bundle.py checks, in a serving process's
# memory map and with the packages made unimportable, that none of it is loaded): test suites,
# headers and stubs; the model-building parts of ONNX Runtime (transformers, quantization, tools)
# and the packages only model conversion imports (protobuf, flatbuffers); libonnxruntime.so, the C
# API library (34 MB: the Python module carries its own copy of the runtime); NumPy's f2py; and
# Pillow's text rendering (ImageFont's _imagingft and the FreeType, HarfBuzz, PNG and Brotli
# libraries only it links). About 75 MB in all.
COPY requirements-serve.txt .
RUN pip install --no-cache-dir -r requirements-serve.txt \
    && pip uninstall --yes --no-cache-dir protobuf flatbuffers \
    && site="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    && rm -rf "$site"/numpy/tests "$site"/numpy/*/tests "$site"/numpy/f2py "$site"/numpy/_core/include \
        "$site"/onnxruntime/transformers "$site"/onnxruntime/quantization "$site"/onnxruntime/tools \
        "$site"/onnxruntime/datasets "$site"/onnxruntime/capi/libonnxruntime.so* \
        "$site"/PIL/_imagingft.* "$site"/pillow.libs/libfreetype-* "$site"/pillow.libs/libharfbuzz-* \
        "$site"/pillow.libs/libpng16-* "$site"/pillow.libs/libbrotli* \
    && find "$site" \( -name '*.pyi' -o -name '*.pxd' -o -name '*.pyx' -o -name '*.h' \) -delete

COPY app/ app/
COPY static/ static/
COPY --from=bundle /bundle models/bundle/

# Every part of the bundle is checked before the image is kept, without torch (none is installed).
RUN python -m app --check
USER 10001:10001

# --- The default image (the last stage): the export itself, its learner loaded at start-up --------
FROM full-runtime AS full

# Load the model once, as the server's first start would: a broken model fails `docker build`, not
# production. This also compiles the ONNX copy next to the export and records its check, so that
# containers are ready in about a second (the learner is then checked again in the background).
RUN python -m app --check
USER 10001:10001
