"""One function over many items on the Dask cluster: the waves every stage is made of."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from distributed import Client

log = logging.getLogger(__name__)


def run_tasks(client: Client, fn: Callable[..., Any], *per_item: Iterable[Any], **shared: Any) -> list[Any]:
    """`fn(*items, **shared)` for each item, in parallel; the results in item order. Arguments in
    `per_item` go one per task, `shared` to every task. The futures are released as soon as the results
    are here (or on the first failure, which cancels the rest): a finished task whose future lingers would
    be recomputed when its worker dies, costing memory and racing the next wave that reads its output."""
    start = time.perf_counter()
    futures = client.map(fn, *per_item, pure=False, **shared)
    try:
        return client.gather(futures)
    except BaseException:
        client.cancel(futures)  # the rest of a failed wave is not worth finishing
        raise
    finally:
        for future in futures:
            future.release()
        log.info("%s: %d tasks in %.1f s", fn.__name__, len(futures), time.perf_counter() - start)
