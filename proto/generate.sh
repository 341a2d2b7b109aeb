#!/bin/sh
# Regenerate meshsec/v1/*_pb2.py, *_pb2_grpc.py, *.pyi from proto/meshsec/v1.
# Usage: proto/generate.sh [OUTPUT_ROOT]   (default: the repository root)
# Needs grpcio-tools==1.85.1 (the [test] extra); the output is committed and
# tests/test_proto_current.py checks it is current.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root}
python=${PYTHON:-python3}
if [ -x "$root/.venv/bin/python" ] && [ -z "${PYTHON:-}" ]; then
    python="$root/.venv/bin/python"
fi
mkdir -p "$out/meshsec/v1"
cd "$root"
"$python" -m grpc_tools.protoc -I proto \
    --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
    proto/meshsec/v1/controller.proto
