"""A hospital's own classifier through medaudit, end to end (issue #21's acceptance).

The hospital's side is a plain script that knows nothing of medaudit: it trains a timm ResNet-18
on exported synthderm PNGs with torch code of its own (ImageNet mean/std, 96 px) and saves a
state_dict. medaudit's side is what its ML team then types: a model spec, ``medaudit model
check``, ``medaudit build --model SPEC``, ``bentoml serve``; every built version answers
``/predict``, ``/audit`` and ``/compare`` with the spec's labels, and ``/predict``'s
probabilities equal those of the version's torch model (ONNX Runtime against torch, ≤ 1e-4).

The same with three classes on data as people download it: synthderm's ISIC-like form exported in
the ISIC 2019 layout (one-hot ground-truth CSV, lesion metadata, artifact annotations, no masks),
a second plain script trains a three-class ResNet-18 from that CSV (64 px, kept small), and
``medaudit build --model SPEC --data isic2019:…`` builds and registers its versions, which the
same service serves beside the first model's (whose short names ``MEDAUDIT_MODEL_NAME`` resolves).
That data has no masks; RRR's refusal there is tests/unit/test_build_any_data.py's.
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
# The hospital's data: synthderm with fewer images than the default's 2,800 (the build's concept
# banks read every training image); the build renders the same images by the same spec.
SPLITS = {"n_train": 600, "n_val": 150, "n_test": 250}
SYNTHDERM = f"synthderm?size={SIZE}&" + "&".join(f"{k}={v}" for k, v in SPLITS.items())

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


# The same hospital with ISIC 2019's layout: the one-hot ground-truth CSV, three of its classes.
HOSPITAL_TRAINING_ISIC = r"""
import csv, sys
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

root, out, epochs = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
torch.set_num_threads(2)
classes = ["NV", "MEL", "BCC"]
rows = list(csv.DictReader(open(root / "ISIC_2019_Training_GroundTruth.csv")))
images = root / "ISIC_2019_Training_Input"
x = np.stack([np.asarray(Image.open(images / f"{r['image']}.jpg").convert("RGB")) for r in rows])
x = torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255)
mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
x = (x - mean) / std
y = torch.tensor([int(np.argmax([float(r[c]) for c in classes])) for r in rows])
model = timm.create_model("resnet18", pretrained=False, num_classes=3)
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
torch.save(model.eval().state_dict(), out)
"""
SIZE3, CLASSES3 = 64, ("NV", "MEL", "BCC")
VERSIONS3 = ("vanilla", "pclarc-band_aid")


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
    SynthDerm(SynthDermConfig(size=SIZE, **SPLITS)).export(data, variant="ch")
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
        "--data", SYNTHDERM, "--corrections", ",".join(("vanilla", "pclarc", "rrclarc")),
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
    assert "hospital-derm" in models and models <= {"hospital-derm", "hospital-derm3"}, models


@pytest.fixture(scope="module")
def built3(hospital: dict[str, Path], built: dict[str, Path]) -> dict[str, Path]:
    """Synthderm's three classes in the ISIC 2019 layout without masks, the hospital's three-class
    model trained on its CSV, and ``medaudit build --data isic2019:…`` into the same store."""
    from medaudit.models.data.synthetic import SynthDerm, SynthDermConfig

    root = hospital["root"]
    data = root / "isic"
    cfg = SynthDermConfig.preset("isic_like", size=SIZE3, n_train=180, n_val=45, n_test=75)
    SynthDerm(cfg).export(data, layout="isic2019", masks=False)
    script = root / "train_isic.py"
    script.write_text(HOSPITAL_TRAINING_ISIC)
    ckpt = root / "derm3.pt"
    _run([sys.executable, str(script), str(data), str(ckpt), "1"], timeout=900)
    spec = root / "derm3.toml"
    spec.write_text(
        textwrap.dedent(
            f"""
            name = "hospital-derm3"
            source = "timm"
            arch = "resnet18"
            checkpoint = "{ckpt.name}"
            labels = {json.dumps(list(CLASSES3))}
            input_size = {SIZE3}
            mean = {list(MEAN)}
            std = {list(STD)}
            """
        )
    )
    out = root / "build3"
    cmd = [
        str(BIN / "medaudit"), "build", "--model", str(spec), "--out", str(out), "--bentoml-home",
        str(built["home"]), "--data", f"isic2019:{data}?classes={','.join(CLASSES3)}", "--cav-scope", "NV",
        "--corrections", "vanilla,pclarc", "--n-eval-images", "40",
    ]  # fmt: skip
    res = _run(cmd, timeout=1200)
    assert "registered: hospital-derm3:vanilla" in res.stdout.replace("\n", " "), res.stdout[-2000:]
    return {"out": out / "hospital-derm3", "data": data}


def test_the_three_class_build_on_isic_layout_data_names_its_data_and_masks(built3: dict[str, Path]) -> None:
    card = json.loads((built3["out"] / "versions" / "pclarc-band_aid" / "card.json").read_text())
    assert card["architecture"]["labels"] == list(CLASSES3)
    d = card["data"]
    assert d["dataset"].startswith("isic2019:/") and d["mask_source"] == "none" and d["attacked"] is None
    assert d["cav_scope"] == ["NV"] and d["cav_data"] == "membership"
    cls = card["metrics"]["classification"]
    assert {"ch", "artifact", "no_artifact", "clean"} <= set(cls)
    assert {f"acc_ovr_{c}" for c in CLASSES3} <= set(cls["ch"]) and "f1_macro" in cls["ch"]


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def test_every_version_is_served_with_the_models_labels_and_probabilities(
    hospital: dict[str, Path], built: dict[str, Path], built3: dict[str, Path], tmp_path: Path
) -> None:
    """Both models' versions in one service: the first model's by short names (its name is
    ``MEDAUDIT_MODEL_NAME``), the three-class model's by full tags."""
    from medaudit.models.corrections.io import load_version

    short = list(VERSIONS)
    tags3 = [f"hospital-derm3:{v}" for v in VERSIONS3]
    env = {
        "BENTOML_HOME": str(built["home"]),
        "MEDAUDIT_MODEL_NAME": "hospital-derm",
        "MEDAUDIT_VERSIONS": ",".join(short + tags3),
        "MEDAUDIT_AB_WEIGHTS": f"{short[0]}=1",
        "MEDAUDIT_AUTH": "off",
        "MEDAUDIT_FLAGS": "off",
        "OMP_NUM_THREADS": "1",
    }
    pngs = sorted((hospital["data"] / "images").glob("*.png"))[:3]
    jpgs = sorted((built3["data"] / "ISIC_2019_Training_Input").glob("*.jpg"))[:3]
    served_models = [
        (
            short,
            built["out"],
            ("benign", "malignant"),
            [np.array(Image.open(p).convert("RGB")) for p in pngs],
        ),
        (tags3, built3["out"], CLASSES3, [np.array(Image.open(p).convert("RGB")) for p in jpgs]),
    ]
    with served(env, tmp_path / "serve.log") as url, MedauditClient(url) as mc:
        assert {m.version for m in mc.models().versions} == set(short + tags3)
        for names, out, labels, rgbs in served_models:
            for name in names:
                model, cfg, _ = load_version(out / "versions" / name.split(":")[-1] / "model.pt")
                for rgb in rgbs:
                    res = mc.predict(_png(rgb), version=name)
                    assert res.version == name and set(res.prediction.probabilities) == set(labels)
                    x = cfg.normalize(torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous())
                    with torch.no_grad():
                        ref = torch.softmax(model(x).double(), 1)[0]
                    got = [res.prediction.probabilities[k] for k in labels]
                    np.testing.assert_allclose(got, ref.numpy(), atol=1e-4)
                audit = mc.audit(_png(rgbs[0]), version=name)
                assert audit.prediction.label in labels and audit.heatmap_png
            cmp = mc.compare(_png(rgbs[0]), versions=names)
            assert list(cmp.versions) == names


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
