"""``medaudit scan`` on one machine: sources, the shard folder, resume, the local pool (a worker
killed mid-scan), bad files, the report, and that its rows are the service engine's own.

A small mixed folder (PNG, JPEG, DICOM, corrupt files) and the tiny random-weight store; the
2,000-image comparison against Ray is tests/unit/test_scan_ray.py.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from scan_data import FPR, POLICY, assert_same_rows

from medaudit.cli.scan.output import ScanFolder, ScanOutputError
from medaudit.cli.scan.run import scan
from medaudit.cli.scan.runners import LocalPoolRunner, Runner
from medaudit.cli.scan.sources import ScanSourceError, list_source
from medaudit.cli.scan.worker import ScanOptions
from medaudit.testing.scan import CORRUPT, write_mixed_folder

N_IMAGES = 60


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mixed_folder(tmp_path_factory.mktemp("scan") / "archive", N_IMAGES, corrupt=3)


@pytest.fixture(scope="module")
def options(tiny_store: Path) -> ScanOptions:
    return ScanOptions("vanilla", home=str(tiny_store), fpr=FPR, policy=POLICY, batch_size=8)


@pytest.fixture(scope="module")
def reference(archive: Path, options: ScanOptions, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The in-process scan's rows: what every other way of scanning must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "scan"
    summary = scan(str(archive), out, options, workers=0, shard_size=16)
    assert summary.n_items == N_IMAGES + 3 and summary.shards_run == summary.n_shards == 4
    return ScanFolder(out).read().to_pylist()


def test_a_folder_lists_every_image_sorted_with_its_site(archive: Path) -> None:
    items = list_source(str(archive))
    assert len(items) == N_IMAGES + 3
    assert [it.id for it in items] == sorted(it.id for it in items)
    assert {it.folder for it in items} == {"bad", "site_a/2024", "site_a/2025", "site_b", "site_c/ward_1"}
    assert {Path(it.path).suffix for it in items} == {".png", ".jpg", ".dcm"}


def test_a_list_file_keeps_its_order_and_refuses_a_repeat(archive: Path, tmp_path: Path) -> None:
    names = ["site_b/img00002.dcm", "site_a/2024/img00000.png"]
    lst = tmp_path / "files.txt"
    lst.write_text("# two images\n" + "\n".join(str(archive / n) for n in names) + "\n")
    assert [Path(it.path) for it in list_source(str(lst))] == [archive / n for n in names]
    lst.write_text(f"{archive / names[0]}\n{archive / names[0]}\n")
    with pytest.raises(ScanSourceError, match="twice"):
        list_source(str(lst))


def test_an_adapter_spec_gives_labels_and_groups(three_class_folder: Path) -> None:
    items = list_source(f"folder:{three_class_folder}")
    assert len(items) == 165
    assert {it.label for it in items} == {"nevus", "melanoma", "bcc"}
    assert all(it.group and Path(it.path).is_file() for it in items)


@pytest.mark.parametrize(
    ("source", "match"),
    [
        ("synthderm", "export it first"),
        ("/no/such/folder", "neither a folder"),
        ("nosuchkind:/x", "nosuchkind"),
    ],
)
def test_sources_that_name_nothing_are_refused(source: str, match: str) -> None:
    from medaudit.models.errors import MedauditError

    with pytest.raises(MedauditError, match=match):
        list_source(source)


def test_bad_files_are_rows_with_their_error(reference: list[dict]) -> None:
    bad = [r for r in reference if not r["ok"]]
    assert len(bad) == 3 and all(r["error"] for r in bad)
    assert sorted(r["id"].split("_", 1)[1] for r in bad) == sorted(CORRUPT)
    assert all(r["pred_label"] is None and r["flagged"] is None for r in bad)
    good = [r for r in reference if r["ok"]]
    assert {r["format"] for r in good} == {"png", "jpeg", "dicom"}
    assert any(r["flagged"] for r in good) and not all(r["flagged"] for r in good)


def test_rows_are_the_service_engines_screen_and_policy(
    reference: list[dict], options: ScanOptions, archive: Path
) -> None:
    """No second implementation: each row equals AuditEngine.audit on the same pixels (the
    service's full audit, not the screen the scan calls) with the policy's decision on it."""
    from medaudit.service.audit import AuditEngine
    from medaudit.service.flags.policy import PolicyConfig, evaluate
    from medaudit.service.inputs import decode_image, to_model_input

    engine = AuditEngine.from_store("vanilla", home=options.home, fpr=FPR)
    good = [r for r in reference if r["ok"]][:8]
    pixels = [
        to_model_input(decode_image(Path(r["path"]).read_bytes()), engine.size, engine.cfg.resize)
        for r in good
    ]
    for row, res in zip(good, engine.audit(pixels), strict=True):
        assert row["pred_label"] == res.prediction.label
        for c in res.concepts:
            assert row[f"{c.concept}_present"] == c.present
            np.testing.assert_allclose(row[f"{c.concept}_score"], c.score, rtol=1e-5)
            np.testing.assert_allclose(row[f"{c.concept}_share"], c.relevance_share, rtol=1e-4, atol=1e-9)
        assert row["flagged"] == evaluate(res, PolicyConfig.parse(POLICY)).flagged


def test_an_interrupted_scan_resumes_each_image_exactly_once(
    archive: Path, options: ScanOptions, reference: list[dict], tmp_path: Path
) -> None:
    out = tmp_path / "scan"

    def stop_after_two(k: int, runner: Runner) -> None:
        if len(ScanFolder(out).done()) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        scan(str(archive), out, options, shard_size=16, on_shard=stop_after_two)
    folder = ScanFolder(out)
    assert len(folder.done()) == 2 and not folder.read_manifest()["complete"]
    (folder.shards / ".part-000003.parquet.tmp-1").write_bytes(b"half a shard")  # a killed write
    summary = scan(str(archive), out, options, shard_size=999)  # the folder's shard size wins
    assert (summary.shards_skipped, summary.shards_run, summary.n_shards) == (2, 2, 4)
    assert folder.read_manifest()["complete"] and not list(folder.shards.glob(".part-*"))
    assert_same_rows(folder.read().to_pylist(), reference)
    again = scan(str(archive), out, options)
    assert again.shards_run == 0 and folder.read().num_rows == N_IMAGES + 3


def test_a_folder_of_another_scan_is_refused(archive: Path, options: ScanOptions, tmp_path: Path) -> None:
    out = tmp_path / "scan"
    scan(str(archive / "bad"), out, options, shard_size=16)
    with pytest.raises(ScanOutputError, match="fpr: 0.5 there, 0.2 now"):
        scan(str(archive / "bad"), out, ScanOptions("vanilla", home=options.home, fpr=0.2, policy=POLICY))


@pytest.mark.slow
def test_local_pool_survives_a_killed_worker_with_each_image_once(
    archive: Path, options: ScanOptions, reference: list[dict], tmp_path: Path
) -> None:
    out = tmp_path / "scan"
    runner = LocalPoolRunner(options, workers=2)
    killed: list[int] = []

    def kill_one(k: int, r: Any) -> None:
        if not killed:
            pid = r.pids()[0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    summary = scan(str(archive), out, options, shard_size=8, runner=runner, on_shard=kill_one)
    runner.close()
    assert killed and runner.restarts == 1
    assert summary.shards_run == summary.n_shards == 8
    assert_same_rows(ScanFolder(out).read().to_pylist(), reference)


def test_heatmaps_keep_raw_float16_heatmaps_and_masks(
    archive: Path, options: ScanOptions, tiny_store: Path, tmp_path: Path
) -> None:
    from dataclasses import replace

    out = tmp_path / "scan"
    scan(str(archive / "site_b"), out, replace(options, heatmaps=True), shard_size=64)
    table = pq.read_table(ScanFolder(out).shard_path(0))
    rows = table.to_pylist()
    heat = np.frombuffer(rows[0]["heatmap"], dtype="<f2")
    assert heat.shape == (32 * 32,) and np.isfinite(heat).all() and np.abs(heat).max() > 0
    masks = [r["band_aid_mask_png"] for r in rows if r["band_aid_present"]]
    assert masks and all(m.startswith(b"\x89PNG") for m in masks)
    assert all(r["band_aid_mask_png"] is None for r in rows if not r["band_aid_present"])


def test_masks_encoded_off_the_critical_path_give_the_same_rows(
    archive: Path, options: ScanOptions, tmp_path: Path
) -> None:
    """``--heatmaps`` with the masks encoded on a thread while the next batch runs (the default)
    and between batches: the same rows, heatmap and mask bytes included. ``cuda_graphs`` on the
    CPU keeps the plain screen path and says why."""
    from dataclasses import replace

    from medaudit.cli.scan.worker import ShardScanner

    heat = replace(options, heatmaps=True, fpr=0.5)  # FPR 0.5: masks on many images
    rows = {}
    for threads in (0, 2):
        out = tmp_path / f"scan-{threads}"
        scan(str(archive), out, replace(heat, encode_threads=threads), workers=0, shard_size=16)
        rows[threads] = ScanFolder(out).read().to_pylist()
    assert sum(r["band_aid_mask_png"] is not None for r in rows[0]) > 5
    assert rows[2] == rows[0]
    scanner = ShardScanner(replace(options, cuda_graphs=True))
    try:
        assert not scanner.graphs.graphed and "CUDA" in scanner.graphs.reason
    finally:
        scanner.close()


def test_report_has_prevalence_distributions_top_images_and_a_review_sheet(
    archive: Path, options: ScanOptions, reference: list[dict], tmp_path: Path
) -> None:
    import csv

    from medaudit.cli.scan.report import write_scan_report
    from medaudit.models.audit.review import SHEET_COLUMNS

    out = tmp_path / "scan"
    scan(str(archive), out, options, shard_size=64)
    page = write_scan_report(out, top=5).read_text()
    for heading in ("Prevalence per predicted class", "Prevalence per source folder", "Score distributions"):
        assert heading in page
    assert "site_c/ward_1" in page and "truncated.png" in page
    assert page.count("data:image/png;base64,") == 2 + 2 + 2 * 5  # 2 bar charts, 2 histograms, 2×5 thumbnails
    with (out / "review.csv").open() as f:
        sheet = list(csv.DictReader(f))
    assert tuple(sheet[0]) == SHEET_COLUMNS
    present = {c: sum(bool(r[f"{c}_present"]) for r in reference if r["ok"]) for c in ("band_aid", "ruler")}
    assert {c: sum(r["concept"] == c for r in sheet) for c in present} == present
    ranks = [float(r["score"]) for r in sheet if r["concept"] == "band_aid"]
    assert ranks == sorted(ranks, reverse=True)
    assert len((out / "errors.csv").read_text().splitlines()) == 1 + 3


def test_the_command_scans_and_reports(archive: Path, tiny_store: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medaudit.cli.commands import app

    out = tmp_path / "scan"
    env = {"BENTOML_HOME": str(tiny_store)}
    res = CliRunner().invoke(
        app,
        ["scan", str(archive / "site_b"), "--version", "vanilla", "--out", str(out), "--workers", "0"],
        env=env,
    )
    assert res.exit_code == 0, res.output
    assert "errors 0" in res.output and ScanFolder(out).read_manifest()["complete"]
    res = CliRunner().invoke(app, ["scan", "report", str(out)], env=env)
    assert res.exit_code == 0, res.output and (out / "report.html").is_file()
    res = CliRunner().invoke(
        app, ["scan", "/no/such", "--version", "vanilla", "--out", str(tmp_path / "x")], env=env
    )
    assert res.exit_code == 2 and "neither a folder" in res.output


def test_a_local_ray_on_cpus_is_pointed_to_the_local_pool() -> None:
    """`--ray local` on CPUs gets a note naming the faster local pool and where Ray pays off; a
    cluster, a GPU actor or no Ray at all get none."""
    from medaudit.cli.scan_cmd import local_ray_note

    note = local_ray_note("local", gpu=False, cpus=2)
    assert note is not None and "2 CPUs" in note and "leave out --ray" in note and "--ray auto" in note
    assert "1 CPU only" in (local_ray_note("local", gpu=False, cpus=1) or "")
    assert local_ray_note("auto", gpu=False, cpus=2) is None
    assert local_ray_note("local", gpu=True, cpus=2) is None
    assert local_ray_note(None, gpu=False, cpus=2) is None


@pytest.mark.e2e
def test_the_report_renders_every_image_in_headless_chromium(
    archive: Path, options: ScanOptions, tmp_path: Path
) -> None:
    import re
    import shutil
    import subprocess

    from medaudit.cli.scan.report import write_scan_report

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "headless Chromium is needed; install it with: apt-get update && apt-get install -y chromium"
    out = tmp_path / "scan"
    scan(str(archive), out, options, shard_size=64)
    page = write_scan_report(out, top=4)
    dom = subprocess.run(
        [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={tmp_path / 'p'}",
            "--dump-dom",
        ]
        + [page.resolve().as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    check = re.search(r'data-loaded="(\d+)"\s+data-total="(\d+)"', dom.stdout) or re.search(
        r'data-total="(\d+)"\s+data-loaded="(\d+)"', dom.stdout
    )
    assert check, "the page's image check did not run"
    n = page.read_text().count("<img ")
    assert int(check.group(1)) == int(check.group(2)) == n == 2 + 2 + 2 * 4


def test_threaded_decoding_gives_the_same_rows(
    archive: Path, options: ScanOptions, reference: list[dict], tmp_path: Path
) -> None:
    """The GPU path decodes on threads (--decode-threads, 8 by default on a GPU): same rows."""
    from dataclasses import replace

    out = tmp_path / "scan"
    scan(str(archive), out, replace(options, decode_threads=3), shard_size=16)
    assert_same_rows(ScanFolder(out).read().to_pylist(), reference)


def test_asking_for_a_gpu_that_is_not_there_is_a_clear_error(tiny_store: Path, tmp_path: Path) -> None:
    import re

    import torch
    from typer.testing import CliRunner

    from medaudit.cli.commands import app

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    res = CliRunner().invoke(
        app, ["scan", str(tmp_path), "--version", "vanilla", "--out", str(tmp_path / "o"), "--device", "cuda"]
    )
    text = re.sub(r"[\s│╭╮╰╯─]+", " ", res.output)  # the words, without rich's error box
    assert res.exit_code == 2 and "--device cuda" in text and "torch sees no GPU" in text, text
