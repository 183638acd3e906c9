#!/usr/bin/env bash
# Rewrites docker/constraints.txt from the project's venv (run after the tests pass on changed dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
{
  echo "# Exact versions the images install (pip --constraint): the set the test suite ran against."
  echo "# Written by docker/update-constraints.sh; tests/test_deploy.py checks every runtime dependency is pinned here."
  # The CPU wheel's local label (+cpu) is dropped so the same pin also accepts the CUDA wheel in the trainer image.
  "$python" -m pip freeze --exclude-editable | grep -v -E '^(ilf==|-e )' | sed 's/+cpu$//'
} > docker/constraints.txt.new
mv docker/constraints.txt.new docker/constraints.txt
