# Cuddle or Not: the service and its default model, CPU only.
#   docker build -t cuddle-or-not . && docker run -p 8000:8000 cuddle-or-not
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOST=0.0.0.0 \
    PORT=8000

WORKDIR /srv

# CPU-only torch wheels first (about 200 MB instead of several GB of CUDA libraries); the pins in
# requirements.txt are then already satisfied by them.
COPY requirements.txt .
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
        torch==2.14.1 torchvision==0.29.1 \
    && pip install --no-cache-dir -r requirements.txt

COPY app/ app/
COPY static/ static/
COPY models/ models/

# Load the model once, as the server's first start would: a broken model fails `docker build`, not
# production. This also compiles the ONNX copy next to the export and records its check, so that
# containers are ready in about a second (the learner then loads in the background).
RUN python -m app --check \
    && groupadd --system --gid 10001 cuddle \
    && useradd --uid 10001 --gid 10001 --no-create-home --no-log-init --shell /usr/sbin/nologin cuddle

USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=4)"]
CMD ["python", "-m", "app"]
