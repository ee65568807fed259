"""Packaging: pinned requirements, a lint-clean Dockerfile that starts what the tests start, the
Zeit config, and a README whose commands are the ones that work."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from support import ROOT

VENV_BIN = Path(sys.executable).parent


def test_dockerfile_passes_hadolint():
    result = subprocess.run([str(VENV_BIN / "hadolint"), "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_dockerfile_runs_the_tested_start_command_as_a_non_root_user():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'CMD ["python", "-m", "app"]' in dockerfile  # what tests/support.py AppProcess runs
    assert "RUN python -m app --check" in dockerfile  # a broken model fails the build
    assert re.search(r"^USER 10001", dockerfile, re.M)
    assert "HEALTHCHECK" in dockerfile and "/healthz" in dockerfile
    assert "download.pytorch.org/whl/cpu" in dockerfile
    assert "HOST=0.0.0.0" in dockerfile and "PORT=8000" in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "tests", ".git"} <= set(ignored)


def test_build_time_check_passes_on_the_default_model_and_fails_on_a_broken_one(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "app", "--check"], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "classes=['black', 'grizzly', 'teddys']" in ok.stdout
    broken = tmp_path / "export.pkl"
    broken.write_bytes(b"\x80\x04not really a pickle")
    bad = subprocess.run([sys.executable, "-m", "app", "--check"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={"MODEL_PATH": str(broken), "PATH": "/usr/bin:/bin"})
    assert bad.returncode == 3 and "cannot serve the model" in bad.stderr


def test_every_requirement_is_pinned():
    for name in ("requirements-serve.txt", "requirements.txt", "requirements-dev.txt"):
        for line in (ROOT / name).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line and not line.startswith("-r"):
                assert re.fullmatch(r"[A-Za-z0-9_.\[\]-]+==[0-9][0-9A-Za-z.+-]*", line), f"{name}: {line}"
    serve = (ROOT / "requirements-serve.txt").read_text()
    runtime = (ROOT / "requirements.txt").read_text()
    assert "-r requirements-serve.txt" in runtime
    for package in ("starlette", "uvicorn", "aiohttp", "pillow", "python-multipart", "onnxruntime"):
        assert package in serve
    pinned_to_serve = {line.split("==")[0] for line in serve.splitlines() if "==" in line and not line.startswith("#")}
    for package in ("fastai", "torch==2.14.1", "torchvision==0.29.1"):
        assert package in runtime and package.split("=")[0] not in pinned_to_serve


def test_dockerfile_builds_the_slim_image_by_default_and_the_full_one_as_a_target():
    """Render, Hugging Face and Railway build the last stage and cannot be told another: it is the
    bundle served without torch. The bundle stage installs torch only for an export to compile."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+) AS (\S+)", dockerfile, re.M)
    assert stages == [("python:3.11-slim-bookworm", "base"), ("base", "full-runtime"), ("full-runtime", "full"),
                      ("base", "bundle"), ("base", "slim")]
    assert re.search(r"^ARG MODEL=models$", dockerfile, re.M)
    slim = dockerfile.split("AS slim")[1]
    assert "requirements-serve.txt" in slim and "requirements.txt" not in slim.replace("requirements-serve.txt", "")
    assert "COPY --from=bundle /bundle" in slim and "MODEL_PATH=/srv/models/bundle" in slim
    assert "RUN python -m app --check" in slim and re.search(r"^USER 10001", slim, re.M)
    bundle = dockerfile.split("AS bundle\n")[1].split("FROM ")[0]
    assert "COPY ${MODEL}/ /model/" in bundle and 'if [ "$(cat /chosen)" = /model/export.pkl ]; then' in bundle
    full = dockerfile.split("AS full\n")[1].split("FROM ")[0]
    assert "RUN python -m app --check" in full and re.search(r"^USER 10001", full, re.M)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"deploy", "!deploy/install-serving.sh", "!deploy/choose_bundle.py"} <= set(ignored)


def test_zeit_config_is_a_docker_deployment():
    config = json.loads((ROOT / "zeit.json").read_text())
    assert config["version"] == 1 and config["type"] == "docker"


def test_readme_documents_the_commands_and_every_setting():
    readme = (ROOT / "README.md").read_text()
    assert "make run" in readme and "make test" in readme
    from app.serving.config import Settings

    config = (ROOT / "app" / "serving" / "config.py").read_text()
    env_names = re.findall(r'get\("([A-Z_0-9]+)"\)|number\("([A-Z_0-9]+)"', config)
    names = {a or b for a, b in env_names} | {"ALLOW_PRIVATE_URLS"}
    for name in names:
        assert f"`{name}`" in readme, f"{name} is not documented in the README"
    assert Settings().port == 8000 and Settings().host == "127.0.0.1"


def test_ci_script_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "chromium" in ci


def test_code_passes_ruff():
    result = subprocess.run([str(VENV_BIN / "ruff"), "check", "app", "bench", "tests"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
