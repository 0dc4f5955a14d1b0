"""``medaudit scan SOURCE --version V --out DIR`` and ``medaudit scan report DIR``.

The scan runs every image of SOURCE through one served version's audit engine and writes Parquet
shards (docs/scan.md); ``scan report`` summarises a scan folder as HTML. Heavy imports happen
inside the command.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import typer

EXIT_BAD_INPUT = 2


def _rate_column() -> object:
    from rich.progress import ProgressColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        """Images per second over rich's recent window."""

        def render(self, task: object) -> Text:
            speed = getattr(task, "speed", None)
            return Text("–" if speed is None else f"{speed:.1f} img/s", style="progress.data.speed")

    return Rate()


def local_ray_note(ray: str | None, gpu: bool, cpus: int) -> str | None:
    """What to tell someone who asks for ``--ray local`` on CPUs: a Ray started here only has this
    machine's cores, and there the local worker pool is faster (Ray's daemons take a share of the
    cores and its actors cost more CPU per image: docs/scan.md, benchmarks/results/scan_cpu.md)."""
    if ray != "local" or gpu:
        return None
    return (
        f"--ray local runs on this machine's {cpus} CPU{'s' if cpus != 1 else ''} only, where the local "
        "worker pool (leave out --ray) scans faster: Ray's daemons share the cores (docs/scan.md). "
        "Ray pays off across machines: --ray auto or --ray ADDRESS."
    )


def scan(
    source: str = typer.Argument(
        ...,
        help="A folder of images / DICOM files, a dataset spec KIND:PATH (docs/data.md), a list file "
        "(.txt/.lst/.csv) - or the word `report` followed by a scan folder.",
    ),
    directory: Path | None = typer.Argument(
        None, show_default=False, help="With `report`: the scan folder to summarise."
    ),
    version: str | None = typer.Option(
        None, "--version", help="The stored version (vanilla, or <model>:<version>) that audits."
    ),
    out: Path | None = typer.Option(
        None, help="Scan folder (manifest, items, Parquet shards); an existing one is resumed."
    ),
    workers: int = typer.Option(
        -1,
        help="Local worker processes, one per core (-1: every usable core, or one per GPU); 0 scans "
        "in this process. With --ray: actors (-1: one per CPU or GPU of the cluster).",
    ),
    ray: str | None = typer.Option(
        None,
        help="Run on Ray: `local` (start one here), `auto` (join the cluster started with `ray start`) "
        "or a cluster address.",
    ),
    device: str = typer.Option("cpu", help="Where LRP runs: cpu, cuda, cuda:N, or auto (a GPU if any)."),
    heatmaps: bool = typer.Option(
        False, help="Full audits: keep each raw class heatmap (float16) and present concepts' masks (PNG)."
    ),
    fpr: float | None = typer.Option(None, help="Presence thresholds' FPR (default: the bank's own)."),
    policy: str = typer.Option(
        "", help="Flag policy, as MEDAUDIT_FLAG_POLICY takes it (e.g. share=0.2,ruler:enabled=0)."
    ),
    model_name: str | None = typer.Option(None, help="Store name of a --version given without one."),
    batch_size: int = typer.Option(32, help="Images per engine call."),
    shard_size: int = typer.Option(256, help="Images per shard (the unit of resumption)."),
    decode_threads: int = typer.Option(0, help="Decoding threads per worker (0: 1 on CPU, 8 on a GPU)."),
    encode_threads: int = typer.Option(
        1, help="With --heatmaps: threads encoding masks while the next batch runs (0: between batches)."
    ),
    cuda_graphs: bool = typer.Option(
        False, help="On a GPU: replay screens at the fixed --batch-size as CUDA graphs (ignored on CPU)."
    ),
    top: int = typer.Option(12, help="With `report`: thumbnails per concept."),
) -> None:
    """Audit every image of an archive into Parquet, resumably; or `scan report DIR` for its summary."""
    from medaudit.cli.console import console
    from medaudit.models.errors import MedauditError

    if source == "report":
        if directory is None:
            raise typer.BadParameter("medaudit scan report DIR: name the scan folder")
        from medaudit.cli.scan.report import write_scan_report

        try:
            path = write_scan_report(directory, top=top)
        except MedauditError as e:
            console.print(f"[red]scan report failed:[/] {e}")
            raise typer.Exit(EXIT_BAD_INPUT) from e
        console.print(f"report: {path}\nreview sheet: {directory / 'review.csv'}")
        return
    if directory is not None:
        raise typer.BadParameter(f"unexpected second argument {str(directory)!r}; the scan folder is --out")
    if version is None or out is None:
        raise typer.BadParameter("a scan needs --version and --out")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from medaudit.cli.scan.run import scan as run_scan
    from medaudit.cli.scan.worker import ScanOptions
    from medaudit.service.config import DEFAULT_MODEL_NAME, audit_device, usable_cpus

    try:
        dev = audit_device({"MEDAUDIT_AUDIT_DEVICE": device})
    except MedauditError as e:
        raise typer.BadParameter(f"--device {device}: {e}") from e
    gpu = dev.startswith("cuda")
    if workers < 0:
        workers = 0 if ray else (1 if gpu else usable_cpus())
    options = ScanOptions(
        version=version,
        model_name=model_name or DEFAULT_MODEL_NAME,
        fpr=fpr,
        policy=policy,
        heatmaps=heatmaps,
        device=dev,
        batch_size=batch_size,
        decode_threads=decode_threads or (8 if gpu else 1),
        encode_threads=encode_threads,
        cuda_graphs=cuda_graphs,
    )
    note = local_ray_note(ray, gpu, usable_cpus())
    if note:
        console.print(f"[yellow]note:[/] {note}")
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _rate_column(),
        TimeRemainingColumn(),
    )
    try:
        with Progress(*columns, console=console) as prog:  # type: ignore[arg-type]

            def start(done: int, total: int) -> Callable[[int], None]:
                task = prog.add_task(f"scan {options.tag}", total=total, completed=done)
                return lambda n: prog.advance(task, n)

            summary = run_scan(
                source, out, options, workers=workers, ray=ray, shard_size=shard_size, progress=start
            )
    except MedauditError as e:
        console.print(f"[red]scan failed:[/] {e}")
        raise typer.Exit(EXIT_BAD_INPUT) from e
    ran = (
        f" · {summary.shards_run} shards in {summary.seconds:.0f} s on {summary.runner} "
        f"({summary.images_per_s:.1f} img/s, worker start included)"
        if summary.shards_run
        else ""
    )
    console.print(
        f"{summary.n_items} images ({summary.shards_skipped} of {summary.n_shards} shards already done) · "
        f"decoded {summary.n_ok} · errors {summary.n_errors} · flagged {summary.n_flagged}{ran}\n"
        f"scan folder: {out}\nsummary: medaudit scan report {out}"
    )
