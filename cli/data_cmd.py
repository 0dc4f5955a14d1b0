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
    styles: str = typer.Option(
        "house",
        help="Artifact looks: house (one per artifact), split (style families, some only in "
        "val or test; also writes artifact_styles.json) or all (docs/data.md).",
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
        ds = SynthDerm(SynthDermConfig.preset(preset, seed=seed, size=size, styles=styles))
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
    looks = style_summary(ds)
    for a, v in rep["artifacts"].items():
        line = f"artifact {a}: {v['images']} images, masks: {v['masks']}"
        if a in looks:
            v["styles"] = looks[a]
            per = looks[a]["per_style"]
            unseen = [st.split("/", 1)[-1] for st, n in per.items() if not n.get("train")]
            line += f", styles named on {looks[a]['named']}: {len(per)} looks"
            if unseen:
                shown = ", ".join(unseen[:6]) + (", …" if len(unseen) > 6 else "")
                line += f", {len(unseen)} never in train ({shown})"
        console.print(line)
    if checked:
        console.print(
            f"read {checked['images']} images and {checked['masks']} masks: all readable, masks fit"
        )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rep, indent=1))


def style_summary(ds: Any) -> dict[str, dict[str, Any]]:
    """Per artifact of a dataset that records styles (``styled``): on how many images a style is
    named and, per style, its images per split; empty for a dataset without styles."""
    if not getattr(ds, "styled", False):
        return {}
    out: dict[str, dict[str, Any]] = {}
    for split in ("train", "val", "test"):
        for a, by in ds.artifact_styles(split).items():
            entry = out.setdefault(a, {"named": 0, "per_style": {}})
            entry["named"] += len(by)
            for st in by.values():
                counts = entry["per_style"].setdefault(st, {})
                counts[split] = counts.get(split, 0) + 1
    for entry in out.values():
        entry["per_style"] = dict(sorted(entry["per_style"].items()))
    return {a: e for a, e in out.items() if e["named"]}
