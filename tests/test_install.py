"""`pip install -e .` keeps the torch and megatron-core an environment already has.

pip plans the install (``--dry-run --report``) of this repository's setup.py into a throwaway
virtual environment that holds only the metadata of what a GPU image carries: a newer torch
(a release, or NGC's pre-release build pinned by its PIP_CONSTRAINT) and the newest
megatron-core. Offline: ``--no-index``, with a local folder of stub wheels of the older releases
that a too-narrow pin would pull in their place.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.distributed import REPO

# What a narrower pin would install instead (the releases the old bounds, <2.14 and <0.19,
# resolved to).
OLDER_RELEASES = {"torch": "2.13.0", "megatron-core": "0.18.2"}


def _install_requires() -> list[Requirement]:
    text = (REPO / "setup.py").read_text()
    block = re.search(r"install_requires=\[(.*?)\]", text, re.S).group(1)
    return [Requirement(item) for item in re.findall(r'"([^"]+)"', block)]


def _satisfying_version(requirement: Requirement) -> str:
    """A version inside ``requirement``'s bounds: its lower bound if it has one."""
    for spec in requirement.specifier:
        if spec.operator in (">=", "==", "~="):
            return spec.version
    return "1.0"


def _metadata(name: str, version: str) -> str:
    return f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"


def _fake_installed(site: Path, name: str, version: str) -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(_metadata(name, version))
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text("")


def _stub_wheel(folder: Path, name: str, version: str) -> None:
    stem = f"{name.replace('-', '_')}-{version}"
    with zipfile.ZipFile(folder / f"{stem}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"{stem}.dist-info/METADATA", _metadata(name, version))
        wheel.writestr(f"{stem}.dist-info/WHEEL",
                       "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{stem}.dist-info/RECORD", "")


def _environment(tmp_path: Path, torch_version: str) -> Path:
    """A venv (its python returned) holding pip, setuptools and the metadata of torch
    ``torch_version``, megatron-core 0.19.2 and every other requirement of setup.py."""
    venv = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True, capture_output=True, text=True).stdout.strip())
    # pip itself and the setup.py backend, from the running interpreter.
    ours = Path(sysconfig.get_path("purelib"))
    # (setuptools registers its commands through its dist-info's entry points; the .pth puts its
    # distutils before the standard library's)
    for pattern in ("pip", "setuptools", "setuptools-*.dist-info", "_distutils_hack",
                    "distutils-precedence.pth"):
        for path in ours.glob(pattern):
            (site / path.name).symlink_to(path)
    installed = {"torch": torch_version, "megatron-core": "0.19.2"}
    for requirement in _install_requires():
        version = installed.get(requirement.name, _satisfying_version(requirement))
        _fake_installed(site, requirement.name, version)
    return python


def _project(tmp_path: Path) -> Path:
    """This repository's setup.py with empty packages (pip needs only its metadata)."""
    project = tmp_path / "project"
    for package in ("engine", "data_tools", "csrc", "publishing"):
        (project / package).mkdir(parents=True)
        (project / package / "__init__.py").write_text("")
    shutil.copy(REPO / "setup.py", project / "setup.py")
    return project


@pytest.mark.parametrize("torch_version, constraint", [
    ("2.14.1", None),
    # NGC images: a pre-release build, pinned for every pip run by PIP_CONSTRAINT.
    ("2.14.0a0+nv26.4", "torch==2.14.0a0+nv26.4"),
])
def test_pip_install_keeps_the_environments_torch_and_megatron_core(tmp_path, torch_version,
                                                                     constraint):
    python = _environment(tmp_path, torch_version)
    project = _project(tmp_path)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name, version in OLDER_RELEASES.items():
        _stub_wheel(wheels, name, version)
    # Only what this test gives pip: no configuration files, no PIP_* settings, no index.
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PYTHONWARNINGS="ignore")
    command = [str(python), "-m", "pip", "install", "--dry-run", "--report", "-", "-q",
               "--no-index", "--find-links", str(wheels), "--no-build-isolation",
               "-e", str(project)]
    if constraint:
        (tmp_path / "constraints.txt").write_text(constraint + "\n")
        env["PIP_CONSTRAINT"] = str(tmp_path / "constraints.txt")
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    planned = {item["metadata"]["name"]: item["metadata"]["version"]
               for item in json.loads(result.stdout)["install"]}
    assert planned == {"longctx-engine": "0.1.0"}, (
        f"pip would install {planned} over torch {torch_version} and megatron-core 0.19.2: "
        f"setup.py's bounds must accept them")
