"""Review loop + refine: confirmed flags and false alarms become CAV samples, the bank is refitted.

Two tests:

* In feature space, where the truth is known: the original fit data is *confounded* (every
  artifact sample also carries a second, stronger feature, as band-aids co-occur with
  benign-looking lesions in synthderm), production flags are not. Reviewed flags go the whole
  way (publish, worker, resolve, read back) and the refitted CAV retrieves the artifact better on
  an unconfounded held-out set.
* End to end on the tiny store (random 32 px weights) through ``medaudit refine-cav``, which
  re-extracts the original fit data through the version's model: the bank and its provenance
  change. Its AUROCs are printed, not asserted: random features barely see a band-aid at 32 px
  (held-out AUROC ≈ 0.5 whatever the fit), so their differences are noise.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from flagtools import result, score
from typer.testing import CliRunner

from medaudit.models.xai.concepts import ConceptBank
from medaudit.service.flags.events import FlagKeys
from medaudit.service.flags.producer import FlagPublisher
from medaudit.service.flags.redis_conn import connect
from medaudit.service.flags.refine import FitData, refine_bank, reviewed_samples
from medaudit.service.flags.review import resolve_review
from medaudit.service.flags.worker import Worker, WorkerConfig

pytestmark = pytest.mark.redis
TAG, LAYER, C = "resnet18-synthderm:vanilla", "identity_2", 32


def _draw(n: int, confound: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """φ = noise + 1.5·t·u (the artifact) + 3·c·w (a co-occurring feature; c = t with prob. ``confound``)."""
    t = (rng.random(n) < 0.5).astype(np.int64)
    c = np.where(rng.random(n) < confound, t, rng.integers(0, 2, n))
    x = rng.normal(size=(n, C))
    x[:, 0] += 1.5 * t
    x[:, 1] += 3.0 * c
    return x, t


def _drain(redis_url: str, keys: FlagKeys) -> None:
    stats = Worker(connect(redis_url, timeout=5), keys, WorkerConfig(consumer="w", block_ms=100)).run(
        threading.Event(), drain=True
    )
    assert stats.dead_lettered == 0


def test_reviewed_flags_refit_the_bank_and_held_out_retrieval_improves(
    redis_url: str, keys: FlagKeys, client, tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    x_tr, t_tr = _draw(40, 1.0, rng)  # the original fit data: fully confounded
    x_val, _ = _draw(40, 0.5, rng)
    x_te, t_te = _draw(400, 0.5, rng)  # held out, unconfounded
    x_prod, t_prod = _draw(80, 0.5, rng)  # what production flags carry
    ruler_tr, ruler_te = (rng.random(40) < 0.5).astype(np.int64), (rng.random(400) < 0.5).astype(np.int64)
    labels = {"band_aid": t_tr, "ruler": ruler_tr}
    bank = ConceptBank.fit(
        TAG, LAYER, x_tr, labels, x_val, kind="svm", dataset="synthetic", provenance={"origin": "t"}
    )
    data = FitData(x_tr, labels, x_val, x_te, {"band_aid": t_te, "ruler": ruler_te}, dataset="synthetic")

    pub = FlagPublisher(redis_url, keys=keys, spool_dir=tmp_path)
    for i, x in enumerate(x_prod):
        pub.submit(
            result(score("band_aid"), features=x.astype(np.float32)), request_id=f"p{i}", version="vanilla"
        )
    for i in range(6):  # 4 resolved as "other", 2 never reviewed: neither may become a sample
        pub.submit(result(score("band_aid"), seed=i, dim=C), request_id=f"x{i}", version="vanilla")
    assert pub.close(10.0)
    _drain(redis_url, keys)
    for i, t in enumerate(t_prod):
        verdict = "artifact_confirmed" if t else "false_alarm"
        resolve_review(client, f"p{i}:band_aid", verdict, reviewer="alice", keys=keys)
    for i in range(4):
        resolve_review(client, f"x{i}:band_aid", "other", "a hair, not a band-aid", reviewer="bob", keys=keys)

    samples, skipped = reviewed_samples(client, keys, model_version=TAG, layer=LAYER)
    assert skipped == {"verdict_other": 4} and len(samples) == 80
    # Oldest resolution first, and resolutions in the same millisecond by flag id ("p10" < "p9"):
    # match each sample to the flag it came from, not to a position.
    by_flag = {s.flag_id: s for s in samples}
    assert set(by_flag) == {f"p{i}:band_aid" for i in range(80)}
    for i, x in enumerate(x_prod):
        np.testing.assert_array_equal(by_flag[f"p{i}:band_aid"].features, x.astype(np.float32))
        assert by_flag[f"p{i}:band_aid"].label == t_prod[i]

    res = refine_bank(bank, data, samples)
    before, base, after = (m["band_aid"]["auroc"] for m in (res.stored, res.baseline, res.refined))  # type: ignore[index]
    print(
        f"\nflags reviewed 84 (80 confirmed/false alarm, 4 other), 2 open; samples added {res.added}; "
        f"held-out band_aid AUROC: stored {before:.3f}, refit without reviews {base:.3f}, refined {after:.3f}"
    )
    assert before == base  # the refit procedure alone changes nothing: the difference is the reviews'
    assert after > base  # and it does not get worse: here it gets better
    assert not np.allclose(res.bank["band_aid"].v, bank["band_aid"].v)
    np.testing.assert_array_equal(res.bank["ruler"].v, bank["ruler"].v)  # no ruler samples: unchanged

    n_pos = int(t_prod.sum())
    assert res.added == {
        "band_aid": {"positive": n_pos, "negative": 80 - n_pos},
        "ruler": {"positive": 0, "negative": 0},
    }
    saved = ConceptBank.load(res.bank.save(tmp_path / "bank"))
    prov = saved.provenance
    assert prov.n_train == 120 and prov.split == "train+reviewed" and prov.extra["origin"] == "t"
    refined = prov.extra["refined"]
    assert refined["n_reviewed"] == 80 and refined["n_original"] == 40
    assert sorted(refined["flag_ids"]) == sorted(f"p{i}:band_aid" for i in range(80))
    assert refined["reviewed_added"]["band_aid"]["positive"] == n_pos
    assert saved.model_version == TAG and saved.layer == LAYER


def test_refine_cav_command_on_the_tiny_store(
    redis_url: str, keys: FlagKeys, client, tiny_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from medaudit.cli.commands import app
    from medaudit.models.data.synthetic import SynthDerm, SynthDermConfig
    from medaudit.service.audit import AuditEngine
    from medaudit.service.store import load_version

    torch.set_num_threads(1)
    spec = {"band_aid": (0.5, 0.5), "ruler": (0.5, 0.5)}
    # A presence FPR that makes every concept "present", and a disagreeing corrected version:
    # every image flags.
    engine = AuditEngine.from_store("vanilla", home=tiny_store, fpr=0.99)
    prod = SynthDerm(SynthDermConfig(seed=1, size=32, n_train=24, n_val=0, n_test=0, spec=spec))
    results = engine.audit([prod.sample(i).image for i in range(24)])
    pub = FlagPublisher(redis_url, keys=keys, spool_dir=tmp_path / "spool")
    flagged = 0
    for i, r in enumerate(results):
        flagged += len(pub.submit(r, request_id=f"img{i}", version="vanilla", corrected_disagrees=True).flags)
    assert pub.close(10.0)
    _drain(redis_url, keys)
    used = []
    for i in range(24):
        for concept in ("band_aid", "ruler"):
            fid = f"img{i}:{concept}"
            if client.exists(keys.review(fid)):
                verdict = "artifact_confirmed" if prod.membership[concept][i] else "false_alarm"
                resolve_review(client, fid, verdict, reviewer="alice", keys=keys)
                used.append(fid)

    monkeypatch.setenv("MEDAUDIT_REDIS_URL", redis_url)
    monkeypatch.setenv("MEDAUDIT_FLAG_PREFIX", keys.prefix)
    runner = CliRunner()
    no_cfg = runner.invoke(
        app, ["refine-cav", "vanilla", "--bentoml-home", str(tiny_store), "--out", str(tmp_path)]
    )
    assert no_cfg.exit_code == 2 and "records no data_config" in " ".join(no_cfg.output.split())

    cfg_path = tmp_path / "data.json"
    fit_cfg = SynthDermConfig(seed=0, size=32, n_train=24, n_val=12, n_test=60, spec=spec)
    cfg_path.write_text(json.dumps(fit_cfg.to_dict()))
    out = tmp_path / "refined"
    args = [
        "refine-cav",
        "vanilla",
        "--bentoml-home",
        str(tiny_store),
        "--out",
        str(out),
        "--data-config",
        str(cfg_path),
        "--no-register",  # the session's tiny store stays as other modules expect it
    ]
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    report = json.loads((out / "refine.json").read_text())
    print(f"\nflags {flagged}, resolved {len(used)}; held-out retrieval: {json.dumps(report['held_out'])}")
    stored = load_version(TAG, home=tiny_store).bank
    new = ConceptBank.load(out / "bank")
    # the refitted bank belongs to the new version it is registered as (same weights)
    assert new.model_version == report["new_version"] == f"{TAG}-refit1" and new.layer == stored.layer
    assert all(not np.allclose(new[c].v, stored[c].v) for c in stored)
    assert sorted(new.provenance.extra["refined"]["flag_ids"]) == sorted(used) == sorted(report["flag_ids"])
    assert new.provenance.dataset == "synthderm" and new.provenance.n_train == 24 + len(used)
    for c in stored:
        assert {"stored", "baseline", "refined"} <= set(report["held_out"][c])
