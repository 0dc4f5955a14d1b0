"""``medaudit audit``: the offline audit of a checkpoint, written as report.html + metrics.json.

``medaudit audit FILE`` instead audits one image with a running service
(:func:`medaudit.clients.service_cmd.audit_image`); the two modes share ``--out`` and refuse each other's
options, so a half-remembered command fails loudly instead of silently doing the other audit.
Heavy imports (torch, the models) happen inside the command.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from medaudit.clients.service_cmd import DICOM_OUT_OPT, KEY_OPT, SERVICE_PANEL, TIMEOUT_OPT, URL_OPT

#: What the demo model is audited for: the synthderm artifacts with a spurious correlation.
DEFAULT_ARTIFACTS = "band_aid,ruler,skin_marker"
#: Channel view of discovery: max-pooled *activations* at the first stage. On the demo config with a
#: timestamp planted in 10% of malignant images, the model barely used the timestamp (ρ ≈ its area
#: share), so relevance-based views found 1–3 of 24 at identity_1/identity_2, while activations at
#: identity_0, where text strokes are still resolved, found 10 of 24 (base rate 5%) with channels
#: ranked by LOF and 24 of 24 ranked by tail concentration
#: (:func:`medaudit.models.xai.reveal.channel_outliers`;
#: `medaudit audit --weights W --plant timestamp:0.0,0.1`, 2026-11-27). Synthderm generator 5 (the
#: light beige band-aid), same command, another machine: 21 of 24 (SpRAy 0 of 24; base rate 0.044).
DISCOVERY_LAYER = "identity_0"
OFFLINE_OUT = Path("artifacts/audit")
#: Parameters of the service mode (FILE given); every other one belongs to the offline audit.
SERVICE_PARAMS = ("url", "api_key", "version", "subject_key", "timeout", "dicom_out")


def _parse_pairs(values: list[str], what: str) -> dict[str, str]:
    out = {}
    for v in values:
        key, sep, val = v.partition("=")
        if not sep or not key or not val:
            raise typer.BadParameter(f"{what} {v!r}: write NAME=VALUE")
        out[key.strip()] = val.strip()
    return out


def _parse_scopes(values: list[str], labels: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """``--cav-scope band_aid=nevus`` -> ``{"band_aid": (index of nevus,)}``, by the data's classes."""
    out = {}
    for concept, classes in _parse_pairs(values, "--cav-scope").items():
        names = [c.strip() for c in classes.split(",") if c.strip()]
        unknown = [c for c in names if c not in labels]
        if unknown or not names:
            raise typer.BadParameter(
                f"--cav-scope {concept}={classes}: unknown classes {unknown}; the data's: {', '.join(labels)}"
            )
        out[concept] = tuple(sorted({labels.index(c) for c in names}))
    return out


def _parse_plant(value: str) -> tuple[str, tuple[float, float]]:
    """``timestamp:0.0,0.1`` -> ("timestamp", (0.0, 0.1))."""
    name, sep, rates = value.partition(":")
    try:
        pb, pm = (float(x) for x in rates.split(","))
    except ValueError:
        raise typer.BadParameter(
            f"--plant {value!r}: write ARTIFACT:P_BENIGN,P_MALIGNANT, e.g. timestamp:0.0,0.1"
        ) from None
    if not sep or not name:
        raise typer.BadParameter(f"--plant {value!r}: write ARTIFACT:P_BENIGN,P_MALIGNANT")
    return name, (pb, pm)


def audit(
    ctx: typer.Context,
    file: Path | None = typer.Argument(
        None,
        exists=True,
        dir_okay=False,
        readable=True,
        show_default=False,
        help="An image (PNG, JPEG, TIFF, GIF, DICOM): audit it with a running service instead.",
    ),
    weights: Path = typer.Option(
        Path("artifacts/resnet18-synthderm/model.pt"), help="Checkpoint written by medaudit train."
    ),
    model: Path | None = typer.Option(
        None,
        "--model",
        help="A model spec (TOML) of a classifier medaudit did not train, instead of --weights "
        "(docs/models.md); synthderm is then rendered at its input size.",
    ),
    dataset: str = typer.Option(
        "synthderm",
        help="synthderm (the checkpoint's own data config when it has one), folder:<path> or "
        "isic2019:<path>.",
    ),
    out: Path | None = typer.Option(
        None,
        show_default=False,
        help=f"Folder for report.html, metrics.json, banks/ (default {OFFLINE_OUT}); with FILE, for "
        "the heatmap and concept mask PNGs (default: the current folder).",
    ),
    artifacts: str = typer.Option(DEFAULT_ARTIFACTS, help="Declared concepts, comma-separated."),
    layer: str | None = typer.Option(None, help="Default CAV layer (the architecture's default if unset)."),
    concept_layer: list[str] = typer.Option(
        [], help="Per-concept layer, NAME=LAYER (repeatable); overrides the built-in defaults."
    ),
    cav_scope: list[str] = typer.Option(
        [],
        help="Classes whose training images fit a concept's CAV, NAME=CLASS,CLASS (repeatable; "
        "method.md §1.1's cav_scope); concepts not named use every class.",
    ),
    cav_kind: str = typer.Option("svm", help="CAV estimator: svm (method.md §1.3), signal, ridge, logistic."),
    max_train: int = typer.Option(0, help="Audit at most this many training images (0: all)."),
    max_val: int = typer.Option(0, help="Audit at most this many validation images (0: all)."),
    max_test: int = typer.Option(0, help="Audit at most this many test images (0: all)."),
    max_localize: int = typer.Option(200, help="Artifact test images localized per concept."),
    top_k: int = typer.Option(24, help="Outliers shown and counted per discovery method."),
    discovery_layer: str | None = typer.Option(
        None,
        help=f"Layer of the channel view (default: {DISCOVERY_LAYER} where the model has it, else --layer).",
    ),
    channel_features: str = typer.Option(
        "activation", help="Channel view on activation (default, see DISCOVERY_LAYER) or relevance."
    ),
    include_declared: bool = typer.Option(
        False, help="Let discovery rank samples that carry a declared artifact too."
    ),
    model_version: str | None = typer.Option(
        None, help="Version name for the concept banks (default <weights folder>:<card version>)."
    ),
    threads: int = typer.Option(0, help="torch threads (0: torch's default)."),
    seed: int = typer.Option(0),
    plant: str | None = typer.Option(
        None,
        help="Discovery experiment: ARTIFACT:P_BENIGN,P_MALIGNANT. Trains (or resumes) the demo "
        "config with that artifact planted into --weights' folder first, then audits without "
        "declaring it.",
    ),
    train_epochs: int | None = typer.Option(None, help="With --plant: epochs (default: the demo's)."),
    train_size: int | None = typer.Option(None, help="With --plant: image size (default: the demo's)."),
    train_n: int | None = typer.Option(None, help="With --plant: training images (default: the demo's)."),
    url: str = URL_OPT,
    api_key: str | None = KEY_OPT,
    version: str | None = typer.Option(
        None, help="Ask for this version (default: A/B routing).", rich_help_panel=SERVICE_PANEL
    ),
    subject_key: str | None = typer.Option(
        None, help="Stable key (patient, study) for A/B routing.", rich_help_panel=SERVICE_PANEL
    ),
    timeout: float = TIMEOUT_OPT,
    dicom_out: Path | None = DICOM_OUT_OPT,
) -> None:
    """Audit a checkpoint offline, or one image (FILE) with a running service.

    Offline: concept retrieval, localization against masks and discovery, as an HTML report. With
    FILE: the service's prediction, heatmap, concept scores and flag, printed, with the PNGs saved.
    """
    given = [name for name in ctx.params if name not in ("file", "out") and _on_command_line(ctx, name)]
    if file is not None:
        offline = [n for n in given if n not in SERVICE_PARAMS]
        if offline:
            raise typer.BadParameter(
                f"{_flags(offline)} belong to the offline audit, which takes no FILE; drop FILE "
                "to audit a checkpoint, or drop these options to audit the image with the service"
            )
        from medaudit.clients.service_cmd import audit_image

        audit_image(
            file,
            url=url,
            api_key=api_key,
            version=version,
            subject_key=subject_key,
            out=out if out is not None else Path("."),
            timeout=timeout,
            dicom_out=dicom_out,
        )
        return
    service_only = [n for n in given if n in SERVICE_PARAMS]
    if service_only:
        raise typer.BadParameter(
            f"{_flags(service_only)} need an image: medaudit audit FILE {_flags(service_only)} ..."
        )
    out = out if out is not None else OFFLINE_OUT
    from dataclasses import replace

    import torch

    from medaudit.cli.console import console, progress_bars
    from medaudit.models.audit import AuditOptions, default_concept_layers, run_audit
    from medaudit.models.audit.report import write_report
    from medaudit.models.data.geometry import model_view
    from medaudit.models.data.protocol import AnnotatedDataset
    from medaudit.models.data.registry import open_dataset
    from medaudit.models.data.synthetic import SynthDerm, SynthDermConfig
    from medaudit.models.errors import MedauditError
    from medaudit.models.registry import create_model, load_checkpoint_file
    from medaudit.models.spec import build as build_spec
    from medaudit.models.spec import load_spec
    from medaudit.models.train import TrainConfig, train_with_hidden_artifact

    if threads:
        torch.set_num_threads(threads)
    declared = [a.strip() for a in artifacts.split(",") if a.strip()]
    try:
        with progress_bars() as bars:
            if plant is not None:
                name, rates = _parse_plant(plant)
                if name in declared:
                    raise typer.BadParameter(
                        f"--plant {name} is also in --artifacts; it must stay undeclared"
                    )
                _check_planted_target(weights, name, rates)
                base = TrainConfig()
                data = base.data
                if train_size is not None:
                    data = replace(data, size=train_size)
                if train_n is not None:
                    data = replace(data, n_train=train_n)
                base = replace(base, data=data, threads=threads, epochs=train_epochs or base.epochs)
                console.print(f"training {weights.parent} with {name} planted at {rates} (undeclared)")
                train_with_hidden_artifact(
                    weights.parent, name, rates, base, progress=bars, log=console.print
                )
            notes: list[str] = []
            ds: AnnotatedDataset
            if model is not None:
                if _on_command_line(ctx, "weights") or plant is not None:
                    raise typer.BadParameter("--model replaces --weights (and --plant, which trains one)")
                spec = load_spec(model)
                net, cfg, _digest = build_spec(spec)
                if dataset == "synthderm":
                    ds = SynthDerm(SynthDermConfig(size=cfg.input_size[-1]))
                    notes.append(f"synthderm rendered at the model's input size, {cfg.input_size[-1]} px")
                else:
                    ds = model_view(open_dataset(dataset), cfg)  # the spec's resize/crop policy
                version = model_version or f"{spec.name}:original"
            else:
                ckpt = load_checkpoint_file(weights)
                arch = (ckpt.get("cfg") or {}).get("arch", "resnet18")
                net, cfg = create_model(arch, weights=weights)
                train_cfg = ckpt.get("train_cfg") or {}
                if dataset == "synthderm" and "data" in train_cfg:
                    ds = SynthDerm(SynthDermConfig.from_dict(train_cfg["data"]))
                    notes.append("synthderm rendered with the checkpoint's own data config")
                else:
                    ds = open_dataset(dataset)
                version = model_version or f"{weights.parent.name}:{_card_version(weights)}"
            layers = {
                **default_concept_layers(cfg, declared, net),
                **_parse_pairs(concept_layer, "--concept-layer"),
            }
            caps = {s: n for s, n in (("train", max_train), ("val", max_val), ("test", max_test)) if n > 0}
            opts = AuditOptions(
                concept_layers=layers,
                cav_scope=_parse_scopes(cav_scope, tuple(ds.label_names)),
                max_per_split=caps,
                max_localize=max_localize,
                top_k=top_k,
                seed=seed,
                discovery_layer=discovery_layer
                or (DISCOVERY_LAYER if DISCOVERY_LAYER in cfg.hook_points else None),
                channel_features=channel_features,
                exclude_declared=not include_declared,
            )
            report = run_audit(
                net,
                cfg,
                version,
                ds,
                artifacts=declared,
                layer=layer,
                cav_kind=cav_kind,
                progress=bars,
                options=opts,
                dataset_name=dataset,
            )
        if notes:
            report = replace(report, notes=(*report.notes, *notes))
        html_path = write_report(report, out)
        for ln, bank in report.banks.items():
            bank.save(out / "banks" / ln)
    except MedauditError as e:
        console.print(f"[red]audit failed:[/] {e}")
        raise typer.Exit(2) from e
    _print_summary(console, report.to_dict())
    console.print(f"report: {html_path}\nmetrics: {out / 'metrics.json'}\nconcept banks: {out / 'banks'}")


def _on_command_line(ctx: typer.Context, name: str) -> bool:
    # By name: typer 0.29 vendors its own click (typer._click), whose ParameterSource is not click.core's.
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def _flags(names: list[str]) -> str:
    return " ".join("--" + n.replace("_", "-") for n in names)


def _card_version(weights: Path) -> str:
    card = weights.parent / "card.json"
    try:
        return str(json.loads(card.read_text()).get("version", "vanilla"))
    except (OSError, ValueError):
        return "vanilla"


def _check_planted_target(weights: Path, name: str, rates: tuple[float, float]) -> None:
    """Refuse to overwrite a checkpoint trained without the planted artifact (e.g. the demo's)."""
    from medaudit.models.registry import load_checkpoint_file

    if not weights.exists():
        return
    spec = ((load_checkpoint_file(weights).get("train_cfg") or {}).get("data") or {}).get("spec") or {}
    if [float(x) for x in spec.get(name, (0.0, 0.0))] != list(rates):
        raise typer.BadParameter(
            f"{weights} was trained without {name} at {rates}; give --plant a --weights path of its own "
            f"(e.g. artifacts/resnet18-synthderm-{name}/model.pt) so this checkpoint is not overwritten"
        )


def _print_summary(console: Any, m: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title=f"audit of {m['model_version']} on {m['dataset']}")
    for col in ("concept", "layer", "AUROC test", "AP test", 'AUROC "all"', "mean IoU", "mean ρ", "n loc"):
        t.add_column(col, justify="right")
    for name, c in m["concepts"].items():
        held, allm, loc = (
            c["retrieval"].get("held_out") or {},
            c["retrieval"].get("all") or {},
            c["localization"],
        )
        t.add_row(
            name,
            c["layer"],
            _f(held.get("auroc")),
            _f(held.get("ap")),
            _f(allm.get("auroc")),
            _f(loc and loc["iou_mean"]),
            _f(loc and loc["rho_mean"]),
            str(loc["n"] if loc else 0),
        )
    console.print(t)
    d = m["discovery"]
    for art, hits in d["undeclared_artifact_hits"].items():
        console.print(
            f"undeclared {art}: SpRAy {hits['spray']}/{d['top_k']}, channels {hits['channels']}/{d['top_k']} "
            f"of the top outliers carry it (base rate {d['undeclared_artifact_base_rate'][art]:.3f})"
        )


def _f(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"
