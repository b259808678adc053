#!/usr/bin/env bash
# Syntax/type check one C++ source against torch's headers without touching the shared build:
#   tools/check_cpp.sh path/to/file.cpp
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
INC=$($PY -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I'+p for p in include_paths()))")
PYINC=$($PY -c "import sysconfig; print(sysconfig.get_paths()['include'])")
exec g++ -std=c++20 -fsyntax-only -fopenmp -Wall -Icsrc $INC -I"$PYINC" "$@"
