"""``medaudit refine-cav``: refit a served version's concept bank with reviewed flags and register
the result as a new version of the same model (method.md §1, §6: CAV retrieval → human relabelling
→ refit).

The fit data is re-extracted through the version's model from the data its card names: synthderm
(the card's ``data_config``) or any annotated dataset on disk (the card's ``dataset`` spec, or
``--data``). The new version (``<version>-refit<N>`` unless ``--as`` names it) has the old
version's weights and ONNX graph and the refitted bank; its card lists the flags it learnt from.
Serve it beside the old one (``MEDAUDIT_VERSIONS=vanilla,vanilla-refit1``, then restart the
service) to compare the two banks on the same requests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from medaudit.cli.flags_cmd import _REDIS_HELP, _client, _fail, _settings

if TYPE_CHECKING:
    from medaudit.service.flags.refine import FitData
    from medaudit.service.store import LoadedVersion


def refine_cav(
    version: str = typer.Argument(..., help="Served version whose bank to refine (vanilla or name:vanilla)."),
    bentoml_home: Path | None = typer.Option(None, envvar="BENTOML_HOME", help="BentoML home of the store."),
    model_name: str = typer.Option(
        "resnet18-synthderm",
        envvar="MEDAUDIT_MODEL_NAME",
        help="Model name of a VERSION given without one (as the service's MEDAUDIT_MODEL_NAME).",
    ),
    out: Path = typer.Option(
        Path("artifacts/refined"),
        help="Folder for the new version's bank (<out>/bank), card and refine.json.",
    ),
    data: str | None = typer.Option(
        None,
        "--data",
        help="The dataset the bank was fitted on, KIND:PATH (default: the one the version's card names).",
    ),
    data_config: Path | None = typer.Option(
        None, help="synthderm config JSON of the original fit data (default: the version card's data_config)."
    ),
    new_version: str | None = typer.Option(
        None, "--as", help="Name of the new version (default: <version>-refit<N>, the next free N)."
    ),
    register: bool = typer.Option(True, help="Register the new version in the store."),
    cache_dir: Path | None = typer.Option(None, help="Cache of rendered synthderm splits."),
    seed: int = typer.Option(0, help="CAV fit seed."),
    threads: int = typer.Option(0, help="torch threads (0: torch's default)."),
    redis_url: str | None = typer.Option(None, help=_REDIS_HELP),
) -> None:
    """Refit a version's concept bank with reviewed flags (confirmed: positives, false alarms:
    negatives) and register it as a new version (same weights, refitted bank).

    Re-extracts the bank's original fit data through the version's model, refits, and reports
    held-out retrieval (AUROC, AP) of the stored bank, a refit without the reviewed samples and the
    refined bank.
    """
    import torch
    from rich.table import Table

    from medaudit.cli.console import console
    from medaudit.models.errors import MedauditError
    from medaudit.service.config import version_tag
    from medaudit.service.flags.refine import refine_bank, refit_version, refit_version_name, reviewed_samples
    from medaudit.service.store import list_versions, load_version, register_version

    if threads:
        torch.set_num_threads(threads)
    client = _client(redis_url)
    try:
        loaded = load_version(version_tag(version, model_name), home=bentoml_home)
        bank = loaded.bank
        samples, skipped = reviewed_samples(
            client, _settings().keys, model_version=loaded.tag, layer=bank.layer
        )
        if not samples:
            _fail(
                f"no resolved flags of {loaded.tag} with a verdict of artifact_confirmed or false_alarm and "
                f"stored features (left out: {skipped or 'none'}); nothing to refine",
                1,
            )
        console.print(
            f"{loaded.tag}: {len(samples)} reviewed samples; re-extracting the fit data at {bank.layer}"
        )
        fit = _fit_data(loaded, data, data_config, cache_dir)
        res = refine_bank(bank, fit, samples, seed=seed)
        name, short = loaded.tag.split(":", 1)
        existing = [v.version for v in list_versions(name, home=bentoml_home)]
        target = new_version or refit_version_name(short, existing)
        if target in existing:
            _fail(f"{name}:{target} is already stored; name the new version with --as")
        refit_version(loaded, res, target, out)
    except MedauditError as e:
        _fail(str(e))
    report = {**res.to_json(), "skipped_flags": skipped, "new_version": f"{name}:{target}"}
    (out / "refine.json").write_text(json.dumps(report, indent=2) + "\n")
    t = Table(title=f"held-out retrieval of {loaded.tag} @ {bank.layer} ({len(fit.acts_eval)} images)")
    for c in ("concept", "added +/−", "AUROC stored", "AUROC baseline refit", "AUROC refined", "AP refined"):
        t.add_column(c, justify="right")
    for c in res.bank:

        def g(m: dict[str, float] | None, k: str = "auroc") -> str:
            return "–" if m is None else f"{m[k]:.3f}"

        a = res.added[c]
        t.add_row(
            c, f"{a['positive']}/{a['negative']}", g(res.stored[c]), g(res.baseline[c]), g(res.refined[c]),
            g(res.refined[c], "ap"),
        )  # fmt: skip
    console.print(t)
    console.print(f"refined bank: {out / 'bank'}\ncard: {out / 'card.md'}\nreport: {out / 'refine.json'}")
    if not register:
        return
    try:
        tag, _ = register_version(
            name, target, weights=loaded.path / "model.pt", onnx=loaded.onnx_path, card_dir=out,
            bank_dir=out / "bank", home=bentoml_home,
        )  # fmt: skip
    except MedauditError as e:
        _fail(str(e))
    console.print(
        f"registered {tag}: the weights of {loaded.tag} with the refitted bank. Serve it beside the old "
        f"one to compare the banks: add {target} to MEDAUDIT_VERSIONS and restart the service",
        soft_wrap=True,
    )


def _fit_data(
    loaded: LoadedVersion, data: str | None, data_config: Path | None, cache_dir: Path | None
) -> FitData:
    """The bank's fit data: synthderm (``--data-config`` or the card's ``data_config``) or the
    dataset ``--data`` or the card names."""
    from medaudit.models.data.synthetic import SynthDermConfig
    from medaudit.service.flags.refine import dataset_fit_data, synthderm_fit_data

    card = dict(loaded.card.data)
    spec = data or card.get("dataset")
    layer, concepts = loaded.bank.layer, list(loaded.bank)
    if data_config is None and spec and str(spec).partition("?")[0] not in ("synthderm", "unspecified"):
        from medaudit.models.data.geometry import model_view
        from medaudit.models.data.registry import open_dataset

        ds = model_view(open_dataset(str(spec)), loaded.cfg)  # the model's resize/crop policy
        return dataset_fit_data(loaded.model, loaded.cfg, layer, ds, concepts, name=str(spec))
    if data_config is not None:
        cfg_dict = json.loads(data_config.read_text())
    else:
        cfg_dict = card.get("data_config")
        if not cfg_dict:
            _fail(
                f"the card of {loaded.tag} records no data_config; pass --data-config FILE.json "
                "(synthderm) or --data KIND:PATH (a dataset on disk)"
            )
    data_cfg = SynthDermConfig.from_dict(cfg_dict)
    return synthderm_fit_data(loaded.model, loaded.cfg, layer, data_cfg, concepts, cache_dir=cache_dir)
