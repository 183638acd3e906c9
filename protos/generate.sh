#!/usr/bin/env bash
# Generates the Python stubs of the ilf.v1 contract into ilf/v1/.
# With --check, generates into a temporary folder and fails if the committed stubs differ.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python}"
out=.
if [[ "${1:-}" == "--check" ]]; then out=$(mktemp -d); mkdir -p "$out/ilf/v1"; fi
"$python" -m grpc_tools.protoc -Iprotos --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" protos/ilf/v1/*.proto
if [[ "${1:-}" == "--check" ]]; then
  for f in "$out"/ilf/v1/*_pb2*.py*; do
    if ! cmp -s "$f" "ilf/v1/$(basename "$f")"; then echo "stale stub: ilf/v1/$(basename "$f") (run protos/generate.sh)" >&2; exit 1; fi
  done
  echo "stubs are up to date"
fi
