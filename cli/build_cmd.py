"""``medaudit build``: the offline pipeline (models.pipeline.build) plus registration in the store."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from medaudit.models.pipeline import BuildResult


def build(
    out: Path = typer.Option(
        Path("artifacts"), help="Root folder; the model family goes to <out>/<model name>."
    ),
    model: Path | None = typer.Option(
        None,
        "--model",
        help="A model spec (TOML) of a classifier medaudit did not train: build its corrected "
        "versions (named <spec name>:<version>) instead of training one. See `medaudit model check`.",
    ),
    data: str = typer.Option(
        "synthderm",
        "--data",
        help="The dataset: synthderm, or KIND:PATH of annotated data on disk (folder:, isic2019:, …; "
        "docs/data.md), which needs --model. Its labels must be the spec's.",
    ),
    artifact: str = typer.Option("band_aid", help="Artifact to correct for (annotated in --data)."),
    cav_scope: str = typer.Option(
        "artifact_class",
        help="Classes whose training images fit the correction CAV: artifact_class (the class the "
        "artifact is most frequent in), all, or class names, comma-separated.",
    ),
    corrections: str = typer.Option(
        "vanilla,vanilla-ft,pclarc,rpclarc,rrclarc,rrr", help="Comma-separated corrections to build."
    ),
    layer: str = typer.Option(
        "",
        help="Build layer: the concept banks' and default correction layer (default: the architecture's).",
    ),
    settings: list[str] = typer.Option(
        [],
        "--set",
        metavar="NAME.FIELD=VALUE",
        help="A correction's setting over the architecture family's defaults, NAME.FIELD=VALUE with FIELD "
        "one of layer, optimizer, lr, epochs, lamb; repeatable (--set rrclarc.layer=identity_2 "
        "--set rrclarc.lr=1e-4). docs/models.md lists the defaults.",
    ),
    n_correction_images: int | None = typer.Option(
        None, help="Training images the fine-tuning corrections see (0: all; default: the build config's)."
    ),
    n_eval_images: int | None = typer.Option(
        None, help="Test images per variant for evaluation (0: all; default: the build config's)."
    ),
    register: bool = typer.Option(True, help="Register every version in the BentoML model store."),
    bentoml_home: Path | None = typer.Option(
        None, envvar="BENTOML_HOME", help="BentoML home (the store is <home>/models)."
    ),
    threads: int = typer.Option(0, help="torch threads (0: torch's default)."),
) -> None:
    """Train (or reuse) or load (--model), fit concept banks, build every corrected version, evaluate,
    export, register."""
    build_versions(
        out,
        model=model,
        data=data,
        artifact=artifact,
        cav_scope=cav_scope,
        corrections=corrections,
        layer=layer,
        settings=tuple(settings),
        n_correction_images=n_correction_images,
        n_eval_images=n_eval_images,
        register=register,
        bentoml_home=bentoml_home,
        threads=threads,
    )


def build_versions(
    out: Path,
    *,
    model: Path | None = None,
    data: str = "synthderm",
    artifact: str = "band_aid",
    cav_scope: str = "artifact_class",
    corrections: str = "vanilla,vanilla-ft,pclarc,rpclarc,rrclarc,rrr",
    layer: str = "",
    settings: tuple[str, ...] = (),
    n_correction_images: int | None = None,
    n_eval_images: int | None = None,
    register: bool = True,
    bentoml_home: Path | None = None,
    threads: int = 0,
) -> BuildResult:
    """:func:`build` with plain defaults, for callers in Python (``medaudit demo``): a typer
    command's own defaults are option objects, not values. Returns the build's result (its
    ``best`` version is what the demo serves beside ``vanilla``)."""
    from dataclasses import replace
    from functools import partial

    from medaudit.cli.console import console, progress_bars
    from medaudit.models.corrections.settings import settings_from_pairs
    from medaudit.models.data.synthetic import SynthDermConfig
    from medaudit.models.errors import MedauditError
    from medaudit.models.pipeline import BuildConfig
    from medaudit.models.pipeline import build as run_build
    from medaudit.models.spec import load_spec
    from medaudit.models.train import TrainConfig

    spec = None
    train = TrainConfig()
    try:
        synth = SynthDermConfig()
        if data.partition("?")[0] == "synthderm":  # synthderm?preset=isic_like&…: rendered, as the demo
            from medaudit.models.data.registry import open_dataset

            synth = open_dataset(data).cfg  # type: ignore[union-attr]
            data = "synthderm"
        if model is not None:
            spec = load_spec(model)
            # The data is rendered at the model's input size.
            synth = replace(synth, size=spec.input_size[-1])
        train = replace(train, data=synth)
        names = tuple(c for c in corrections.split(",") if c)
        cfg = BuildConfig(
            train=train,
            artifact=artifact,
            layer=layer,
            cav_scope=parse_cav_scope(cav_scope),
            corrections=names,
            settings=settings_from_pairs(settings, {n: None for n in names}),
            model=spec,
            data="" if data == "synthderm" else data,
        )
    except MedauditError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if threads:
        cfg = replace(cfg, threads=threads)  # not train.threads: that is part of the checkpoint's key
    if n_correction_images is not None:
        cfg = replace(cfg, n_correction_images=n_correction_images)
    if n_eval_images is not None:
        cfg = replace(cfg, n_eval_images=n_eval_images)
    reg = unreg = None
    if register:
        from medaudit.service.store import delete_version, register_version

        reg, unreg = partial(register_version, home=bentoml_home), partial(delete_version, home=bentoml_home)
    try:
        with progress_bars() as bars:
            res = run_build(cfg, out, progress=bars, log=console.print, register=reg, unregister=unreg)
    except MedauditError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    console.print(res.comparison_md.read_text())
    for s in res.stages:
        console.print(f"  {s.stage:<20} {'reused' if s.reused else 'built':<7} {s.seconds:8.1f} s")
    console.print(f"total {res.seconds:.1f} s; table: {res.comparison_md}, {res.comparison_json}")
    if res.registered:
        console.print("registered: " + ", ".join(tag for tag, _ in res.registered.values()))
    if res.cards and "attacked" not in res.cards[0].metrics["classification"]:
        console.print(
            f"[yellow]no attacked test set: the data has no masks of {cfg.artifact} to paste it with, so "
            "the gap is not measured; derive them with `medaudit localize --export-masks` (docs/models.md)[/]"
        )
    elif not res.accepted:
        console.print("[yellow]no correction meets the criteria: gap recovered, clean cost, relevance cut[/]")
    if res.best:
        console.print(f"best version by the correction criteria: {res.best}")
    return res


def parse_cav_scope(value: str) -> str | tuple[str, ...]:
    """``--cav-scope``: ``artifact_class``, ``all``, or class names separated by commas."""
    v = value.strip()
    if v in ("artifact_class", "all"):
        return v
    return tuple(c.strip() for c in v.split(",") if c.strip())
