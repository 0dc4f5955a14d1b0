"""Evaluation (method.md §7): hand-made classification case, TCAV, retrieval, artifact relevance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from medaudit.models.corrections import CorrectionData, PClarc
from medaudit.models.errors import ConfigError
from medaudit.models.evaluate import artifact_relevance, classification_metrics, mean_sem, retrieval, tcav
from medaudit.models.registry import ModelCfg, create_model

LABELS = ("benign", "malignant")


def test_classification_metrics_on_known_logits() -> None:
    logits = np.array([[2.0, 0.0], [1.0, 0.5], [0.0, 1.0], [0.2, 0.1], [0.0, 3.0], [1.0, 2.0]])
    y = np.array([0, 0, 0, 1, 1, 1])
    # predictions 0, 0, 1, 0, 1, 1: 4/6 correct; per class: benign 2/3, malignant 2/3
    m = classification_metrics(logits, y, LABELS)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["accuracy_se"] == pytest.approx(math.sqrt((4 / 6) * (2 / 6) / 6))
    assert m["accuracy_benign"] == pytest.approx(2 / 3) and m["accuracy_malignant"] == pytest.approx(2 / 3)
    assert m["f1_macro"] == pytest.approx(2 / 3)  # both classes: P = R = 2/3
    # AUC malignant on raw logit 1: pos {0.1, 3, 2} vs neg {0, 0.5, 1}: 7 of 9 pairs ordered
    assert m["auc_malignant"] == pytest.approx(7 / 9)
    # AUC benign on raw logit 0: pos {2, 1, 0} vs neg {0.2, 0, 1}: 2 beats all three (3),
    # 1 beats 0.2 and 0 and ties 1 (2.5), 0 ties 0 (0.5) -> 6 / 9
    assert m["auc_benign"] == pytest.approx(6 / 9)
    # Two classes: one-vs-rest accuracy is the accuracy, and FPR of one class is 1 - the other's accuracy.
    assert m["acc_ovr_benign"] == m["acc_ovr_malignant"] == pytest.approx(4 / 6)
    assert m["fpr_benign"] == pytest.approx(1 / 3) and m["fpr_malignant"] == pytest.approx(1 / 3)


def test_classification_metrics_three_classes_one_vs_rest() -> None:
    """The paper's per-class one-vs-rest accuracy and FPR (method.md §7) on three classes."""
    labels = ("nevus", "melanoma", "bcc")
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    pred = np.array([0, 1, 0, 1, 2, 2, 2, 0])
    logits = np.eye(3)[pred] + 0.01 * np.arange(8)[:, None]  # argmax = pred
    m = classification_metrics(logits, y, labels)
    # nevus: predicted-nevus == is-nevus on 0,2 (TP), 3,4,5,6 (TN); wrong on 1 (FN) and 7 (FP): 6/8
    assert m["acc_ovr_nevus"] == pytest.approx(6 / 8) and m["fpr_nevus"] == pytest.approx(1 / 5)
    # melanoma: TP 3; FN 4; FP 1; TN 0,2,5,6,7: 6/8; FPR 1 of 6 others
    assert m["acc_ovr_melanoma"] == pytest.approx(6 / 8) and m["fpr_melanoma"] == pytest.approx(1 / 6)
    # bcc: TP 5,6; FN 7; FP 4; TN 0,1,2,3: 6/8; FPR 1 of 5 others
    assert m["acc_ovr_bcc"] == pytest.approx(6 / 8) and m["fpr_bcc"] == pytest.approx(1 / 5)
    assert m["accuracy"] == pytest.approx(5 / 8) and m["accuracy_bcc"] == pytest.approx(2 / 3)
    assert m["f1_macro"] == pytest.approx(np.mean([2 / 3, 1 / 2, 2 / 3]))


def test_classification_metrics_single_class_auc_is_nan_and_shape_errors() -> None:
    m = classification_metrics(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 0]), LABELS)
    assert math.isnan(m["auc_benign"]) and math.isnan(m["accuracy_malignant"])
    with pytest.raises(ConfigError):
        classification_metrics(np.zeros((3, 3)), np.zeros(3), LABELS)


def test_mean_sem() -> None:
    r = mean_sem(np.array([1.0, 2.0, 3.0]))
    assert r.mean == 2.0 and r.sem == pytest.approx(1 / math.sqrt(3)) and r.n == 3
    assert mean_sem(np.array([])).n == 0


class _Lin(nn.Module):
    """feat = 1x1 conv (identity-like hook point), logits = linear map of spatial sums."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.feat = nn.Conv2d(3, 3, 1, bias=False)
        with torch.no_grad():
            self.feat.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        self.w = nn.Parameter(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feat(x).sum((2, 3)) @ self.w.T


def test_tcav_on_a_linear_model() -> None:
    # d_{h,w} = Σ_c ∂f_k/∂a_{c,h,w} v_c = ⟨W_k, v⟩ at every position
    w = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 0.0]])
    model = _Lin(w)
    cfg = ModelCfg(arch="lin", source="test", input_size=(3, 4, 4), hook_points={"feat": "feat"})
    images = torch.randint(0, 256, (3, 3, 4, 4), dtype=torch.uint8)
    v = np.array([1.0, 0.0, 0.0])
    t0 = tcav(model, cfg, "feat", v, images, target_class=0)
    assert t0.quotient == 1.0 and t0.mean_quotient == 1.0 and t0.sensitivity == pytest.approx(1.0)
    assert t0.n == 3 and t0.quotient_se == 0.0
    t1 = tcav(model, cfg, "feat", np.array([0.0, 1.0, 0.0]), images, target_class=0)
    assert t1.quotient == 0.0 and t1.sensitivity == pytest.approx(2.0)
    t2 = tcav(model, cfg, "feat", v, images, target_class=1)  # no gradient along v: undefined
    assert math.isnan(t2.quotient) and t2.sensitivity == 0.0


def test_retrieval_of_constant_scores_is_chance_not_noise() -> None:
    labels = np.array([0, 1] * 10)
    noisy_constant = 0.7 + np.linspace(-1, 1, 20) * 1e-8 * labels  # float32-level noise
    r = retrieval(noisy_constant, labels)
    assert r["auroc"] == 0.5 and math.isnan(r["kendall_tau"])
    assert retrieval(labels * 2.0 + 1.0, labels)["auroc"] == 1.0


def test_tcav_and_retrieval_after_pclarc() -> None:
    torch.manual_seed(0)
    model, cfg = create_model("resnet18", img_size=32)
    rng = np.random.default_rng(0)
    v = rng.normal(size=256)
    v /= np.linalg.norm(v)
    net = PClarc().apply(model, cfg, CorrectionData(layer="identity_2", cav=v, mu0=rng.random(256)))
    images = torch.randint(
        0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    # measured through the projection: the spatial sum of d vanishes (Σ_c v_c² = 1), so every
    # per-sample spatial mean is ~0 while single positions still move
    from medaudit.models.evaluate import directional_derivatives

    d = directional_derivatives(net, cfg, "identity_2", v, images, target_class=1)
    d0 = directional_derivatives(model, cfg, "identity_2", v, images, target_class=1)
    assert np.abs(d.sum(1)).max() < 1e-5 * np.abs(d0).sum(1).max()


def test_artifact_relevance_counts_heatmap_inside_refined_mask(monkeypatch) -> None:
    import medaudit.models.evaluate as ev

    hm = np.zeros((2, 32, 32))
    hm[0, :8, :8] = 1.0  # all relevance on the artifact
    hm[1, 20:, 20:] = -1.0  # all (negative) relevance far from it
    monkeypatch.setattr(ev, "input_heatmaps", lambda *a, **k: hm)
    masks = np.zeros((2, 32, 32))
    masks[:, :6, :6] = 1.0
    r = artifact_relevance(None, None, torch.zeros(2, 3, 32, 32), torch.zeros(2), masks)  # type: ignore[arg-type]
    assert r.n == 2 and r.mean == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(ConfigError):
        artifact_relevance(None, None, torch.zeros(2), torch.zeros(2), masks[:, :5])  # type: ignore[arg-type]


def test_evaluate_version_reads_retrieval_activations_from_the_ch_forward(monkeypatch) -> None:
    import medaudit.models.evaluate as ev
    from medaudit.models.corrections.base import pooled_activations
    from medaudit.models.train import predict

    torch.manual_seed(0)
    model, cfg = create_model("resnet18", img_size=32)
    g = torch.Generator().manual_seed(0)
    sets = {
        k: ev.EvalSet(
            torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g), torch.tensor([0, 1] * 3)
        )
        for k in ev.VARIANTS
    }
    rng = np.random.default_rng(0)
    v = rng.normal(size=256)
    v /= np.linalg.norm(v)
    member = np.array([0, 1, 0, 1, 1, 0])
    masks = np.zeros((2, 32, 32), np.float32)
    masks[:, :8, :8] = 1.0
    data = ev.EvalData(
        sets=sets, artifact="box", cav_layer="identity_2", cav=v, cav_kind="signal", tcav_class=0,
        artifact_images=sets["ch"].images[:2], artifact_labels=sets["ch"].labels[:2], artifact_masks=masks,
        retrieval_images=sets["ch"].images[:6], retrieval_labels=member,
    )  # fmt: skip
    # the reference: a separate forward for retrieval, as before
    ref_acts = pooled_activations(model, cfg, "identity_2", sets["ch"].images)
    ref_ret = retrieval(ref_acts @ v, member)
    ref_cls = {
        k: classification_metrics(predict(model, s.images, cfg), s.labels, LABELS) for k, s in sets.items()
    }

    def no_second_pass(*a, **k):  # the ch forward must supply the activations
        raise AssertionError("pooled_activations called although the retrieval images are the ch set")

    monkeypatch.setattr(ev, "pooled_activations", no_second_pass)
    rep = ev.evaluate_version(model, cfg, data)
    assert rep.retrieval == pytest.approx(ref_ret)
    for k in ev.VARIANTS:
        assert rep.classification[k] == pytest.approx(ref_cls[k], nan_ok=True)
    logits, acts = ev.logits_and_pooled(model, cfg, sets["ch"].images, "identity_2", batch_size=4)
    assert np.allclose(acts, ref_acts, rtol=1e-5, atol=1e-6)
    assert torch.allclose(logits, predict(model, sets["ch"].images, cfg), atol=1e-5)
    # retrieval images that are not a test variant still get their own pass
    other = ev.EvalData(**{**data.__dict__, "retrieval_images": sets["ch"].images.clone()})
    with pytest.raises(AssertionError, match="pooled_activations called"):
        ev.evaluate_version(model, cfg, other)


def test_evaluate_version_forwards_rows_shared_between_variants_once() -> None:
    import medaudit.models.evaluate as ev
    from medaudit.models.train import predict

    torch.manual_seed(0)
    model, cfg = create_model("resnet18", img_size=32)
    g = torch.Generator().manual_seed(1)
    ch = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g)
    clean, attacked = ch.clone(), ch.clone()
    clean[[1, 4]] = 0  # rows 1 and 4 "carried an artifact" in ch
    attacked[[0, 2, 3]] = 255  # the attack changes rows 0, 2, 3; rows 1, 4, 5 equal ch's
    y = torch.tensor([0, 1] * 3)
    sets = {"ch": ev.EvalSet(ch, y), "clean": ev.EvalSet(clean, y), "attacked": ev.EvalSet(attacked, y)}
    v = np.ones(256) / 16.0
    data = ev.EvalData(
        sets=sets, artifact="box", cav_layer="identity_2", cav=v, cav_kind="signal", tcav_class=0,
        artifact_images=ch[:2], artifact_labels=y[:2], artifact_masks=np.ones((2, 32, 32), np.float32),
        retrieval_images=ch, retrieval_labels=np.array([0, 1, 0, 1, 1, 0]),
    )  # fmt: skip
    ref = {k: classification_metrics(predict(model, s.images, cfg), y, LABELS) for k, s in sets.items()}
    rows: list[int] = []
    handle = model.register_forward_pre_hook(
        lambda _m, args: rows.append(len(args[0])) if not torch.is_grad_enabled() else None
    )
    try:
        rep = ev.evaluate_version(model, cfg, data)
    finally:
        handle.remove()
    for k in sets:
        assert rep.classification[k] == pytest.approx(ref[k], nan_ok=True)
    # no-grad forwards: all 6 ch rows (with the retrieval activations), clean rows 1 and 4,
    # attacked rows 0, 2 and 3
    assert sum(rows) == 6 + 2 + 3


def _shared_prefix_data(seed: int = 2):
    import medaudit.models.evaluate as ev

    g = torch.Generator().manual_seed(seed)
    ch = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8, generator=g)
    clean, attacked = ch.clone(), ch.clone()
    # Boxes, not whole images: two identical images score exactly alike in one batch, and the AUC
    # counts such a tie as half a pair. A replay computes them in other batches, where round-off
    # may break the tie: AUC 0.26 vs 0.28 on an AMD EPYC, from logits equal to 1e-6.
    clean[[1, 4], :, 8:16, 8:16] = 0
    attacked[[0, 2, 3], :, :8, :8] = 255
    y = torch.tensor([0, 1] * 5)
    sets = {"ch": ev.EvalSet(ch, y), "clean": ev.EvalSet(clean, y), "attacked": ev.EvalSet(attacked, y)}
    v = np.random.default_rng(seed).normal(size=256)
    v /= np.linalg.norm(v)
    return ev.EvalData(
        sets=sets, artifact="box", cav_layer="identity_2", cav=v, cav_kind="signal", tcav_class=0,
        artifact_images=ch[:2], artifact_labels=y[:2], artifact_masks=np.ones((2, 32, 32), np.float32),
        retrieval_images=ch, retrieval_labels=np.array([0, 1] * 5),
    )  # fmt: skip


def _forwarded_rows(model: nn.Module, fn):
    """Rows the model's no-grad forwards saw while ``fn`` ran (an empty-batch replay counts 0)."""
    rows: list[int] = []
    handle = model.register_forward_pre_hook(
        lambda _m, args: rows.append(len(args[0])) if not torch.is_grad_enabled() else None
    )
    try:
        return fn(), sum(rows)
    finally:
        handle.remove()


def test_later_versions_sharing_the_prefix_run_only_the_layers_after_it() -> None:
    import copy

    import medaudit.models.evaluate as ev

    torch.manual_seed(0)
    base, cfg = create_model("resnet18", img_size=32)
    base.eval()
    rng = np.random.default_rng(0)
    v = rng.normal(size=256)
    pclarc = PClarc().apply(
        base, cfg, CorrectionData(layer="identity_2", cav=v / np.linalg.norm(v), mu0=rng.random(256))
    )
    tuned = copy.deepcopy(base)  # a fine-tuned version: only the layers after ℓ differ
    with torch.no_grad():
        tuned.layer4[0].conv1.weight.mul_(1.5)
        tuned.fc.bias.add_(0.3)
    shifted = copy.deepcopy(base)  # a different prefix: must not replay
    with torch.no_grad():
        shifted.layer1[0].conv1.weight.mul_(0.5)

    data = _shared_prefix_data()
    first, rows = _forwarded_rows(base, lambda: ev.evaluate_version(base, cfg, data))
    assert rows == 10 + 2 + 3  # recorded with the row reuse: ch, clean rows 1 and 4, attacked 0, 2, 3
    assert data.prefix.fingerprint == ev.prefix_fingerprint(base, cfg, "identity_2")
    assert set(data.prefix.maps) == {"ch", "clean", "attacked"}
    alone = ev.evaluate_version(base, cfg, _shared_prefix_data())
    for k in ev.VARIANTS:
        assert first.classification[k] == pytest.approx(alone.classification[k], nan_ok=True)
    for version, replayed in ((pclarc, True), (tuned, True), (shifted, False)):
        fresh = ev.evaluate_version(version, cfg, _shared_prefix_data())  # its own record, no replay
        rep, rows = _forwarded_rows(version, lambda version=version: ev.evaluate_version(version, cfg, data))
        # replayed: only the 2 probe rows run in full; otherwise every distinct row does
        assert rows == (2 if replayed else 15), (version is pclarc, version is tuned)
        for k in ev.VARIANTS:
            assert rep.classification[k] == pytest.approx(fresh.classification[k], rel=1e-6, nan_ok=True)
        assert rep.retrieval == pytest.approx(fresh.retrieval, nan_ok=True)
    # the replayed logits are the full forward's
    logits, _ = ev._Forwards(tuned, cfg, data)("attacked", data.sets["attacked"].images, False)
    assert torch.allclose(logits, predict_logits(tuned, cfg, data.sets["attacked"].images), atol=1e-5)


def predict_logits(model: nn.Module, cfg: ModelCfg, images: torch.Tensor) -> torch.Tensor:
    from medaudit.models.train import predict

    return predict(model, images, cfg)


def test_a_replay_that_disagrees_with_a_full_forward_falls_back(monkeypatch) -> None:
    import medaudit.models.evaluate as ev

    torch.manual_seed(0)
    model, cfg = create_model("resnet18", img_size=32)
    data = _shared_prefix_data()
    ev.evaluate_version(model, cfg, data)
    good = ev._Forwards(model, cfg, data)
    assert good.mode == "replay"
    with torch.no_grad():  # maps no longer match what the layers before ℓ compute
        for _, maps in data.prefix.maps.values():
            maps.mul_(2.0)
    assert ev._Forwards(model, cfg, data).mode == "plain"


def test_prefix_fingerprint_ignores_the_clarc_projection_and_sees_every_earlier_weight() -> None:
    import medaudit.models.evaluate as ev

    torch.manual_seed(0)
    model, cfg = create_model("resnet18", img_size=32)
    fp = ev.prefix_fingerprint(model, cfg, "identity_2")
    v = np.ones(256) / 16.0
    net = PClarc().apply(model, cfg, CorrectionData(layer="identity_2", cav=v, mu0=np.zeros(256)))
    assert ev.prefix_fingerprint(net, cfg, "identity_2") == fp
    with torch.no_grad():
        model.layer4[0].conv1.weight.add_(1.0)  # after ℓ: same prefix
    assert ev.prefix_fingerprint(model, cfg, "identity_2") == fp
    model.bn1.running_mean.add_(1e-3)  # a buffer before ℓ
    assert ev.prefix_fingerprint(model, cfg, "identity_2") != fp
