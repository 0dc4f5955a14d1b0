"""``medaudit predict FILE``, ``medaudit compare FILE`` and ``medaudit audit FILE``: one image sent
to a running service, its answer printed as tables and its heatmaps saved as PNGs.

``medaudit audit`` without FILE is the offline dataset audit (:mod:`medaudit.cli.audit_cmd`), which hands
over to :func:`audit_image` when FILE is given. Every failure the user can fix (service down, no or
wrong key, unknown version, an image the service refuses) is one line on stderr and a non-zero exit
code, never a traceback:

====  =====================================================================
1     the service answered with an error (401, 404, 4xx input, 5xx)
3     the service could not be reached, or did not answer in time
====  =====================================================================
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console, JustifyMethod
from rich.markup import escape
from rich.table import Table

from medaudit.clients import (
    DEFAULT_URL,
    AuditResponse,
    CompareResponse,
    Forbidden,
    InvalidInput,
    MedauditClient,
    MedauditClientError,
    MedauditConnectionError,
    MedauditHTTPError,
    MedauditTimeoutError,
    Prediction,
    PredictResponse,
    ShadowInfo,
    Unauthorized,
    UnknownVersion,
)

URL_ENV = "MEDAUDIT_URL"
KEY_ENV = "MEDAUDIT_API_KEY"
EXIT_HTTP, EXIT_UNREACHABLE = 1, 3
SERVICE_PANEL = "Service"

console = Console()
err_console = Console(stderr=True)

# Options shared by the service commands (and by `medaudit audit FILE`, see medaudit.cli.audit_cmd).
FILE_ARG = typer.Argument(
    ..., exists=True, dir_okay=False, readable=True, help="PNG, JPEG, TIFF, GIF or DICOM image."
)
URL_OPT = typer.Option(
    DEFAULT_URL, "--url", envvar=URL_ENV, help="The medaudit service.", rich_help_panel=SERVICE_PANEL
)
KEY_OPT = typer.Option(
    None,
    "--api-key",
    envvar=KEY_ENV,
    show_default=False,
    help=f"API key (default: ${KEY_ENV}).",
    rich_help_panel=SERVICE_PANEL,
)
DICOM_OUT_OPT = typer.Option(
    None,
    "--dicom-out",
    show_default=False,
    help="Folder for the audit as DICOM objects (SEG, Parametric Map, SR) of a DICOM FILE, instead of PNGs.",
    rich_help_panel=SERVICE_PANEL,
)
TIMEOUT_OPT = typer.Option(
    120.0, "--timeout", help="Seconds to wait for an answer.", rich_help_panel=SERVICE_PANEL
)


def open_client(url: str, api_key: str | None, timeout: float) -> MedauditClient:
    """The client every command uses (one place to change how the CLI connects)."""
    return MedauditClient(url, api_key=api_key, timeout=timeout)


def fail(message: str, code: int) -> typer.Exit:
    """Prints ``error: message`` on one stderr line; raise the returned Exit."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)
    return typer.Exit(code)


@contextmanager
def service_errors(url: str, file: Path | None = None) -> Iterator[None]:
    """Turns the client's errors into one readable line each, and an exit code."""
    try:
        yield
    except MedauditConnectionError as e:
        raise fail(
            f"cannot reach the medaudit service at {url} ({_cause(e)}). Start one with `make demo`, "
            f"or point --url / {URL_ENV} at a running service.",
            EXIT_UNREACHABLE,
        ) from None
    except MedauditTimeoutError as e:
        raise fail(f"{e}; is the service overloaded? Try a larger --timeout.", EXIT_UNREACHABLE) from None
    except Unauthorized as e:
        how = "is not set" if e.detail.startswith("missing") else "was refused"
        raise fail(
            f"401 unauthorized: {e.detail}. The API key {how}: set {KEY_ENV} (or --api-key) to a "
            f"client key of this deployment.",
            EXIT_HTTP,
        ) from None
    except Forbidden as e:
        raise fail(f"403 forbidden: {e.detail}", EXIT_HTTP) from None
    except UnknownVersion as e:
        valid = ", ".join(e.valid_versions) or "(none)"
        raise fail(f"unknown model version {e.version!r}; this service serves: {valid}", EXIT_HTTP) from None
    except InvalidInput as e:
        what = file.name if file is not None else "the request"
        raise fail(f"the service refused {what}: {e.detail} ({e.status} {e.code})", EXIT_HTTP) from None
    except MedauditHTTPError as e:
        rid = f", request id {e.request_id}" if e.request_id else ""
        raise fail(f"the service failed: {e.status} {e.code}: {e.detail}{rid}", EXIT_HTTP) from None
    except MedauditClientError as e:
        raise fail(str(e), EXIT_HTTP) from None


def _cause(e: MedauditConnectionError) -> str:
    s = str(e)
    return s.split(": ", 1)[1] if ": " in s else s


# --------------------------------------------------------------------------------------- output


def _safe(s: str) -> str:
    """A file-name-safe form of a version, concept or request id."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-") or "x"


def _write(path: Path, data: bytes) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    except OSError as e:
        raise fail(f"cannot write {path}: {e.strerror or e}", EXIT_HTTP) from None
    return path


def _prediction_table(pred: Prediction, title: str) -> Table:
    t = Table(title=title, title_justify="left")
    t.add_column("label")
    t.add_column("probability", justify="right")
    for label, p in sorted(pred.probabilities.items(), key=lambda kv: -kv[1]):
        mark = label == pred.label
        t.add_row(f"[bold]{escape(label)}[/]" if mark else escape(label), f"{100 * p:.1f}%")
    return t


def _answered(version: str, via: str | None, request_id: str) -> str:
    how = f" (via {via})" if via else ""
    return f"answered by [bold]{escape(version)}[/]{escape(how)}, request id {escape(request_id)}"


def _shadow_line(shadow: ShadowInfo | None) -> str | None:
    if shadow is None:
        return None
    verdict = "agrees" if shadow.agree else "[bold yellow]DISAGREES[/]"
    return f"shadow {escape(shadow.version)}: {escape(shadow.label)} ({verdict})"


def _print_notes(notes: tuple[str, ...]) -> None:
    for n in notes:
        console.print(f"note: {escape(n)}", highlight=False)


def print_predict(res: PredictResponse, file: Path) -> None:
    """Prediction table, the version that answered and how, the shadow's answer."""
    console.print(_prediction_table(res.prediction, f"{file.name}: {res.prediction.label}"))
    console.print(_answered(res.version, res.via, res.request_id), highlight=False, soft_wrap=True)
    if (line := _shadow_line(res.shadow)) is not None:
        console.print(line, highlight=False)
    _print_notes(res.notes)


def _concept_table(res: AuditResponse) -> Table:
    t = Table(title=f"concepts at {res.layer}", title_justify="left")
    cols: tuple[tuple[str, JustifyMethod], ...] = (
        ("concept", "left"),
        ("score", "right"),
        ("percentile", "right"),
        ("present", "center"),
        ("relevance share", "right"),
    )
    for col, just in cols:
        t.add_column(col, justify=just)
    for c in res.concepts:
        t.add_row(
            escape(c.concept),
            f"{c.score:.3g}",
            f"{c.percentile:.1f}",
            "[bold]yes[/]" if c.present else "no",
            f"{100 * c.relevance_share:.1f}%",
        )
    return t


def print_audit(res: AuditResponse, file: Path) -> None:
    """Prediction, version, concept table, flag decision with reasons, shadow agreement."""
    console.print(_prediction_table(res.prediction, f"{file.name}: {res.prediction.label}"))
    console.print(_answered(res.version, res.via, res.request_id), highlight=False, soft_wrap=True)
    console.print(_concept_table(res))
    if res.flag.flagged:
        console.print(
            f"[bold red]FLAGGED for review[/] ({escape(', '.join(res.flag.concepts))}):", highlight=False
        )
        for reason in res.flag.reasons:
            console.print(f"  - {escape(reason)}", highlight=False)
    else:
        console.print("[green]not flagged[/]: no present concept carries enough of the relevance")
    if (line := _shadow_line(res.shadow)) is not None:
        console.print(line, highlight=False)
    _print_notes(res.notes)


def save_audit_pngs(res: AuditResponse, file: Path, out: Path) -> list[Path]:
    """The heatmap overlay, and the mask of every present concept, as ``<stem>_<request id>_*.png``."""
    prefix = f"{_safe(file.stem)}_{_safe(res.request_id)}"
    paths = [] if res.heatmap_png is None else [_write(out / f"{prefix}_heatmap.png", res.heatmap_png)]
    for c in res.concepts:
        if c.mask_png is not None:
            paths.append(_write(out / f"{prefix}_mask_{_safe(c.concept)}.png", c.mask_png))
    return paths


def print_compare(res: CompareResponse, file: Path) -> None:
    """One row per version, then whether labels and flags agree."""
    t = Table(title=f"{file.name}: {len(res.versions)} versions", title_justify="left")
    t.add_column("version", no_wrap=True)  # the one column that must never be cut
    cols: tuple[tuple[str, JustifyMethod], ...] = (
        ("label", "left"),
        ("p(label)", "right"),
        ("flagged", "center"),
        ("present", "left"),
        ("top share", "right"),
    )
    for col, just in cols:
        t.add_column(col, justify=just)
    for v in res.versions:
        r = res.results[v]
        top = max(r.concepts, key=lambda c: c.relevance_share, default=None)
        t.add_row(
            escape(v),
            escape(r.prediction.label),
            f"{100 * r.prediction.probability:.1f}%",
            "[bold red]yes[/]" if r.flag.flagged else "no",
            escape(", ".join(c.concept for c in r.concepts if c.present) or "-"),
            "-" if top is None else f"{escape(top.concept)} {100 * top.relevance_share:.1f}%",
        )
    console.print(t)
    labels = "agree" if res.labels_agree else "[bold yellow]DISAGREE[/]"
    flags = "agree" if res.flags_agree else "[bold yellow]DISAGREE[/]"
    console.print(f"labels {labels}, flags {flags}; request id {escape(res.request_id)}", highlight=False)
    _print_notes(res.notes)


def _print_saved(paths: list[Path]) -> None:
    for p in paths:
        console.print(f"saved {escape(str(p))}", highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------------------- commands


def predict(
    file: Path = FILE_ARG,
    url: str = URL_OPT,
    api_key: str | None = KEY_OPT,
    version: str | None = typer.Option(None, help="Ask for this version (default: A/B routing)."),
    subject_key: str | None = typer.Option(None, help="Stable key (patient, study) for A/B routing."),
    timeout: float = TIMEOUT_OPT,
) -> None:
    """Predict one image with a running service."""
    with service_errors(url, file), open_client(url, api_key, timeout) as mc:
        res = mc.predict(file, version=version, subject_key=subject_key)
    print_predict(res, file)


def audit_image(
    file: Path,
    *,
    url: str,
    api_key: str | None,
    version: str | None,
    subject_key: str | None,
    out: Path,
    timeout: float,
    dicom_out: Path | None = None,
) -> None:
    """``medaudit audit FILE``: audit one image with a running service, print it, save its PNGs
    (or, with ``dicom_out``, its DICOM objects: :func:`audit_to_dicom`)."""
    if dicom_out is not None:
        audit_to_dicom(
            file,
            url=url,
            api_key=api_key,
            version=version,
            subject_key=subject_key,
            out=dicom_out,
            timeout=timeout,
        )
        return
    with service_errors(url, file), open_client(url, api_key, timeout) as mc:
        res = mc.audit(file, version=version, subject_key=subject_key)
    print_audit(res, file)
    _print_saved(save_audit_pngs(res, file, out))


def audit_to_dicom(
    file: Path,
    *,
    url: str,
    api_key: str | None,
    version: str | None,
    subject_key: str | None,
    out: Path,
    timeout: float,
) -> list[Path]:
    """``medaudit audit FILE.dcm --dicom-out DIR``: the file audited through STOW-RS, its created
    objects fetched (WADO-RS) and written as ``DIR/<stem>_<kind>.dcm``; prints the prediction and
    the flag. Returns the written paths."""
    with service_errors(url, file), open_client(url, api_key, timeout) as mc:
        try:
            res = mc.stow([file], version=version, subject_key=subject_key)
        except ValueError as e:
            raise fail(f"{e}; --dicom-out needs a DICOM file", EXIT_HTTP) from None
        inst = res.instances[0]
        if not inst.ok:
            raise fail(
                f"the service refused {file.name}: {inst.detail} ({inst.http_status} {inst.error})", EXIT_HTTP
            )
        files = [
            (o.kind, mc.retrieve(o.study_instance_uid, o.series_instance_uid, o.sop_instance_uid)[0])
            for o in inst.objects
        ]
    frame = inst.frames[0]
    pred, flag = frame["prediction"], frame["flag"]
    console.print(
        f"{escape(file.name)}: [bold]{escape(pred['label'])}[/] by {escape(str(inst.version))}, "
        + (
            "[bold red]FLAGGED[/] (" + escape(", ".join(flag["concepts"])) + ")"
            if flag["flagged"]
            else "not flagged"
        )
        + f"; request id {escape(res.request_id)}",
        highlight=False,
        soft_wrap=True,
    )
    paths = [_write(out / f"{_safe(file.stem)}_{_safe(kind)}.dcm", data) for kind, data in files]
    _print_saved(paths)
    return paths


def audit(
    file: Path = FILE_ARG,
    url: str = URL_OPT,
    api_key: str | None = KEY_OPT,
    version: str | None = typer.Option(None, help="Ask for this version (default: A/B routing)."),
    subject_key: str | None = typer.Option(None, help="Stable key (patient, study) for A/B routing."),
    out: Path = typer.Option(Path("."), help="Folder for the heatmap and concept mask PNGs."),
    timeout: float = TIMEOUT_OPT,
    dicom_out: Path | None = DICOM_OUT_OPT,
) -> None:
    """Audit one image with a running service: prediction, concept scores, flag, heatmap PNGs."""
    audit_image(
        file,
        url=url,
        api_key=api_key,
        version=version,
        subject_key=subject_key,
        out=out,
        timeout=timeout,
        dicom_out=dicom_out,
    )


def compare(
    file: Path = FILE_ARG,
    url: str = URL_OPT,
    api_key: str | None = KEY_OPT,
    versions: str | None = typer.Option(
        None, help="Versions to compare, comma-separated (default: every served one)."
    ),
    heatmaps: bool = typer.Option(False, "--heatmaps", help="Save each version's heatmap overlay."),
    out: Path = typer.Option(Path("."), help="Folder for --heatmaps."),
    timeout: float = TIMEOUT_OPT,
) -> None:
    """Audit one image with several versions of a running service, side by side."""
    wanted = [v.strip() for v in versions.split(",") if v.strip()] if versions else None
    with service_errors(url, file), open_client(url, api_key, timeout) as mc:
        res = mc.compare(file, versions=wanted)
    print_compare(res, file)
    if heatmaps:
        prefix = f"{_safe(file.stem)}_{_safe(res.request_id)}"
        _print_saved(
            [
                _write(out / f"{prefix}_{_safe(v)}_heatmap.png", png)
                for v in res.versions
                if (png := res.results[v].heatmap_png) is not None
            ]
        )
