"""Reproducible performance runs (not tests): `make bench` runs `python -m benchmarks.run`."""

from __future__ import annotations

import hashlib
import inspect
from typing import Any


def code_digest(*defined_in: Any) -> str:
    """12 hex digits of the source of the modules that define `defined_in` (functions or modules): a cache
    of generated data is reused only as that code made it, constants and helpers included."""
    modules = sorted({inspect.getmodule(thing) for thing in defined_in}, key=lambda module: module.__name__)
    return hashlib.sha256("".join(inspect.getsource(module) for module in modules).encode()).hexdigest()[:12]
