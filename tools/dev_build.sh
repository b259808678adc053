#!/usr/bin/env bash
# Developer loop: (re)build the extension in place into the dev venv, CPU-only unless
# ALLMEM_FORCE_CPU=0 is given. Serialized with a lock so parallel developers don't collide.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}  # the Makefile's venv (make install creates it)
export ALLMEM_FORCE_CPU=${ALLMEM_FORCE_CPU:-1} MAX_JOBS=${MAX_JOBS:-2}
exec flock /tmp/allmem_dev_build.lock "$VENV/bin/pip" install -q --no-build-isolation --no-deps -e .
