#!/usr/bin/env bash
# Developer rebuild of the C++ extension after editing csrc/. Serialised with a lock so that
# several builds started at once do not write the same build tree.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p build
exec 9>build/.rebuild.lock
flock 9
python3 -m pip install --disable-pip-version-check -q --no-build-isolation --no-deps -e . "$@"
