"""``medaudit scan`` on a real local Ray (``ray.init(num_cpus=2)``, no mock): 2,000 synthderm
images in a mixed folder (PNG, JPEG, DICOM, corrupt files) give the in-process scan's rows; a
worker killed mid-scan is restarted by Ray and its shard retried, and a scan whose workers may
not restart fails, then resumes: each image exactly once either way."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from scan_data import FPR, POLICY, assert_same_rows

from medaudit.cli.scan.output import ScanFolder
from medaudit.cli.scan.run import scan
from medaudit.cli.scan.runners import RayRunner, ScanRunError
from medaudit.cli.scan.worker import ScanOptions
from medaudit.testing.scan import write_mixed_folder

ray = pytest.importorskip("ray", reason="ray is the `scan` extra (make install puts it in)")

N_IMAGES = 2000
SHARD = 100


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mixed_folder(tmp_path_factory.mktemp("scan_ray") / "archive", N_IMAGES, corrupt=6)


@pytest.fixture(scope="module")
def options(tiny_store: Path) -> ScanOptions:
    return ScanOptions("vanilla", home=str(tiny_store), fpr=FPR, policy=POLICY)


@pytest.fixture(scope="module")
def reference(archive: Path, options: ScanOptions, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("ref") / "scan"
    summary = scan(str(archive), out, options, workers=0, shard_size=SHARD)
    assert (summary.n_items, summary.n_errors) == (N_IMAGES + 6, 6)
    return ScanFolder(out).read().to_pylist()


def _kill_first_worker_once(killed: list[int]) -> Any:
    def on_shard(k: int, runner: Any) -> None:
        if not killed:
            pid = runner.pids()[0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    return on_shard


@pytest.mark.slow
def test_ray_scans_through_killed_workers_to_the_in_process_rows_once_each(
    local_ray: None, archive: Path, options: ScanOptions, reference: list[dict], tmp_path: Path
) -> None:
    out = tmp_path / "scan"
    folder = ScanFolder(out)
    # 1. Workers that may not restart: killing one ends the scan, with what finished kept.
    runner = RayRunner(options, workers=2, max_restarts=0)
    killed: list[int] = []
    try:
        with pytest.raises(ScanRunError, match="run the same command again to resume"):
            scan(
                str(archive),
                out,
                options,
                shard_size=SHARD,
                runner=runner,
                on_shard=_kill_first_worker_once(killed),
            )
    finally:
        runner.close()
    done = folder.done()
    assert 1 <= len(done) < 21 and not folder.read_manifest()["complete"]
    # 2. Resumed with restarting workers, one killed again mid-scan: Ray restarts it, retries its shard.
    runner = RayRunner(options, workers=2)
    killed.clear()
    try:
        summary = scan(str(archive), out, options, runner=runner, on_shard=_kill_first_worker_once(killed))
        assert killed and killed[0] not in runner.pids()  # the restarted actor is a new process
    finally:
        runner.close()
    assert (summary.shards_skipped, summary.shards_run, summary.n_errors) == (len(done), 21 - len(done), 6)
    assert folder.read_manifest()["complete"]
    assert_same_rows(folder.read().to_pylist(), reference)


def test_ray_local_joins_the_running_ray(
    local_ray: None, archive: Path, options: ScanOptions, tmp_path: Path
) -> None:
    """``--ray local`` inside a process where Ray is up uses that Ray and leaves it running."""
    summary = scan(str(archive / "bad"), tmp_path / "scan", options, ray="local", workers=1)
    assert summary.n_errors == 6 and summary.runner == "ray" and ray.is_initialized()
