#!/usr/bin/env bash
# The GPU check (bench/gpu/run.py) on a machine with no package index: first install the wheels carried in .whl/
# (flash-linear-attention 0.6.0 and fla-core, fetched beforehand with `bash bench/gpu/run.sh --fetch`), into a
# private folder, then run. Usage: bash bench/gpu/run.sh OUT [run.py options]   |   bash bench/gpu/run.sh --fetch
set -euo pipefail
cd "$(dirname "$0")/../.."
if [[ "${1:-}" == "--fetch" ]]; then  # here, with a package index: the wheels the GPU machine lacks
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform any -d .whl flash-linear-attention==0.6.0 fla-core==0.6.0
  exit 0
fi
out="${1:?usage: bash bench/gpu/run.sh OUT [run.py options]}"; shift
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/linearize_site .whl/*.whl
  export PYTHONPATH="/tmp/linearize_site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec python3 bench/gpu/run.py --out "$out" "$@"
