"""``medaudit annotate``: the review loop of method.md §1 and §6, on any dataset.

Rank every image of a split by a concept's CAV score (a CAV fitted on the current annotations)
and write a review sheet (CSV + an HTML contact sheet of thumbnails); then ``--apply`` the filled
sheet to turn the verdicts into annotations, and rank again: retrieval → relabel → refit.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from medaudit.cli.classifier import MODEL_OPT, WEIGHTS_OPT, check_classes, load_classifier, parse_list

if TYPE_CHECKING:
    from rich.console import Console

    from medaudit.models.data.protocol import AnnotatedDataset

EXIT_BAD_INPUT = 2


def annotate(
    data: str = typer.Option(..., "--data", help="The dataset, KIND:PATH?OPTIONS (docs/data.md)."),
    concept: str | None = typer.Option(
        None, help="The artifact to rank by (its CAV is fitted on the annotations)."
    ),
    model: Path | None = MODEL_OPT,
    weights: Path | None = WEIGHTS_OPT,
    split: str = typer.Option("all", help="Split to rank: train, val, test or all."),
    layer: str | None = typer.Option(
        None, help="CAV layer (default: the concept's built-in layer, else the model's)."
    ),
    cav_kind: str = typer.Option("svm", help="CAV estimator (svm for retrieval, method.md §1.3)."),
    scope: str | None = typer.Option(None, help="Classes whose training images fit the CAV (default: all)."),
    out: Path = typer.Option(Path("review"), help="Folder for <concept>_review.csv and .html."),
    thumbs: int = typer.Option(200, help="Images shown as thumbnails in the HTML (the CSV has all)."),
    apply: Path | None = typer.Option(
        None, "--apply", help="A filled review sheet: turn its verdicts into the dataset's annotations."
    ),
    into: Path | None = typer.Option(
        None,
        help="With --apply: annotation file to write (default: the dataset's own, or <root>/artifacts.csv).",
    ),
    seed: int = typer.Option(0),
) -> None:
    """Rank a split by a concept's CAV score into a review sheet, or apply a filled one."""
    from medaudit.cli.console import console, progress_bars
    from medaudit.models.data.geometry import model_view
    from medaudit.models.data.registry import open_dataset
    from medaudit.models.errors import MedauditError

    try:
        ds = open_dataset(data)
        if apply is not None:
            if concept or model or weights:
                raise typer.BadParameter("--apply takes the sheet, --data and --into only")
            _apply(console, apply, ds, into)
            return
        if not concept:
            raise typer.BadParameter("give --concept NAME to rank by, or --apply SHEET")
        from medaudit.models.audit import default_concept_layers
        from medaudit.models.audit.annotated import annotation_cav, scope_of
        from medaudit.models.audit.review import rank, write_sheet

        net, cfg, version = load_classifier(model, weights)
        ds = model_view(ds, cfg)  # the model's resize/crop policy
        note = check_classes(cfg, ds)
        ln = layer or default_concept_layers(cfg, [concept], net).get(concept) or cfg.default_cav_layer
        with progress_bars() as bars:
            fitted = annotation_cav(
                net,
                cfg,
                ds,
                concept,
                ln,
                kind=cav_kind,
                scope=scope_of(ds, parse_list(scope)),
                seed=seed,
                progress=bars,
            )
            ranking = rank(net, cfg, ds, fitted, split, progress=bars)
            csv_path, html_path = write_sheet(
                ranking, ds, out, thumbs=thumbs, meta={"model": version, "data": data}, progress=bars
            )
    except MedauditError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    if note:
        console.print(f"[yellow]note:[/] {note}")
    n_top = min(len(ranking.index), 100)
    hits = int(ranking.annotated[:n_top].sum())
    console.print(
        f"{concept}: CAV ({cav_kind}, {ln}) fitted on {fitted.cav.n_pos} annotated and {fitted.cav.n_neg} "
        f"other training images; {len(ranking.index)} {split} images ranked, {hits} of the top {n_top} "
        "already annotated"
    )
    console.print(f"review sheet: {csv_path}\ncontact sheet: {html_path}")
    console.print(
        f"fill the verdict column (yes/no), then: medaudit annotate --apply {csv_path} --data '{data}'"
    )


def _apply(console: Console, sheet: Path, ds: AnnotatedDataset, into: Path | None) -> None:
    from medaudit.models.audit.review import apply_sheet
    from medaudit.models.data.annotations import write_annotations
    from medaudit.models.data.folder import ImageDataset
    from medaudit.models.errors import DatasetError

    res = apply_sheet(sheet, ds)
    fmt = "json_by_image" if into is not None and into.suffix == ".json" else "csv"
    if into is None:
        if not isinstance(ds, ImageDataset):
            raise DatasetError("this dataset has no folder to write annotations to: give --into FILE")
        if ds.annotations.path is not None:
            into, fmt = ds.annotations.path, ds.annotations.format
        else:
            into = ds.root / "artifacts.csv"
    path = write_annotations(into, ds.ids, res.by_artifact, fmt)
    for concept in sorted({*res.added, *res.removed, *res.confirmed}):
        console.print(
            f"{concept}: +{res.added.get(concept, 0)} added, -{res.removed.get(concept, 0)} removed, "
            f"{res.confirmed.get(concept, 0)} confirmed; now {len(res.by_artifact.get(concept, []))} images"
        )
    console.print(f"annotations: {path}")
