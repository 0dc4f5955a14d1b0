"""ONNX export: P-ClArC's projection is in the graph, parity with torch, explicit providers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from medaudit.models.corrections import CorrectionData, PClarc, ReactivePClarc
from medaudit.models.errors import ExportError
from medaudit.models.export import check_parity, export_onnx, ort_session, providers
from medaudit.models.registry import create_model


@pytest.fixture(scope="module")
def corrected():
    torch.manual_seed(0)
    model, cfg = create_model("resnet18", img_size=32)
    for m in model.modules():  # non-trivial BN so the residual branches matter
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    rng = np.random.default_rng(0)
    v = rng.normal(size=256)
    data = CorrectionData(
        layer="identity_2", cav=v / np.linalg.norm(v), mu0=rng.random(256), cav_svm=rng.normal(size=256) / 16
    )
    return model, cfg, data


def test_pclarc_resnet18_exports_with_projection_and_matches_torch(corrected, tmp_path) -> None:
    model, cfg, data = corrected
    net = PClarc().apply(model, cfg, data)
    path = export_onnx(net, cfg, tmp_path / "pclarc.onnx")
    graph = onnx.load(str(path)).graph
    assert "ReduceMax" in {n.op_type for n in graph.node}  # the projection's max-pooling is in the graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    images = torch.randint(
        0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    parity = check_parity(net, cfg, path, images)
    assert parity.ok and parity.max_abs_diff <= 1e-4 and parity.n_images == 64
    # and the exported graph is the corrected model, not the original
    sess = ort_session(path)
    x = ((images[:8].float() / 255 - 0.5) / 0.5).numpy()
    got = sess.run(["logits"], {"input": x})[0]
    with torch.no_grad():
        assert not np.allclose(got, model(torch.from_numpy(x)).numpy(), atol=1e-3)


def test_reactive_exports(corrected, tmp_path) -> None:
    model, cfg, data = corrected
    net = ReactivePClarc().apply(model, cfg, data)
    path = export_onnx(net, cfg, tmp_path / "rp.onnx")
    images = torch.randint(
        0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)
    )
    assert check_parity(net, cfg, path, images).ok


def test_a_torchvision_vit_exports_and_matches_torch(tmp_path) -> None:
    """torchvision's ViTs attend through nn.MultiheadAttention, whose eval-mode fused kernel has no
    ONNX symbolic: the export takes the plain path (the same function, checked by parity) and
    leaves torch's fast-path switch as it found it."""
    from torchvision.models.vision_transformer import VisionTransformer

    from medaudit.models.registry import ModelCfg, expose_class_token

    torch.manual_seed(0)
    model = expose_class_token(
        VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)
    ).eval()
    torch.nn.init.normal_(model.heads.head.weight, 0, 0.3)
    cfg = ModelCfg(arch="tv-vit", source="entrypoint", input_size=(3, 32, 32), labels=tuple("abcdefghij"))
    before = torch.backends.mha.get_fastpath_enabled()
    path = export_onnx(model, cfg, tmp_path / "vit.onnx")
    assert torch.backends.mha.get_fastpath_enabled() == before
    images = torch.randint(
        0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3)
    )
    parity = check_parity(model, cfg, path, images)
    assert parity.ok and parity.max_abs_diff <= 1e-4


def test_parity_failure_raises(corrected, tmp_path) -> None:
    model, cfg, _ = corrected
    path = export_onnx(model, cfg, tmp_path / "m.onnx")
    with torch.no_grad():
        model.fc.bias.add_(1.0)  # torch now differs from the exported graph
    try:
        images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
        with pytest.raises(ExportError, match="parity"):
            check_parity(model, cfg, path, images)
        assert not check_parity(model, cfg, path, images, strict=False).ok
    finally:
        with torch.no_grad():
            model.fc.bias.sub_(1.0)


def test_providers_are_explicit_and_cpu_last() -> None:
    chosen = providers()
    assert chosen[-1] == "CPUExecutionProvider"
    if not torch.cuda.is_available():
        assert chosen == ["CPUExecutionProvider"]


def test_bad_onnx_file_raises(tmp_path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(ExportError, match="cannot load"):
        ort_session(bad)
