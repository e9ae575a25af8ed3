"""Each benchmark's paths run, at a size of seconds: nothing here is timed (timings belong to `make bench`),
but a change to the functions they call cannot leave `make bench` broken unseen."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from benchmarks import pipeline, run

BASELINES = ("raw PyArrow pass", "plain Dask", "Hugging Face datasets")


@pytest.mark.parametrize(
    "options", [[], ["--memory-limit", "1GB", "--only-aifactory", "--another-drop"]], ids=["bench", "memory"]
)
def test_the_pipeline_benchmark_runs_every_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str]
) -> None:
    """`make bench-pipeline`, and `make bench-memory`'s options (no baselines, workers' limit given), with
    the run after another drop."""
    pipeline.main(["--gb", "0.02", "--workdir", str(tmp_path), *options])
    printed = capsys.readouterr().out
    assert ("raw reading 1 of 2 files" in printed) is bool(options), printed
    for path in ("aifactory (raw, validated, shards)", "ShardReader, epoch 0", "ShardReader, epoch 1"):
        assert path in printed, printed
    assert all((path in printed) is not bool(options) for path in BASELINES), printed
    assert "killed for exceeding their memory limit: 0" in printed


def test_the_validation_benchmark_agrees_with_plain_gx(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`make bench-validation` at 40,000 rows: its scale checks fail there (the data fits the workers, plain
    GX is faster), but its two paths must agree on every verdict and count."""
    run.main(["--rows", "40000", "--workdir", str(tmp_path)])
    printed = capsys.readouterr().out
    problems = printed.partition("FAILED:")[2]
    assert " on plain GX" not in problems and "missing from the" not in problems, problems  # disagreements
    assert "rows quarantined 0," not in printed  # the synthetic data's broken rows were found


def test_the_gpu_loader_benchmark_runs_on_the_cpu(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("torch", reason="torch is the loader's optional extra; `make test` installs it")
    from benchmarks import gpu_loader

    options = ["--rows", "60000", "--shards", "3", "--workers", "1", "--processes", "1", "--reader-threads", "0", "2"]
    options += ["--allow-cpu"]
    monkeypatch.setattr(sys, "argv", ["gpu_loader", *options, "--workdir", str(tmp_path)])
    gpu_loader.main()
    printed = capsys.readouterr().out
    for path in ("DataLoader, 1 workers, epoch 1", "TensorLoader, 1 workers, epoch 1", "ShardReader, 0 threads"):
        assert path in printed, printed
    assert "ShardReader, 2 threads" in printed, printed


def test_the_gpu_loader_benchmark_refuses_a_machine_without_cuda(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its figures are of batches delivered to a GPU: CPU figures under a GPU benchmark's name would mislead."""
    torch = pytest.importorskip("torch", reason="torch is the loader's optional extra; `make test` installs it")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the refusal cannot be shown here")
    from benchmarks import gpu_loader

    monkeypatch.setattr(sys, "argv", ["gpu_loader", "--rows", "1000", "--workdir", str(tmp_path)])
    with pytest.raises(SystemExit, match="built without CUDA|finds no CUDA device"):
        gpu_loader.main()
    assert not list(tmp_path.iterdir())  # refused before generating anything


def test_every_gpu_loader_path_hashes_the_shards_in_its_first_epoch(tmp_path: Path) -> None:
    """Epoch 0 is published as a new process's first epoch, which hashes every shard: a path timed after
    another must not find the hashes already checked."""
    torch = pytest.importorskip("torch", reason="torch is the loader's optional extra; `make test` installs it")
    from aifactory_assets import loader
    from benchmarks import gpu_loader

    manifest = gpu_loader.generate(tmp_path, 6_000, 2, None, 0)
    for _ in gpu_loader.reader_epochs(manifest, 0, 1_024, count=1):  # an earlier path, as main() runs them
        pass
    hashed_before_making: list[int] = []

    def make():
        hashed_before_making.append(len(loader._VERIFIED))
        return gpu_loader.dataloader(manifest, torch.device("cpu"), 0, 1_024)

    epochs = gpu_loader.epochs(make, torch.device("cpu"), None, count=1)
    assert hashed_before_making == [0]
    assert epochs[0][1] == 6_000  # and it delivered every row
