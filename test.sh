#!/usr/bin/env bash
# The test command (README, CI): sets up .venv with the dev requirements, then runs pytest.
# Extra arguments go to pytest, e.g. `bash test.sh tests/test_model.py -k packed`.
set -euo pipefail
cd "$(dirname "$0")"
source ./setup.sh requirements-dev.txt
exec "$PYTHON" -m pytest -q "$@"
