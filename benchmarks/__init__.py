"""Reproducible performance runs (not tests): `make bench` runs `python -m benchmarks.run`."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from typing import Any


def code_digest(*functions: Callable[..., Any]) -> str:
    """12 hex digits of the functions' source: a cache of generated data is reused only as this code made it."""
    return hashlib.sha256("".join(inspect.getsource(f) for f in functions).encode()).hexdigest()[:12]
