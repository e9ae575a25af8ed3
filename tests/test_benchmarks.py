"""Each benchmark's paths run, at a size of seconds: nothing here is timed (timings belong to `make bench`),
but a change to the functions they call cannot leave `make bench` broken unseen."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from dask.utils import parse_bytes

from benchmarks import pipeline
from benchmarks.run import WORKERS
from benchmarks.synthetic import ensure
from benchmarks.validation import disagreements, run_dask, run_plain_gx


def test_the_pipeline_benchmark_runs_every_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pipeline.main(["--gb", "0.02", "--workdir", str(tmp_path)])
    printed = capsys.readouterr().out
    for path in (
        "raw PyArrow pass",
        "plain Dask",
        "aifactory (raw, validated, shards)",
        "Hugging Face datasets",
        "ShardReader, epoch 0",
        "ShardReader, epoch 1",
    ):
        assert path in printed, printed
    assert "killed for exceeding their memory limit: 0" in printed


def test_the_validation_benchmark_agrees_with_plain_gx(tmp_path: Path) -> None:
    bench = ensure(tmp_path, 40_000, seed=0)
    dask = run_dask(bench, WORKERS, parse_bytes("1GiB"))
    assert disagreements(bench.suite, dask, run_plain_gx(bench)) == []
    assert dask.notes["rows_quarantined"] > 0  # the synthetic data's broken rows were found


def test_the_gpu_loader_benchmark_runs_on_the_cpu(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("torch", reason="torch is the loader's optional extra; `make test` installs it")
    from benchmarks import gpu_loader

    options = ["--rows", "60000", "--shards", "3", "--workers", "1", "--processes", "1", "--reader-threads", "0", "2"]
    monkeypatch.setattr(sys, "argv", ["gpu_loader", *options, "--workdir", str(tmp_path)])
    gpu_loader.main()
    printed = capsys.readouterr().out
    for path in ("DataLoader, 1 workers, epoch 1", "TensorLoader, 1 workers, epoch 1", "ShardReader, 2 threads"):
        assert path in printed, printed
