"""Each dataset's Dagster pool: one step at a time reads and writes a dataset's generations and versions."""

from __future__ import annotations

import dagster as dg

from aifactory_assets.catalog import Dataset


def dataset_pool(dataset: Dataset) -> str:
    """Every step of a dataset is in this pool, limited to one (the instance's `concurrency.pools`): a step
    publishing a generation deletes the one before, which another run's step may be reading, and two runs
    writing one version would rewrite shards the other has just committed."""
    return f"aifactory/{dataset.name}"


def set_up_pools(instance: dg.DagsterInstance, datasets: list[Dataset]) -> None:
    """Each dataset's pool given the instance's default limit before a run claims it, by whoever starts
    runs (the sensors, the nightly schedules, `make materialize`): Dagster sets it at the first claim, and
    two processes claiming a new pool in the same instant both got a slot (once in five tries). Marked as
    the default, as Dagster marks it, so a changed `default_limit` still applies; a limit set by hand
    stays. Best effort, never a failed tick: where the storage refuses (two processes setting up one new
    pool on Postgres, whose failed insert spoils the transaction), Dagster still sets it at the first claim."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits or instance.global_op_concurrency_default_limit is None:
        return
    pools = {dataset_pool(dataset) for dataset in datasets}
    try:
        for pool in pools - storage.get_concurrency_keys():
            storage.initialize_concurrency_limit_to_default(pool)
    except Exception as exc:
        dg.get_dagster_logger().warning(
            f"pools {sorted(pools)} not all set up before their first claim ({type(exc).__name__}: {exc}); "
            "Dagster sets each as a step first claims it"
        )


def held_pools(instance: dg.DagsterInstance, datasets: list[Dataset]) -> list[str]:
    """The datasets' pool slots other runs hold, said before this run waits on them: silently, and for
    good when the holder was killed outright (it stays STARTED until terminated in the UI)."""
    if not instance.event_log_storage.supports_global_concurrency_limits:
        return []
    held = []
    for dataset in datasets:
        pool = dataset_pool(dataset)
        for slot in instance.event_log_storage.get_concurrency_info(pool).claimed_slots:
            run = instance.get_run_by_id(slot.run_id)
            status = run.status.value if run else "unknown to this instance"
            held.append(
                f"pool {pool} is held by run {slot.run_id} ({status}, step {slot.step_key}): this run waits for "
                "it; if that run is dead, terminate it in the Dagster UI (Runs, Terminate, then force)"
            )
    return held
