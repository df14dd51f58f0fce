#!/bin/bash
# Entry point of the Ascend image: load CANN's environment the way Huawei documents it
# (source set_env.sh, which puts atc on PATH and sets LD_LIBRARY_PATH, PYTHONPATH, ASCEND_OPP_PATH),
# then run deployer from its own venv. The venv is deliberately not on PATH: atc compiles operators
# with the `python3` it finds there, which must stay CANN's Python and its pinned packages.
set -eo pipefail
# shellcheck source=/dev/null
source /usr/local/Ascend/ascend-toolkit/set_env.sh
exec /opt/deployer/bin/deploy "$@"
