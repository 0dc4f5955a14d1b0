"""``medaudit model inspect SPEC`` and ``medaudit model check SPEC``: a classifier medaudit did not
train, described by a model spec (:mod:`medaudit.models.spec`), looked at and checked offline.

Every failure the user can fix (a bad spec, a missing or foreign checkpoint, an unknown
architecture, a layer without an LRP rule) is one line on stderr naming the fix, exit code 2.
Nothing is written anywhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from medaudit.cli.console import console

model_app = typer.Typer(help="A classifier medaudit did not train: inspect and check its model spec.")
SPEC_ARG = typer.Argument(..., help="The model spec (TOML): see `medaudit model --help` and docs/models.md.")
EXIT_BAD_SPEC = 2


@contextmanager
def _spec_errors() -> Iterator[None]:
    from medaudit.models.errors import MedauditError

    try:
        yield
    except MedauditError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_BAD_SPEC) from None


@model_app.command("inspect")
def inspect(
    spec: Path = SPEC_ARG,
    depth: int = typer.Option(2, help="How deep into the module tree (2: stages and their blocks)."),
) -> None:
    """The model's candidate hook points (stages and blocks) with their output shapes."""
    from medaudit.models.spec import build, inspect_layers, load_spec

    with _spec_errors():
        s = load_spec(spec)
        model, cfg, _digest = build(s)
        layers = inspect_layers(model, cfg, max_depth=depth)
    t = Table(title=f"{s.name}: {s.source} {s.arch}, canonizer {cfg.canonizer}, input {list(cfg.input_size)}")
    for col in ("module", "type", "output shape", "hook point"):
        t.add_column(col)
    for layer in layers:
        mark = layer.hook_point or ""
        if layer.hook_point == cfg.default_cav_layer:
            mark += " (default CAV layer)"
        t.add_row(escape(layer.path), layer.type, "×".join(map(str, layer.shape)), mark)
    console.print(t)
    console.print(
        "Hook points not set in the spec are the family's defaults; set [hook_points] to choose others."
    )


@model_app.command("check")
def check(
    spec: Path = SPEC_ARG, rules: bool = typer.Option(False, "--rules", help="List every layer's rule.")
) -> None:
    """Load the model offline and run one audit's worth of work on it: forward, head width,
    canonizer, one LRP call with its conservation, and the rule each layer gets."""
    from collections import Counter

    from medaudit.models.spec import check as run_check
    from medaudit.models.spec import load_spec

    with _spec_errors():
        report = run_check(load_spec(spec))
    s, cfg = report.spec, report.cfg
    console.print(f"[bold]{s.name}[/]: {s.source} {s.arch}, {report.n_parameters / 1e6:.1f} M parameters")
    console.print(f"  checkpoint  {s.checkpoint} (sha256 {report.sha256})")
    console.print(f"  labels      {', '.join(cfg.labels)}; input {list(cfg.input_size)}, resize {s.resize}")
    console.print(f"  normalise   mean {list(cfg.mean)}, std {list(cfg.std)}")
    console.print(
        f"  canonizer   {cfg.canonizer}: logits within {report.canonized_max_diff:.2g} of the original"
    )
    hooks = ", ".join(f"{k}={v}" for k, v in cfg.hook_points.items())
    console.print(f"  hook points {escape(hooks)} (default CAV layer {cfg.default_cav_layer})")
    counts = Counter(r.rule for r in report.rules)
    console.print("  LRP rules   " + ", ".join(f"{rule} ×{n}" for rule, n in sorted(counts.items())))
    for z, r in zip(report.logits, report.relevance_sums, strict=True):
        console.print(
            f"  conservation: logit {z:+.4f}, input relevance {r:+.4f} (biases absorb {z - r:+.4f})"
        )
    if rules:
        t = Table(title="Rule per layer")
        for col in ("module", "type", "rule"):
            t.add_column(col)
        for row in report.rules:
            t.add_row(escape(row.path), row.module, row.rule)
        console.print(t)
    console.print("[green]ok[/]: this model can be audited, corrected and served")
