"""A landing zone's listing as a digest, and the listing a raw generation ingested: what the sensor and
the nightly compare."""

from __future__ import annotations

import hashlib
from typing import Any

from resources.object_store import ObjectInfo


def listing_digest(fingerprints: list[str]) -> str:
    """A landing zone's listing in 16 hex digits (each fingerprint names its key, size and version)."""
    return hashlib.sha256("\n".join(sorted(fingerprints)).encode()).hexdigest()[:16]


def ingested_listing(raw: dict[str, Any] | None) -> str | None:
    """The digest of the listing a raw record ingested (every landed file is in its ledger)."""
    objects = [entry.get("object") for entry in (raw or {}).get("ledger", [])]
    if not objects or None in objects:
        return None
    return listing_digest([ObjectInfo(**o).fingerprint() for o in objects])
