#!/usr/bin/env bash
# Set up ktrans on this machine: torch (only if none is importable), the package and its
# dependencies, and the C++ extension. Idempotent: re-running only rebuilds what changed.
#
#   bash install.sh            # uses the python3 on PATH (or $PYTHON)
#
# An existing torch (a CUDA build, say) is never replaced. On a machine with no package index,
# pre-install the dependencies; this script then only builds ktrans itself.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
PIP=("$PY" -m pip install --disable-pip-version-check -q)

have() { "$PY" -c "import $1" >/dev/null 2>&1; }

if ! have torch; then
  echo "install.sh: no torch found; installing torch==2.13.0 (CPU build where offered)"
  "${PIP[@]}" torch==2.13.0
fi

# Build tools are needed in this environment (no build isolation: an offline machine has no
# index to fetch an isolated build environment from).
missing_build=()
have scikit_build_core || missing_build+=("scikit-build-core>=0.10")
have pybind11 || missing_build+=("pybind11>=2.12")
[ ${#missing_build[@]} -eq 0 ] || "${PIP[@]}" "${missing_build[@]}"

# Runtime and test dependencies: only ask pip when something is missing, so a re-run (and an
# offline machine that has them) does not touch the network.
deps_ok=1
for mod in numpy gguf yaml transformers tokenizers safetensors jinja2 fastapi uvicorn rich llguidance \
           pytest pytest_timeout hypothesis openai httpx jsonschema playwright triton accelerate; do
  have "$mod" || { deps_ok=0; break; }
done

echo "install.sh: building the ktrans C++ extension"
if [ $deps_ok = 1 ]; then
  "${PIP[@]}" --no-build-isolation --no-deps -e .
else
  "${PIP[@]}" --no-build-isolation -e ".[test]"
fi

"$PY" -m ktrans info
