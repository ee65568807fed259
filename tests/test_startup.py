"""Start-up: the model is found or downloaded, checked, and a broken one stops the server with a
one-line reason."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from support import LocalHTTPServer, run_app_until_exit

from app.core.files import sha256_file
from app.core.model_file import ModelLoadError, check_model_file
from app.learner.loading import LoadedModel, load_learner_from
from app.serving.model_source import fetch_model_file


async def load_model(path: Path, url: str | None, sha256: str | None) -> LoadedModel:
    """What the server's first start does with MODEL_PATH, MODEL_URL and MODEL_SHA256."""
    return load_learner_from(await fetch_model_file(path, url, sha256))


HTML = b"<!DOCTYPE html><html><head><title>Google Drive</title></head><body>Download</body></html>"


def startup_error(env: dict[str, str]) -> str:
    """Run `python -m app`, expect it to refuse to start, return its one-line reason."""
    result = run_app_until_exit(env)
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "cannot serve the model" in line]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_missing_model_stops_startup_with_one_line(tmp_path):
    line = startup_error({"MODEL_PATH": str(tmp_path / "nope.pkl")})
    assert "not found" in line and "python -m app.train" in line


def test_a_folder_as_the_model_path_names_the_file_to_use(model_copy):
    line = startup_error({"MODEL_PATH": str(model_copy.parent)})
    assert "is a folder, not a model file" in line and f"set MODEL_PATH to {model_copy}" in line


def test_weights_saved_instead_of_an_export_say_what_they_are(tiny_learner, tmp_path):
    """The classic lesson-2 confusion: learn.save() or torch.save() instead of learn.export()."""
    import torch

    tiny_learner.path = tmp_path
    saved = Path(tiny_learner.save(tmp_path / "stage-1"))  # learn.save() writes {"model": ..., "opt": ...}
    torch.save(tiny_learner.model.state_dict(), tmp_path / "weights.pth")
    torch.save(tiny_learner.model, tmp_path / "model.pth")
    for path, what in ((saved, "holds only weights (learn.save()"), (tmp_path / "weights.pth", "holds only weights"),
                       (tmp_path / "model.pth", "saved with torch.save(model)")):
        line = startup_error({"MODEL_PATH": str(path)})
        assert what in line and "learn.export()" in line, line


def test_a_fastai_v1_export_says_it_is_v1_and_why_it_is_not_served(tmp_path):
    """fastai v1 cannot be installed beside this torch; its export is a torch pickle of
    fastai.basic_train objects, which is what the check reads (a module of that name stands in)."""
    path = tmp_path / "export.pkl"
    script = textwrap.dedent(f"""
        import sys, types, torch
        module = types.ModuleType("fastai.basic_train")
        class Learner:
            pass
        Learner.__module__ = "fastai.basic_train"
        module.Learner = Learner
        sys.modules["fastai.basic_train"] = module
        torch.save({{"cls": Learner, "model": torch.nn.Linear(2, 2)}}, {str(path)!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    line = startup_error({"MODEL_PATH": str(path)})
    assert "is a fastai v1 export (fastai.basic_train.Learner), which is not supported" in line
    assert "retrain and export with fastai 2" in line


def test_a_git_lfs_pointer_says_to_pull_the_file(tmp_path):
    path = tmp_path / "export.pkl"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "a" * 64 + "\nsize 46827520\n")
    assert "git lfs pull" in startup_error({"MODEL_PATH": str(path)})


def test_html_saved_as_the_model_is_reported_as_such(tmp_path):
    path = tmp_path / "export.pkl"
    path.write_bytes(HTML)
    line = startup_error({"MODEL_PATH": str(path)})
    assert "HTML page" in line and "download the file itself" in line and "MODEL_URL" not in line


def test_a_busy_port_is_one_line_naming_the_setting():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_app_until_exit({"PORT": str(port), "MODEL_PATH": "models/export.pkl"})
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: cannot listen on 127.0.0.1:{port} (Address already in use): "
                                     "set PORT (or HOST) to a free one")


def test_bad_configuration_exits_2():
    result = run_app_until_exit({"MAX_UPLOAD_MB": "lots"})
    assert result.returncode == 2
    assert "MAX_UPLOAD_MB must be a number" in result.stderr


def test_not_a_pickle(tmp_path):
    path = tmp_path / "export.pkl"
    path.write_bytes(b"GIF89a this is not a model")
    with pytest.raises(ModelLoadError, match="not a fastai export"):
        check_model_file(path, None)


def test_sha256_mismatch(model_copy):
    with pytest.raises(ModelLoadError, match="sha256"):
        check_model_file(model_copy, "0" * 64)
    assert check_model_file(model_copy, sha256_file(model_copy).upper()) == sha256_file(model_copy)


def test_truncated_export_is_refused(model_copy):
    data = model_copy.read_bytes()
    model_copy.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="is truncated or corrupt"):
        asyncio.run(load_model(model_copy, None, None))


def test_version_mismatch_names_installed_and_training_versions(tmp_path):
    """An export whose pickle refers to code this install lacks, as one from another fastai has."""
    module = tmp_path / "fastai_of_another_era.py"
    module.write_text("class Learner:\n    pass\n")
    path = tmp_path / "export.pkl"
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(tmp_path)!r})
        import fastai_of_another_era
        torch.save(fastai_of_another_era.Learner(), {str(path)!r})
    """)
    import subprocess

    subprocess.run([sys.executable, "-c", script], check=True)
    module.unlink()
    (tmp_path / "model-card.json").write_text(json.dumps({"versions": {"fastai": "1.0.61", "torch": "1.4.0"}}))
    with pytest.raises(ModelLoadError) as err:
        asyncio.run(load_model(path, None, None))
    message = str(err.value)
    import fastai
    import torch

    assert f"installed: fastai {fastai.__version__}, torch {torch.__version__}" in message
    assert "trained with fastai 1.0.61, torch 1.4.0" in message


@pytest.fixture
def model_host(tiny_export):
    data = tiny_export.read_bytes()

    def dies_halfway(handler):  # a server (or a network) that fails mid-download
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data[: len(data) // 2])

    server = LocalHTTPServer(routes={
        "/export.pkl": (200, {"Content-Type": "application/octet-stream"}, data),
        "/share": (200, {"Content-Type": "text/html"}, HTML),
        "/half.pkl": dies_halfway,
    })
    yield server
    server.close()


def test_model_url_is_downloaded_checked_and_renamed_into_place(tiny_export, model_host, tmp_path):
    dest = tmp_path / "models" / "export.pkl"
    model = asyncio.run(load_model(dest, model_host.url("/export.pkl"), sha256_file(tiny_export)))
    assert model.file.sha256 == sha256_file(tiny_export) == sha256_file(dest)
    assert model.vocab == ["blues", "greens", "reds"]
    assert [p.name for p in dest.parent.iterdir()] == ["export.pkl"]  # no temporary file left


@pytest.mark.parametrize("path,expected_sha,message", [
    ("/share", None, "HTML page"),
    ("/missing", None, "HTTP 404"),
    ("/export.pkl", "ab" * 32, "sha256"),
    ("/half.pkl", None, "downloading MODEL_URL .* failed"),
])
def test_bad_model_url_leaves_no_model_behind(model_host, tmp_path, path, expected_sha, message):
    dest = tmp_path / "export.pkl"
    with pytest.raises(ModelLoadError, match=message):
        asyncio.run(load_model(dest, model_host.url(path), expected_sha))
    assert list(tmp_path.iterdir()) == []


def test_a_missing_module_is_named_with_what_to_do(tiny_export, tmp_path):
    """An export that needs a module this server lacks (timm, or the notebook's own helpers)."""
    import os
    import subprocess

    from support import ROOT

    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "bear_helpers.py").write_text("def label(path):\n    return path.parent.name\n")
    model = tmp_path / "model" / "export.pkl"
    model.parent.mkdir()
    script = ("import bear_helpers, sys; from fastai.learner import load_learner; "
              "learn = load_learner(sys.argv[1], cpu=True); learn.labeller = bear_helpers.label; "
              "learn.export(sys.argv[2])")
    subprocess.run([sys.executable, "-c", script, str(tiny_export), str(model)], cwd=ROOT, check=True,
                   env={**os.environ, "PYTHONPATH": str(extra)})
    line = startup_error({"MODEL_PATH": str(model)})
    assert "needs the module 'bear_helpers', which is not installed here" in line
    assert "pip install bear_helpers" in line and "set MODEL_CODE to that file" in line
