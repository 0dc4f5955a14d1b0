"""Training: a smoke run on tiny data, resumption, class weights, augmentation, the card."""

from __future__ import annotations

import copy
import json

import numpy as np
import torch
from torch import nn

from medaudit.models.data.synthetic import SynthDermConfig
from medaudit.models.registry import create_model
from medaudit.models.train import TrainConfig, augment, class_weights, train

TINY = TrainConfig(
    arch="resnet18",
    epochs=2,
    batch_size=8,
    data=SynthDermConfig(n_train=24, n_val=4, n_test=12, size=32, seed=5),
)


def test_class_weights_follow_the_paper() -> None:
    w = class_weights(np.array([0, 0, 0, 1, 2, 2]), 4)
    assert torch.allclose(w, torch.tensor([1.0, 3.0, 1.5, 0.0]))


def test_augment_keeps_range_shape_and_is_seeded() -> None:
    x = torch.rand(6, 3, 16, 16)
    a = augment(x.clone(), torch.Generator().manual_seed(0))
    b = augment(x.clone(), torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, x)


def test_normalize_uses_half_mean_std() -> None:
    _, cfg = create_model("resnet18")
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    assert torch.equal(cfg.normalize(x), torch.tensor([-1.0, 1.0]).view(1, 1, 1, 2).expand(1, 3, 1, 2))


def test_smoke_train_writes_checkpoint_and_card_and_resumes(tmp_path) -> None:
    logs: list[str] = []
    card = train(TINY, tmp_path / "run", cache_dir=tmp_path / "cache", log=logs.append)
    ckpt = tmp_path / "run" / "model.pt"
    assert ckpt.exists() and (tmp_path / "run" / "train_state.pt").exists()
    on_disk = json.loads((tmp_path / "run" / "card.json").read_text())
    assert on_disk == card
    for variant in ("ch", "clean", "attacked"):
        assert 0.0 <= card["test"][variant]["accuracy"] <= 1.0
    assert len(card["history"]) == 2 and all(np.isfinite(h["loss"]) for h in card["history"])
    assert len(card["weights_sha256"]) == 64

    # the checkpoint loads through the registry with its config
    model, cfg = create_model("resnet18", weights=ckpt)
    assert cfg.input_size == (3, 32, 32)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 2)

    # re-running the finished config does no work and returns the same card
    again = train(TINY, tmp_path / "run", cache_dir=tmp_path / "cache", log=logs.append)
    assert again == card and any("resuming" in m for m in logs)


class _Interrupt(Exception):
    pass


def _stop_in_epoch(n: int):
    """A progress callback that raises inside epoch ``n`` (1-based), like a kill mid-training."""

    def start(desc: str, total: int):
        def advance(k: int = 1) -> None:
            if desc.startswith(f"epoch {n}/"):
                raise _Interrupt(desc)

        return advance

    return start


def test_interrupted_training_resumes_to_identical_weights(tmp_path) -> None:
    quiet = {"cache_dir": tmp_path / "cache", "log": lambda _: None}
    train(TINY, tmp_path / "full", **quiet)
    try:
        train(TINY, tmp_path / "cut", progress=_stop_in_epoch(2), **quiet)
        raise AssertionError("the interrupt did not fire")
    except _Interrupt:
        pass
    assert torch.load(tmp_path / "cut" / "model.pt", weights_only=True)["epoch"] == 1
    logs: list[str] = []
    train(TINY, tmp_path / "cut", cache_dir=tmp_path / "cache", log=logs.append)
    assert any("resuming" in m and "epoch 1/2" in m for m in logs)
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_evaluate_base_forwards_test_rows_shared_between_variants_once(tmp_path) -> None:
    from medaudit.models.data.synthetic import SynthDerm
    from medaudit.models.train import accuracy_report, evaluate_base, predict, render_split

    torch.manual_seed(0)
    model, cfg = create_model("resnet18", img_size=32)
    ds = SynthDerm(TINY.data)
    sets = {v: render_split(ds, "test", v, cache_dir=tmp_path) for v in ("ch", "clean", "attacked")}
    ref = {v: accuracy_report(predict(model, X, cfg), y, cfg.labels) for v, (X, y) in sets.items()}
    ch = sets["ch"][0].flatten(1)
    shared = [int((sets[v][0].flatten(1) == ch).all(1).sum()) for v in ("clean", "attacked")]
    assert min(shared) > 0
    rows: list[int] = []
    handle = model.register_forward_pre_hook(lambda _m, args: rows.append(len(args[0])))
    try:
        card = evaluate_base(model, cfg, ds, tmp_path)
    finally:
        handle.remove()
    n = len(ch)
    assert sum(rows) == 3 * n - sum(shared)
    for v in sets:
        assert card["test"][v] == ref[v] or all(
            np.isclose(card["test"][v][k], ref[v][k], equal_nan=True) for k in ref[v]
        )


def test_render_splits_renders_missing_variants_in_one_pass_into_render_splits_cache(tmp_path) -> None:
    from medaudit.models.data.synthetic import SynthDerm
    from medaudit.models.train import render_split, render_splits

    ds = SynthDerm(TINY.data)
    ref = {v: render_split(ds, "test", v, cache_dir=tmp_path / "ref") for v in ("ch", "clean", "attacked")}
    render_split(ds, "test", "clean", cache_dir=tmp_path / "new")  # one variant already cached
    bars: list[str] = []

    def progress(desc: str, total: int):
        bars.append(desc)
        return lambda _n: None

    got = render_splits(
        ds, "test", ("ch", "clean", "attacked"), cache_dir=tmp_path / "new", progress=progress
    )
    assert bars == ["render test/ch+attacked"] and list(got) == ["ch", "clean", "attacked"]
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == sorted(
        p.name for p in (tmp_path / "ref").iterdir()
    )
    for v, (X, y) in ref.items():
        assert torch.equal(got[v][0], X) and torch.equal(got[v][1], y)
        with (
            np.load(next((tmp_path / "new").glob(f"*-{v}-*.npz"))) as a,
            np.load(next((tmp_path / "ref").glob(f"*-{v}-*.npz"))) as b,
        ):
            assert np.array_equal(a["X"], b["X"]) and np.array_equal(a["y"], b["y"])
    assert render_splits(ds, "test", ("attacked",), cache_dir=tmp_path / "new", progress=progress)
    assert len(bars) == 1  # all cached now: nothing rendered


def test_foreach_adamw_is_bit_identical_to_the_single_tensor_loop() -> None:
    """Training uses ``foreach=True`` for speed; the trained weights must not change with it."""
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))]
    nets[0](torch.zeros(1, 3, 8, 8))
    nets.append(copy.deepcopy(nets[0]))
    opts = [
        torch.optim.AdamW(n.parameters(), lr=1e-2, weight_decay=1e-4, foreach=f)
        for n, f in zip(nets, (False, True), strict=True)
    ]
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 2, (4,), generator=g)
        for n, o in zip(nets, opts, strict=True):
            o.zero_grad()
            nn.functional.cross_entropy(n(x), y).backward()
            o.step()
    for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values(), strict=True):
        assert torch.equal(a, b)
