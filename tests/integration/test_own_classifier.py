"""A hospital's own classifier through medaudit, end to end (issue #21's acceptance).

The hospital's side is a plain script that knows nothing of medaudit: it trains a timm ResNet-18
on exported synthderm PNGs with torch code of its own (ImageNet mean/std, 96 px) and saves a
state_dict. medaudit's side is what its ML team then types: a model spec, ``medaudit model
check``, ``medaudit build --model SPEC``, ``bentoml serve``; every built version answers
``/predict``, ``/audit`` and ``/compare`` with the spec's labels, and ``/predict``'s
probabilities equal those of the version's torch model (ONNX Runtime against torch, ≤ 1e-4).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medaudit.clients import MedauditClient
from medaudit.service.process import served

pytestmark = [
    pytest.mark.slow,
    pytest.mark.e2e,
    pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince211"),
]

BIN = Path(sys.executable).parent
SIZE = 96
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
VERSIONS = ("vanilla", "pclarc-band_aid", "rrclarc-band_aid")

# The hospital's training script: torch, timm, PIL and the csv module, nothing of medaudit.
HOSPITAL_TRAINING = r"""
import csv, sys
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

root, out, n_images, epochs = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
torch.set_num_threads(2)
rows = [r for r in csv.DictReader(open(root / "labels.csv")) if r["split"] == "train"][:n_images]
classes = ["benign", "malignant"]
x = np.stack([np.asarray(Image.open(root / "images" / f"{r['image']}.png").convert("RGB")) for r in rows])
x = torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255)
mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
x = (x - mean) / std
y = torch.tensor([classes.index(r["label"]) for r in rows])
model = timm.create_model("resnet18", pretrained=False, num_classes=2)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
model.train()
for epoch in range(epochs):
    perm = torch.randperm(len(y))
    for i in range(0, len(y), 32):
        idx = perm[i : i + 32]
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"epoch {epoch}: loss {loss.item():.3f}", flush=True)
torch.save(model.eval().state_dict(), out)
"""


def _run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert out.returncode == 0, f"{cmd[:3]} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Exported synthderm at 96 px, the hospital's trained checkpoint and its model spec."""
    from medaudit.models.data.synthetic import SynthDerm, SynthDermConfig

    root = tmp_path_factory.mktemp("hospital")
    data = root / "synthderm96"
    SynthDerm(SynthDermConfig(size=SIZE)).export(data, variant="ch")
    script = root / "train.py"
    script.write_text(HOSPITAL_TRAINING)
    ckpt = root / "derm_resnet18.pt"
    _run([sys.executable, str(script), str(data), str(ckpt), "400", "1"], timeout=900)
    spec = root / "derm.toml"
    spec.write_text(
        textwrap.dedent(
            f"""
            name = "hospital-derm"
            source = "timm"
            arch = "resnet18"
            checkpoint = "{ckpt.name}"
            labels = ["benign", "malignant"]
            input_size = {SIZE}
            mean = {list(MEAN)}
            std = {list(STD)}
            """
        )
    )
    return {"root": root, "data": data, "ckpt": ckpt, "spec": spec}


def test_model_check_accepts_the_hospitals_classifier(hospital: dict[str, Path]) -> None:
    out = _run([str(BIN / "medaudit"), "model", "check", str(hospital["spec"])], timeout=300)
    assert "ok" in out.stdout and "resnet" in out.stdout and "benign, malignant" in out.stdout


@pytest.fixture(scope="module")
def built(hospital: dict[str, Path]) -> dict[str, Path]:
    out, home = hospital["root"] / "build", hospital["root"] / "bentoml"
    cmd = [
        str(BIN / "medaudit"), "build", "--model", str(hospital["spec"]), "--out", str(out),
        "--corrections", ",".join(("vanilla", "pclarc", "rrclarc")),
        "--n-correction-images", "120", "--n-eval-images", "60", "--bentoml-home", str(home),
    ]  # fmt: skip
    res = _run(cmd, timeout=1200, env={**os.environ, "BENTOML_HOME": str(home)})
    assert "registered: hospital-derm:vanilla" in res.stdout.replace("\n", " "), res.stdout[-2000:]
    return {"out": out / "hospital-derm", "home": home}


def test_build_names_versions_by_the_model(built: dict[str, Path]) -> None:
    for v in VERSIONS:
        card = json.loads((built["out"] / "versions" / v / "card.json").read_text())
        assert card["architecture"]["labels"] == ["benign", "malignant"]
        assert (built["out"] / "versions" / v / "model.onnx").is_file()
    models = {p.name for p in (built["home"] / "models").iterdir()}
    assert models == {"hospital-derm"}, models


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def test_every_version_is_served_with_the_models_labels_and_probabilities(
    hospital: dict[str, Path], built: dict[str, Path], tmp_path: Path
) -> None:
    from medaudit.models.corrections.io import load_version

    tags = [f"hospital-derm:{v}" for v in VERSIONS]
    env = {
        "BENTOML_HOME": str(built["home"]),
        "MEDAUDIT_VERSIONS": ",".join(tags),
        "MEDAUDIT_AB_WEIGHTS": f"{tags[0]}=1",
        "MEDAUDIT_AUTH": "off",
        "MEDAUDIT_FLAGS": "off",
        "OMP_NUM_THREADS": "1",
    }
    images = sorted((hospital["data"] / "images").glob("*.png"))[:3]
    rgbs = [np.array(Image.open(p).convert("RGB")) for p in images]
    with served(env, tmp_path / "serve.log") as url, MedauditClient(url) as mc:
        assert {m.version for m in mc.models().versions} == set(tags)
        for tag in tags:
            model, cfg, _ = load_version(built["out"] / "versions" / tag.split(":")[1] / "model.pt")
            for rgb in rgbs:
                res = mc.predict(_png(rgb), version=tag)
                assert res.version == tag and set(res.prediction.probabilities) == {"benign", "malignant"}
                x = cfg.normalize(torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous())
                with torch.no_grad():
                    ref = torch.softmax(model(x).double(), 1)[0]
                got = [res.prediction.probabilities[k] for k in ("benign", "malignant")]
                np.testing.assert_allclose(got, ref.numpy(), atol=1e-4)
            audit = mc.audit(_png(rgbs[0]), version=tag)
            assert audit.prediction.label in ("benign", "malignant") and audit.heatmap_png
        cmp = mc.compare(_png(rgbs[0]), versions=tags)
        assert list(cmp.versions) == tags


def test_the_offline_audit_takes_the_spec(hospital: dict[str, Path]) -> None:
    """``medaudit audit --model SPEC``: the HTML report and concept banks of the hospital's model."""
    out = hospital["root"] / "audit"
    cmd = [
        str(BIN / "medaudit"), "audit", "--model", str(hospital["spec"]), "--out", str(out),
        "--artifacts", "band_aid,ruler", "--max-train", "160", "--max-val", "60", "--max-test", "60",
        "--max-localize", "8", "--top-k", "4", "--threads", "1",
    ]  # fmt: skip
    _run(cmd, timeout=900)
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["concepts"]) == {"band_aid", "ruler"}
    assert "synthderm rendered at the model's input size, 96 px" in " ".join(m["notes"])
    assert (out / "report.html").stat().st_size > 10_000
    refused = subprocess.run(
        [str(BIN / "medaudit"), "audit", "--model", str(hospital["spec"]), "--weights", "x.pt"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode == 2 and "--model replaces --weights" in " ".join(refused.stderr.split())
