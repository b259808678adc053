"""Environment variables set for the duration of a block: the C++ dispatch reads its switches
(ALLMEM_SWA_SM90, ALLMEM_TTT_TC, ...) at every call, a backward's when autograd runs it, so the
benchmarks set them around everything a case times."""
from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def env_vars(env: dict[str, str | None] | None):
    """Sets each variable to its value (None: unset) and restores the old values afterwards."""
    env = env or {}
    saved = {k: os.environ.get(k) for k in env}

    def apply(values):
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    apply(env)
    try:
        yield
    finally:
        apply(saved)
