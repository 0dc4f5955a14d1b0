"""``medaudit localize``: where in each annotated image an artifact is, from the model's concept.

For every image annotated with the artifact, the binarised CAV-conditioned LRP heatmap
(method.md §2); scored by IoU against true masks where they exist (synthderm's, the dataset's own
drawn masks, or ``--true-masks``). ``--export-masks`` writes them in the dataset's mask layout
as *derived* masks (``masks/<artifact>/<key>.png`` + ``mask_source.json``), which RRR and the
IoU metrics use where no mask was drawn (method.md §4.6).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from medaudit.cli.classifier import MODEL_OPT, WEIGHTS_OPT, check_classes, load_classifier, parse_list

if TYPE_CHECKING:
    import numpy as np

    from medaudit.models.data.protocol import AnnotatedDataset

EXIT_BAD_INPUT = 2


def localize(
    data: str = typer.Option(..., "--data", help="The dataset, KIND:PATH?OPTIONS (docs/data.md)."),
    artifact: str = typer.Option(
        ..., help="Artifacts to localize, comma-separated (each must be annotated)."
    ),
    model: Path | None = MODEL_OPT,
    weights: Path | None = WEIGHTS_OPT,
    export_masks: bool = typer.Option(
        False, "--export-masks", help="Write the masks into the dataset's mask layout, marked 'derived'."
    ),
    masks_dir: Path | None = typer.Option(
        None, help="Mask folder to export to (default: the dataset's masks/; needed for synthderm)."
    ),
    true_masks: Path | None = typer.Option(
        None,
        help="Held-back true masks (masks/<artifact>/<key>.png layout) to score the derived ones by IoU.",
    ),
    layer: str | None = typer.Option(
        None, help="CAV layer for every artifact (default: built-in per concept)."
    ),
    cav_kind: str = typer.Option("svm", help="CAV estimator (svm for localization, method.md §1.3)."),
    scope: str | None = typer.Option(None, help="Classes whose training images fit the CAV (default: all)."),
    force: bool = typer.Option(False, help="With --export-masks: replace masks a person drew."),
    report: Path | None = typer.Option(None, help="Write the summary (IoU per artifact and split) as JSON."),
    seed: int = typer.Option(0),
) -> None:
    """Localize annotated artifacts with the model's concept; export them as derived masks."""
    from medaudit.cli.console import console, progress_bars
    from medaudit.models.audit import default_concept_layers
    from medaudit.models.audit.annotated import annotation_cav, scope_of
    from medaudit.models.audit.derive import derive_masks, refuse_drawn
    from medaudit.models.audit.derive import export_masks as export
    from medaudit.models.data.folder import ImageDataset
    from medaudit.models.data.geometry import model_view
    from medaudit.models.data.masks import MaskFolder
    from medaudit.models.data.registry import open_dataset
    from medaudit.models.errors import DatasetError, MedauditError

    names = parse_list(artifact)
    summaries: dict[str, Any] = {}
    try:
        net, cfg, version = load_classifier(model, weights)
        raw = open_dataset(data)
        ds = model_view(raw, cfg)  # read as the model fits images (its resize/crop policy)
        note = check_classes(cfg, ds)
        target = None
        if export_masks and masks_dir is not None:
            target = MaskFolder(masks_dir)
        elif export_masks and isinstance(raw, ImageDataset):
            target = raw.masks
        elif export_masks:
            raise DatasetError(f"{data} has no folder of its own: give --masks-dir to export masks to")
        keys = list(getattr(ds, "keys", ds.ids))
        if target is not None:
            for name in names:
                refuse_drawn(target, name, force)  # before any work
        with progress_bars() as bars:
            for name in names:
                ln = layer or default_concept_layers(cfg, [name], net).get(name) or cfg.default_cav_layer
                fitted = annotation_cav(
                    net,
                    cfg,
                    ds,
                    name,
                    ln,
                    kind=cav_kind,
                    scope=scope_of(ds, parse_list(scope)),
                    seed=seed,
                    progress=bars,
                )
                truth = _truth(ds, name, cfg.input_size[-1], true_masks, keys, target)
                if target is not None:
                    prov = {"model": version, "data": data}
                    summaries[name] = export(
                        net,
                        cfg,
                        ds,
                        fitted,
                        target,
                        keys=keys,
                        truth=truth,
                        overwrite=force,
                        provenance=prov,
                        progress=bars,
                    )
                else:
                    carriers = sorted(ds.artifact_ids("all").get(name, []))
                    scores = [
                        d.iou
                        for d in derive_masks(net, cfg, ds, fitted, carriers, truth=truth, progress=bars)
                    ]
                    summaries[name] = _summary(name, carriers, [s for s in scores if s is not None])
                summaries[name]["layer"] = ln
    except MedauditError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    if note:
        console.print(f"[yellow]note:[/] {note}")
    for name, s in summaries.items():
        score = s["iou"].get("all")
        fig = (
            f"IoU vs true masks: mean {score['mean']:.3f}, median {score['median']:.3f} (n={score['n']})"
            if score
            else "no true masks to score against"
        )
        console.print(f"{name} at {s['layer']}: {s['images']} annotated images; {fig}")
    if target is not None:
        console.print(f"derived masks: {target.root}/<artifact>/ (mask_source.json says 'derived')")
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(summaries, indent=1))
        console.print(f"summary: {report}")


def _truth(
    ds: AnnotatedDataset, artifact: str, size: int, true_masks: Path | None, keys: list[str], target: Any
) -> Any:
    """``i -> true mask at the input size``: held-back masks, else the dataset's own drawn ones
    (not the ones this run is about to replace), else None."""

    from medaudit.models.data.masks import GROUND_TRUTH, MaskFolder

    if true_masks is not None:
        held = MaskFolder(true_masks)

        def read_held(i: int) -> np.ndarray | None:
            return held.read(keys[i], artifact, size)

        return read_held
    if ds.has_masks and ds.mask_source_of(artifact) == GROUND_TRUTH:
        own = getattr(ds, "masks", None)
        if target is not None and own is not None and Path(target.root).resolve() == Path(own.root).resolve():
            return None

        def read_own(i: int) -> np.ndarray | None:
            return ds.mask(i, artifact, size)

        return read_own
    return None


def _summary(name: str, carriers: list[int], scores: list[float]) -> dict[str, Any]:
    import numpy as np

    out: dict[str, Any] = {"artifact": name, "images": len(carriers), "iou": {}}
    if scores:
        a = np.asarray(scores)
        out["iou"]["all"] = {"mean": float(a.mean()), "median": float(np.median(a)), "n": len(a)}
    return out
