"""Deploying where students deploy: a model trained here going into the default image the way its
Dockerfile builds it, the folders refused for holding another model's files, each platform's
recipe saying what the service needs, and inference threads that follow a container's CPU quota."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from support import HEAVY, ROOT, can_mount_read_only

from app.serving.config import Settings, cgroup_cpu_quota, usable_cpus

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def stage(dockerfile: str, name: str) -> str:
    """The instructions of one stage of a Dockerfile."""
    return dockerfile.split(f" AS {name}\n", 1)[1].split("\nFROM ", 1)[0]


def run_as_the_image_does(command: str, folder: Path, into: str, env: dict[str, str] | None = None,
                          without: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """A Dockerfile RUN command run here, with the image's `into` path standing for `folder`."""
    from support import unimportable_env

    args = command.replace(into, str(folder)).split()
    full_env = {"PATH": "/usr/bin:/bin", **(env or {}), **(unimportable_env(without) if without else {})}
    return subprocess.run([sys.executable if a == "python" else a for a in args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=300)


def choose_bundle(folder: Path, precision: str = "fp32") -> subprocess.CompletedProcess:
    """The bundle stage's first step, on the bare interpreter (`-S`: no site-packages, as the image
    has none installed yet), with the PRECISION build argument (its default: fp32)."""
    assert 'RUN python choose_bundle.py /model "$PRECISION" > /chosen' in stage(DOCKERFILE, "bundle")
    assert "ARG PRECISION=fp32" in DOCKERFILE
    return subprocess.run([sys.executable, "-S", str(ROOT / "deploy" / "choose_bundle.py"), str(folder), precision],
                          capture_output=True, text=True, timeout=60)


def check_as_the_slim_image_does(bundle: Path) -> subprocess.CompletedProcess:
    """The default stage's `python -m app --check` on a bundle, with torch and fastai unimportable."""
    assert "RUN python -m app --check" in stage(DOCKERFILE, "slim")
    return run_as_the_image_does("python -m app --check", bundle, "/srv/models/bundle",
                                 {"MODEL_PATH": str(bundle)}, without=HEAVY)


def student_folder(tiny_export: Path, tmp_path: Path) -> Path:
    """What `app.train --out trained` wrote for a model of the student's own classes."""
    return Path(shutil.copytree(tiny_export.parent, tmp_path / "trained"))


def classes_of(folder: Path) -> list[str]:
    return json.loads((folder / "model-card.json").read_text())["classes"]


def test_a_students_checked_bundle_is_taken_as_it_is(tiny_export, tmp_path):
    """`docker build --build-arg MODEL=trained .` on what app.train wrote: its bundle is taken
    (torch is installed only for an export to compile) and checked without torch by the last stage."""
    folder = student_folder(tiny_export, tmp_path)
    chosen = choose_bundle(folder)
    assert chosen.returncode == 0, chosen.stderr
    assert chosen.stdout.strip() == str(folder / "bundle") and "no torch" in chosen.stderr
    for source in (folder, folder / "bundle"):  # MODEL=trained/bundle names the bundle itself
        assert choose_bundle(source).stdout.strip() == str(folder / "bundle")
    checked = check_as_the_slim_image_does(folder / "bundle")
    assert checked.returncode == 0, checked.stderr
    assert f"classes={classes_of(folder)}" in checked.stdout and "backend=onnx" in checked.stdout


def test_a_students_export_alone_is_compiled_and_checked_as_the_image_builds_it(tiny_export, tmp_path):
    """An export with its detector and card but no bundle (put in models/ by hand): the bundle
    stage installs torch and compiles it; the last stage checks the bundle without torch."""
    folder = student_folder(tiny_export, tmp_path)
    shutil.rmtree(folder / "bundle")
    chosen = choose_bundle(folder)
    assert chosen.stdout.strip() == str(folder / "export.pkl") and "installing torch" in chosen.stderr
    compile_line = re.search(r"then (python -m app\.compile \S+ --out /bundle);", stage(DOCKERFILE, "bundle"))
    assert compile_line, stage(DOCKERFILE, "bundle")
    compiled = run_as_the_image_does(compile_line.group(1).replace("/bundle", str(tmp_path / "bundle")),
                                     folder, "/model")
    assert compiled.returncode == 0, compiled.stderr
    checked = check_as_the_slim_image_does(tmp_path / "bundle")
    assert checked.returncode == 0, checked.stderr
    assert f"classes={classes_of(folder)}" in checked.stdout


def test_precision_int8_ships_the_int8_bundle_app_compile_made_and_refuses_a_folder_without_one(tiny_export,
                                                                                                 tmp_path):
    folder = student_folder(tiny_export, tmp_path)
    missing = choose_bundle(folder, "int8")
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1
    assert "has no INT8 bundle" in missing.stderr and "--int8 --calibration DATA" in missing.stderr
    data = tiny_export.parent.parent / "data"  # what the tiny model was trained on (conftest.py)
    made = subprocess.run([sys.executable, "-m", "app.compile", str(folder / "export.pkl"), "--int8", "--calibration",
                           str(data), "--out", str(folder / "bundle-int8")], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert made.returncode == 0, made.stderr
    chosen = choose_bundle(folder, "int8")
    assert chosen.returncode == 0 and chosen.stdout.strip() == str(folder / "bundle-int8"), chosen.stderr
    assert choose_bundle(folder).stdout.strip() == str(folder / "bundle")
    checked = check_as_the_slim_image_does(folder / "bundle-int8")
    assert checked.returncode == 0, checked.stderr
    assert "precision=int8" in checked.stdout
    wrong = subprocess.run([sys.executable, "-S", str(ROOT / "deploy" / "choose_bundle.py"), str(folder), "int4"],
                           capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "usage" in wrong.stderr


@pytest.mark.parametrize("stale", ["export.detector.npz", "model-card.json", "bundle"])
def test_a_model_folder_holding_another_exports_file_is_refused_in_one_line(tiny_export, other_export, tmp_path,
                                                                            stale):
    """A new export copied over an old model's folder, beside the old detector, card or bundle:
    the image's build stops at its first step, and app.compile refuses the same folder."""
    folder = student_folder(tiny_export, tmp_path)
    (shutil.rmtree if stale == "bundle" else Path.unlink)(folder / stale)
    copy = shutil.copytree if stale == "bundle" else shutil.copyfile
    copy(other_export.parent / stale, folder / stale)
    chosen = choose_bundle(folder)
    assert chosen.returncode == 1 and chosen.stdout == ""
    assert chosen.stderr.count("\n") == 1 and "was made for another export" in chosen.stderr, chosen.stderr
    if stale != "bundle":
        result = subprocess.run([sys.executable, "-m", "app.compile", str(folder / "export.pkl"), "--out",
                                 str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert stale in result.stderr and "was made for another export" in result.stderr
        assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_folder_without_a_model_is_refused_in_one_line(tmp_path):
    chosen = choose_bundle(tmp_path)
    assert chosen.returncode == 1 and chosen.stderr.count("\n") == 1
    assert "holds neither export.pkl nor a bundle" in chosen.stderr


def test_choose_bundle_reads_the_files_the_project_writes():
    sys.path.insert(0, str(ROOT / "deploy"))
    try:
        import choose_bundle as chooser
    finally:
        sys.path.remove(str(ROOT / "deploy"))
    from app.building.finish import BUNDLE_NAME, CARD_NAME, EXPORT_NAME
    from app.core.bundle import MANIFEST_NAME
    from app.core.detector import detector_path

    assert (chooser.MANIFEST, chooser.EXPORT, chooser.CARD) == (MANIFEST_NAME, EXPORT_NAME, CARD_NAME)
    assert chooser.DETECTOR == detector_path(Path(EXPORT_NAME)).name and BUNDLE_NAME == "bundle"
    export = ROOT / "models" / "export.pkl"
    assert chooser.detector_export(ROOT / "models" / chooser.DETECTOR) == chooser.sha256_of(export)


def test_the_recipes_give_each_platform_the_port_health_check_memory_and_concurrency():
    render = yaml.safe_load((ROOT / "render.yaml").read_text())["services"][0]
    assert (render["runtime"], render["dockerfilePath"], render["healthCheckPath"]) == ("docker", "./Dockerfile",
                                                                                       "/readyz")
    assert "dockerTarget" not in render  # Render builds the last stage: the slim image
    env = {e["key"]: e["value"] for e in render["envVars"]}
    assert env["THREADS"] == "1" and int(env["QUEUE_SIZE"]) >= int(env["MAX_BATCH"])

    fly = tomllib.loads((ROOT / "fly.toml").read_text())
    service = fly["http_service"]
    assert service["internal_port"] == int(fly["env"]["PORT"]) and service["checks"][0]["path"] == "/readyz"
    assert service["concurrency"]["hard_limit"] == int(fly["env"]["QUEUE_SIZE"])
    assert fly["vm"][0]["memory"] == "512mb" and "target" not in fly["build"]

    railway = tomllib.loads((ROOT / "railway.toml").read_text())
    assert railway["deploy"]["healthcheckPath"] == "/readyz" and railway["build"]["builder"] == "DOCKERFILE"

    space = (ROOT / "deploy" / "huggingface" / "README.md").read_text()
    front = yaml.safe_load(space.split("---\n")[1])
    assert front["sdk"] == "docker" and front["app_port"] == 8000 and "PORT=8000" in DOCKERFILE

    zeit = json.loads((ROOT / "zeit.json").read_text())
    assert "Dockerfile.vercel" in zeit["//"] and zeit["type"] == "docker"


def test_the_vercel_image_is_the_slim_one_set_for_vercels_limits():
    vercel = (ROOT / "Dockerfile.vercel").read_text()
    lint = subprocess.run([str(Path(sys.executable).parent / "hadolint"), "Dockerfile.vercel"], cwd=ROOT,
                          capture_output=True, text=True)
    assert lint.returncode == 0 and lint.stdout == "", lint.stdout + lint.stderr
    assert re.findall(r"^FROM (\S+)", vercel, re.M) == ["python:3.11-slim-bookworm"] * 2
    for line in ('CMD ["python", "-m", "app"]', "RUN python -m app --check", "MODEL_PATH=/srv/models/bundle",
                 "RUN sh install-serving.sh", "torch==2.14.1 torchvision==0.29.1", "HOST=0.0.0.0"):
        assert line in vercel and line in DOCKERFILE.replace("--target full", ""), line
    assert float(re.search(r"MAX_UPLOAD_MB=([\d.]+)", vercel).group(1)) < 4.5  # Vercel's body limit, in MB
    assert "FEEDBACK_DIR" not in vercel.split("FROM python:3.11-slim-bookworm\n")[-1].replace("(FEEDBACK_DIR)", "")
    assert re.search(r"^USER 10001", vercel, re.M)


def test_the_cpu_quota_of_a_cgroup_sets_the_default_threads(tmp_path):
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    (v2 / "pod").mkdir(parents=True)
    (v1 / "cpu" / "pod").mkdir(parents=True)
    own = tmp_path / "cgroup"
    own.write_text("0::/pod\n")
    for quota, expected in (("10000 100000", 0.1), ("250000 100000", 2.5), ("max 100000", None)):
        (v2 / "pod" / "cpu.max").write_text(quota + "\n")
        assert cgroup_cpu_quota(v2, own) == expected
    own.write_text("4:cpu,cpuacct:/pod\n0::/\n")
    (v1 / "cpu" / "pod" / "cpu.cfs_period_us").write_text("100000\n")
    for quota, expected in (("50000", 0.5), ("-1", None)):
        (v1 / "cpu" / "pod" / "cpu.cfs_quota_us").write_text(quota + "\n")
        assert cgroup_cpu_quota(v1, own) == expected
    assert cgroup_cpu_quota(tmp_path / "none", tmp_path / "no-such-file") is None
    (v1 / "cpu" / "pod" / "cpu.cfs_quota_us").write_text("50000\n")
    assert usable_cpus(v1, own) == 1


CPU_CGROUP = Path("/sys/fs/cgroup/cpu")


@pytest.mark.skipif(not can_mount_read_only() or not (CPU_CGROUP / "cpu.cfs_quota_us").exists(),
                    reason="needs root and a cgroup v1 cpu controller to make a cgroup with a CPU quota")
def test_a_server_started_in_a_tenth_of_a_cpu_uses_one_thread(tmp_path):
    cgroup = CPU_CGROUP / f"cuddle-test-{tmp_path.name}"
    cgroup.mkdir()
    try:
        (cgroup / "cpu.cfs_quota_us").write_text("10000")  # 10 ms of every 100 ms: a tenth of a CPU
        code = ("import os; open(os.environ['CGROUP'] + '/tasks', 'w').write(str(os.getpid()));"
                "from app.serving.config import Settings; print(Settings.from_env({}).threads)")
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                                env={"CGROUP": str(cgroup), "PATH": "/usr/bin:/bin"})
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "1"
    finally:
        cgroup.rmdir()
    assert Settings().threads == usable_cpus()
