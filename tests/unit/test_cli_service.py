"""``medaudit predict|compare|audit FILE`` against the tiny store served over a real socket (uvicorn in
a thread, see conftest.py): the printed summaries, the saved PNGs, and one-line errors."""

from __future__ import annotations

import io
import re
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from medaudit.cli.commands import app

# bentoml 1.4.40 builds its IO schemas through a pydantic hook deprecated in pydantic 2.11: theirs to fix.
pytestmark = pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince211")


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def _flat(text: str) -> str:
    """Rich tables and wrapping, flattened to single spaces for substring checks."""
    return re.sub(r"[\s│┃|]+", " ", text)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    arr = np.random.default_rng(0).integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("img") / "lesion 1.png"  # a space: file names must cope
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture()
def run(live_service):
    """``run(*args, key=...)``: invoke the CLI with the service's URL and key in the environment."""

    def invoke(*args: str, key: str | None = live_service.client_key, url: str = live_service.url):
        env = {"MEDAUDIT_URL": url, "MEDAUDIT_API_KEY": key}
        return CliRunner().invoke(app, list(args), env=env)

    return invoke


def test_predict_prints_label_probabilities_version_and_shadow(run, image: Path) -> None:
    res = run("predict", str(image), "--version", "vanilla")
    assert res.exit_code == 0, res.output
    out = _flat(res.output)
    assert "lesion 1.png" in out and "benign" in out and "malignant" in out and "%" in out
    assert "answered by vanilla (via explicit), request id" in out
    assert re.search(r"shadow pclarc-band_aid: (benign|malignant) \((agrees|DISAGREES)\)", out), out
    res = run("predict", str(image), "--subject-key", "patient-7")
    assert res.exit_code == 0 and "(via hash)" in _flat(res.output)


def test_audit_file_prints_the_audit_and_saves_heatmap_and_masks(run, image: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "pngs"
    res = run("audit", str(image), "--version", "pclarc-band_aid", "--out", str(out_dir))
    assert res.exit_code == 0, res.output
    out = _flat(res.output)
    assert "answered by pclarc-band_aid (via explicit)" in out
    assert "concept score percentile present relevance share" in out
    assert "band_aid" in out and "ruler" in out
    assert "FLAGGED for review" in out or "not flagged" in out
    rid = re.search(r"request id ([0-9a-f]{32})", out)
    assert rid, out
    heatmap = out_dir / f"lesion-1_{rid.group(1)}_heatmap.png"
    assert heatmap.is_file() and f"saved {heatmap}" in out
    assert _pixels(heatmap).shape == (32, 32, 3)
    saved = sorted(p.name for p in out_dir.iterdir())
    masks = [n for n in saved if "_mask_" in n]
    present = {c for c in ("band_aid", "ruler") if re.search(rf"{c} \S+ \S+ yes", out)}
    assert {n.rsplit("_mask_", 1)[1][:-4] for n in masks} == present
    for n in masks:
        assert set(np.unique(_pixels(out_dir / n))) <= {0, 255}


def test_audit_file_defaults_to_the_current_folder(run, image: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    res = run("audit", str(image), "--version", "vanilla")
    assert res.exit_code == 0, res.output
    assert [p.name for p in tmp_path.glob("lesion-1_*_heatmap.png")]
    assert "shadow pclarc-band_aid" in _flat(res.output)


def test_compare_prints_one_row_per_version_and_saves_heatmaps(run, image: Path, tmp_path: Path) -> None:
    res = run(
        "compare", str(image), "--versions", "vanilla,pclarc-band_aid", "--heatmaps", "--out", str(tmp_path)
    )
    assert res.exit_code == 0, res.output
    out = _flat(res.output)
    assert "lesion 1.png: 2 versions" in out
    assert "version label p(label) flagged present top share" in out
    assert out.index(" vanilla ") < out.index(" pclarc-band_aid ")
    assert re.search(r"labels (agree|DISAGREE), flags (agree|DISAGREE); request id", out), out
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and all(n.startswith("lesion-1_") and n.endswith("_heatmap.png") for n in names)
    assert any("_vanilla_" in n for n in names) and any("_pclarc-band_aid_" in n for n in names)
    res = run("compare", str(image))
    assert res.exit_code == 0 and "2 versions" in _flat(res.output)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _one_error_line(res) -> str:
    assert res.exit_code != 0
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1, res.output
    assert lines[0].startswith("error: ")
    return lines[0]


def test_errors_are_one_line_and_say_what_to_do(run, image: Path, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    res = run("predict", str(image), "--url", url, "--timeout", "5")
    line = _one_error_line(res)
    assert (
        res.exit_code == 3 and f"cannot reach the medaudit service at {url}" in line and "make demo" in line
    )

    res = run("audit", str(image), key=None)
    line = _one_error_line(res)
    assert res.exit_code == 1 and "401" in line and "MEDAUDIT_API_KEY" in line and "is not set" in line
    res = run("predict", str(image), "--api-key", "wrong-key")
    line = _one_error_line(res)
    assert "was refused" in line and "wrong-key" not in line

    res = run("predict", str(image), "--version", "nope")
    line = _one_error_line(res)
    assert (
        res.exit_code == 1
        and "unknown model version 'nope'; this service serves: pclarc-band_aid, vanilla" in line
    )
    res = run("compare", str(image), "--versions", "vanilla,nope")
    assert "this service serves: pclarc-band_aid, vanilla" in _one_error_line(res)

    text = tmp_path / "notes.png"
    text.write_text("not an image")
    res = run("audit", str(text))
    line = _one_error_line(res)
    assert (
        res.exit_code == 1
        and "the service refused notes.png" in line
        and "415 unsupported_media_type" in line
    )
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert "400 empty_body" in _one_error_line(run("predict", str(empty)))


def test_audit_modes_refuse_each_others_options(run, image: Path, tmp_path: Path) -> None:
    res = run("audit", str(image), "--weights", str(tmp_path / "model.pt"), "--top-k", "3")
    assert res.exit_code == 2 and "--weights --top-k belong to the offline audit" in _flat(res.output)
    res = run("audit", "--version", "vanilla", "--subject-key", "p")
    assert res.exit_code == 2 and "--version --subject-key need an image" in _flat(res.output)
    res = run("audit", str(tmp_path / "missing.png"))
    assert res.exit_code == 2 and "does not exist" in _flat(res.output)
    res = run("predict", str(tmp_path))
    assert res.exit_code == 2 and "is a directory" in _flat(res.output)


def test_saved_heatmap_is_the_clients_png(run, image: Path, tmp_path: Path, live_service) -> None:
    """The file on disk is byte for byte the PNG the client decoded (no re-encoding on the way)."""
    from medaudit.clients import MedauditClient

    res = run("audit", str(image), "--version", "vanilla", "--out", str(tmp_path))
    assert res.exit_code == 0, res.output
    (saved,) = tmp_path.glob("*_heatmap.png")
    with MedauditClient(live_service.url, api_key=live_service.client_key) as mc:
        direct = mc.audit(image, version="vanilla")
    assert np.array_equal(_pixels(saved), np.asarray(Image.open(io.BytesIO(direct.heatmap_png))))


def test_demo_try_commands_print_one_per_line_on_a_narrow_console(tmp_path: Path) -> None:
    """``make demo``'s curl examples stay whole on a console narrower than them (rich wraps at 80
    columns off a terminal; wrapped, a copied command breaks) and quote a path with spaces."""
    import shlex

    from rich.console import Console

    from medaudit.cli.commands import print_try_commands, try_commands

    example = tmp_path / "a folder" / "example malignant band_aid.png"
    buf = io.StringIO()
    print_try_commands(Console(file=buf, width=40), example, 3000, "rrr-band_aid")
    commands = try_commands(example, 3000, "rrr-band_aid")
    assert buf.getvalue().splitlines() == ["  " + c for c in commands]
    assert all(len(c) > 40 for c in commands[:3])  # the console really was narrower
    assert shlex.split(commands[0])[3] == f"@{example}"
    assert "compare?versions=vanilla,rrr-band_aid" in commands[1]  # the partner it is given


def test_build_versions_takes_every_option_of_the_build_command() -> None:
    """``medaudit demo`` calls build_versions; a new ``medaudit build`` option must reach it too."""
    import inspect

    from medaudit.cli.build_cmd import build, build_versions

    assert list(inspect.signature(build).parameters) == list(inspect.signature(build_versions).parameters)
    for name, p in inspect.signature(build_versions).parameters.items():
        assert p.default is inspect.Parameter.empty or not type(p.default).__name__.endswith("Info"), name
