"""The model registry, parametrised over itself: a newly registered model is tested by this file."""

from __future__ import annotations

import pytest
import torch

from medaudit.models.errors import UnknownModelError, WeightsError
from medaudit.models.registry import ModelCfg, create_model, get_cfg, hook_module, list_models

#: Architectures without ReLUs, whose stage outputs are linear bottlenecks.
NO_RELU = {"efficientnet_b0"}


def _size(cfg: ModelCfg) -> int:
    return cfg.input_size[-1] if cfg.fixed_size else 64


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_and_hook_points(name: str) -> None:
    torch.manual_seed(0)
    model, cfg = create_model(name)
    assert cfg.hook_points and cfg.default_cav_layer in cfg.hook_points
    S = _size(cfg)
    x = torch.randn(2, 3, S, S, requires_grad=True)
    seen: dict[str, torch.Tensor] = {}
    handles = [
        hook_module(model, cfg, h).register_forward_hook(lambda m, i, o, h=h: seen.__setitem__(h, o))
        for h in cfg.hook_points
    ]
    try:
        out = model(x)
    finally:
        for hd in handles:
            hd.remove()
    assert out.shape == (2, cfg.num_classes)
    assert set(seen) == set(cfg.hook_points)
    for h, a in seen.items():
        assert a.shape[0] == 2, h
        if a.dim() == 4 and name not in NO_RELU:  # CNN layers are post-ReLU (method.md §11.3)
            assert (a >= 0).all(), f"{name}:{h} is not post-ReLU"
    out[:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_arch_tag_names_and_labels() -> None:
    model, cfg = create_model("resnet18.pclarc-band_aid", labels=("a", "b", "c"))
    assert cfg.arch == "resnet18" and cfg.labels == ("a", "b", "c")
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    _, cfg5 = create_model("resnet18", num_classes=5)
    assert cfg5.labels == tuple(f"class_{k}" for k in range(5))


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(UnknownModelError, match="unknown architecture 'resnet19'.*Did you mean 'resnet18'"):
        get_cfg("resnet19")


def test_unknown_hook_point_lists_valid_ones() -> None:
    model, cfg = create_model("resnet18")
    with pytest.raises(UnknownModelError, match="no hook point 'layer9'.*identity_0"):
        hook_module(model, cfg, "layer9")


def test_local_weights_round_trip_and_errors(tmp_path) -> None:
    torch.manual_seed(1)
    model, cfg = create_model("resnet18", img_size=96)
    path = tmp_path / "m.pt"
    torch.save({"state_dict": model.state_dict(), "cfg": cfg.to_dict()}, path)
    loaded, lcfg = create_model("resnet18", weights=path)
    assert lcfg == cfg
    x = torch.randn(2, 3, 96, 96)
    assert torch.equal(model(x), loaded(x))

    with pytest.raises(WeightsError, match="weights file not found: .*nope.pt.*never downloads"):
        create_model("resnet18", weights=tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read checkpoint"):
        create_model("resnet18", weights=bad)
    with pytest.raises(WeightsError, match="is for architecture 'resnet18', not 'resnet50d'"):
        create_model("resnet50d", weights=path)
    other = tmp_path / "other.pt"
    torch.save(create_model("resnet18", num_classes=3)[0].state_dict(), other)
    with pytest.raises(WeightsError, match="does not fit resnet18"):
        create_model("resnet18", weights=other)
