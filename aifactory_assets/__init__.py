"""aifactory: catalogue-driven Dagster assets that ingest, validate and shard sector datasets."""
