"""The review loop closed on data read from disk, with three classes, served by the model's name.

A random 32 px ResNet-18 with three classes (bcc, melanoma, nevus) is stored as ``derm3:vanilla``,
its card naming a folder dataset. Its audits are flagged, flags go through Redis and the worker,
a reviewer resolves them by the annotations; ``medaudit refine-cav vanilla`` (the service's
``MEDAUDIT_MODEL_NAME`` spelling) re-extracts the fit data from that folder and registers
``derm3:vanilla-refit1``. The service (``MEDAUDIT_MODEL_NAME=derm3``, short version names) then
serves both: the same predictions with the three labels, and for the new version the refitted
bank's scores.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from medaudit.service.flags.events import FlagKeys
from medaudit.service.flags.producer import FlagPublisher
from medaudit.service.flags.redis_conn import connect
from medaudit.service.flags.review import resolve_review
from medaudit.service.flags.worker import Worker, WorkerConfig

pytestmark = [
    pytest.mark.redis,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince211"),
]
CLASSES = ("bcc", "melanoma", "nevus")


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def test_refine_cav_registers_a_version_served_beside_the_old_one(
    redis_url: str,
    keys: FlagKeys,
    client,
    three_class_folder: Path,
    new_medaudit_app,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch
    from starlette.testclient import TestClient

    from medaudit.cli.commands import app
    from medaudit.models.data.registry import open_dataset
    from medaudit.service.audit import AuditEngine
    from medaudit.service.store import list_versions, load_version
    from medaudit.testing.versions import register_version_files, write_version_files

    torch.set_num_threads(1)
    home = tmp_path / "bento"
    spec = f"folder:{three_class_folder}"
    d = write_version_files(
        tmp_path / "v", "vanilla", 0, labels=CLASSES, name="derm3", data={"dataset": spec, "split": "test"}
    )
    register_version_files(d, "vanilla", home, name="derm3")

    # flags of production audits, resolved by the annotations
    ds = open_dataset(spec)
    images = [ds.load_image(int(i), 32) for i in ds.indices("train")[:24]]
    member = {a: set(v) for a, v in ds.artifact_ids("train").items()}
    engine = AuditEngine.from_store("derm3:vanilla", home=home, fpr=0.99)  # every concept "present"
    pub = FlagPublisher(redis_url, keys=keys, spool_dir=tmp_path / "spool")
    for i, r in enumerate(engine.audit(images)):
        pub.submit(r, request_id=f"img{i}", version="vanilla", corrected_disagrees=True)
    assert pub.close(10.0)
    stats = Worker(connect(redis_url, timeout=5), keys, WorkerConfig(consumer="w", block_ms=100)).run(
        threading.Event(), drain=True
    )
    assert stats.dead_lettered == 0
    used = []
    for i, idx in enumerate(ds.indices("train")[:24]):
        for concept in ("band_aid", "ruler"):
            fid = f"img{i}:{concept}"
            if client.exists(keys.review(fid)):
                truth = int(idx) in member.get(concept, set())
                verdict = "artifact_confirmed" if truth else "false_alarm"
                resolve_review(client, fid, verdict, reviewer="alice", keys=keys)
                used.append(fid)
    assert used

    monkeypatch.setenv("MEDAUDIT_REDIS_URL", redis_url)
    monkeypatch.setenv("MEDAUDIT_FLAG_PREFIX", keys.prefix)
    monkeypatch.setenv("MEDAUDIT_MODEL_NAME", "derm3")
    out = tmp_path / "refined"
    done = CliRunner().invoke(app, ["refine-cav", "vanilla", "--bentoml-home", str(home), "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert [v.tag for v in list_versions(home=home)] == ["derm3:vanilla", "derm3:vanilla-refit1"]
    new = load_version("derm3:vanilla-refit1", home=home)
    old = load_version("derm3:vanilla", home=home)
    assert sorted(new.card.data["concept_bank"]["flag_ids"]) == sorted(used)
    assert new.card.data["concept_bank"]["refit_from"] == "derm3:vanilla"
    assert new.card.files["weights"]["sha256"] == old.card.files["weights"]["sha256"]
    assert new.bank.provenance.dataset == spec and new.bank.provenance.n_train == 90 + len(used)

    # both served, by short names under MEDAUDIT_MODEL_NAME
    for k, v in {
        "BENTOML_HOME": str(home),
        "MEDAUDIT_VERSIONS": "vanilla,vanilla-refit1",
        "MEDAUDIT_AUTH": "off",
        "MEDAUDIT_FLAGS": "off",
        "MEDAUDIT_AUDIT_WORKERS": "1",
    }.items():
        monkeypatch.setenv(k, v)
    rgb = images[0]
    feats = AuditEngine.from_store("derm3:vanilla-refit1", home=home).audit([rgb])[0].features
    want_new = new.bank.score(feats[None].astype(np.float64))
    want_old = old.bank.score(feats[None].astype(np.float64))
    with TestClient(new_medaudit_app()) as tc:
        pred = tc.post(
            "/predict", content=_png(rgb), headers={"Content-Type": "image/png", "X-Model-Version": "vanilla"}
        )
        assert pred.status_code == 200, pred.text
        assert set(pred.json()["prediction"]["probabilities"]) == set(CLASSES)
        cmp = tc.post(
            "/compare?versions=vanilla,vanilla-refit1",
            content=_png(rgb),
            headers={"Content-Type": "image/png"},
        )
        assert cmp.status_code == 200, cmp.text
        res = cmp.json()["results"]
    a, b = res["vanilla"], res["vanilla-refit1"]
    assert a["prediction"]["label"] in CLASSES and a["prediction"]["label"] == b["prediction"]["label"]
    np.testing.assert_allclose(
        [a["prediction"]["probabilities"][c] for c in CLASSES],
        [b["prediction"]["probabilities"][c] for c in CLASSES],
        atol=1e-6,
    )  # same weights
    scores = {v: {c["concept"]: c["score"] for c in res[v]["concepts"]} for v in res}
    for c in ("band_aid", "ruler"):
        assert scores["vanilla-refit1"][c] == pytest.approx(float(want_new[c].score[0]), rel=1e-4, abs=1e-5)
        assert scores["vanilla"][c] == pytest.approx(float(want_old[c].score[0]), rel=1e-4, abs=1e-5)
        assert abs(scores["vanilla-refit1"][c] - scores["vanilla"][c]) > 1e-6  # the refitted bank scores
