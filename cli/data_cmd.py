"""``medaudit data export`` and ``medaudit data check``: synthderm to disk in the layouts people
download, and a dataset on disk read end to end before a build trips over it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

EXIT_BAD_INPUT = 2


def data_export(
    out: Path = typer.Argument(..., help="Folder to write the images, tables, artifacts.csv and masks to."),
    size: int = typer.Option(128),
    seed: int = typer.Option(0),
    variant: str = typer.Option("ch", help="ch (training distribution), clean or attacked."),
    attack: str = typer.Option("band_aid", help="Artifact for the attacked variant."),
    layout: str = typer.Option("folder", help="folder (labels.csv), isic2019 or chexpert (docs/data.md)."),
    preset: str = typer.Option(
        "binary", help="binary (benign, malignant) or isic_like (nevus, melanoma, bcc)."
    ),
    masks: bool = typer.Option(True, help="Write the true artifact masks (--no-masks: annotations only)."),
    masks_dir: Path | None = typer.Option(
        None, help="Hold the masks back in this folder instead of <out>/masks."
    ),
) -> None:
    """Write synthderm to disk, readable by the matching dataset adapter."""
    from medaudit.cli.console import console, progress_bars
    from medaudit.models.data.synthetic import SynthDerm, SynthDermConfig
    from medaudit.models.errors import MedauditError

    try:
        ds = SynthDerm(SynthDermConfig.preset(preset, seed=seed, size=size))
        with progress_bars() as bars:
            root = ds.export(
                out,
                variant=variant,
                attack=attack,
                progress=bars("export", len(ds)),
                layout=layout,
                masks=masks,
                mask_dir=masks_dir,
            )
    except MedauditError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    meta = json.loads((root / "synthderm.json").read_text())
    console.print(f"wrote {len(ds)} images to {out}; open it as --data '{meta['open_with']}'")


def data_check(
    spec: str = typer.Argument(..., help="The dataset, KIND:PATH?OPTIONS (docs/data.md)."),
    images: bool = typer.Option(True, help="Read every image and mask (--no-images: the tables only)."),
    out: Path | None = typer.Option(None, help="Write the report as JSON."),
) -> None:
    """Read a dataset end to end: tables, images, masks, annotations, and its group-aware split."""
    from rich.table import Table

    from medaudit.cli.console import console, progress_bars
    from medaudit.models.data.folder import ImageDataset
    from medaudit.models.data.registry import open_dataset
    from medaudit.models.data.splits import split_report
    from medaudit.models.errors import MedauditError

    try:
        ds = open_dataset(spec)
        checked: dict[str, Any] = {}
        if images and isinstance(ds, ImageDataset):
            with progress_bars() as bars:
                checked = ds.validate(bars)
        rep = (
            ds.split_report()
            if isinstance(ds, ImageDataset)
            else split_report(ds.labels, ds.label_names, ds.split_of, ds.groups)
        )
    except MedauditError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    t = Table(title=f"{spec}: {len(ds.labels)} images, {rep['groups']} groups")
    t.add_column("split")
    t.add_column("images / groups", justify="right")
    for name in ds.label_names:
        t.add_column(name, justify="right")
    for s, r in rep["splits"].items():
        t.add_row(
            s,
            f"{r['images']} / {r['groups']}",
            *(f"{c['images']} / {c['groups']}" for c in r["per_class"].values()),
        )
    console.print(t)
    console.print(f"groups in more than one split: {rep['groups_in_several_splits']}")
    for w in rep["warnings"]:
        console.print(f"[yellow]warning:[/] {w}")
    arts = ds.artifact_ids("all")
    rep["artifacts"] = {a: {"images": len(v), "masks": ds.mask_source_of(a)} for a, v in arts.items()}
    for a, v in rep["artifacts"].items():
        console.print(f"artifact {a}: {v['images']} images, masks: {v['masks']}")
    if checked:
        console.print(
            f"read {checked['images']} images and {checked['masks']} masks: all readable, masks fit"
        )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rep, indent=1))
