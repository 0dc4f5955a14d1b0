"""Can a linear CAV on this model's features find a band-aid style at all? (issue 23)

For a trained resnet18 checkpoint and a styled synthderm (``styles=split``), fits the band-aid's
svm CAV on the max-pooled activations of the CAV layer (method.md §1.1, §1.3) twice:

* **as the audit does**: on the training split, whose styles exclude the test-only ones;
* **oracle**: on the training split plus a random half of the test images, so every test-only
  style is *seen* by the CAV; detection is then read on the other half.

Both at the bank's presence threshold (bank-wide FPR over the three declared concepts, conformal on
clean validation images, :meth:`ConceptBank.threshold`). A style the oracle CAV still misses is one
this model's features at that layer do not separate from clean skin: no choice of training styles
for the CAV can reach it, only other features::

    python benchmarks/style_separability.py /tmp/house128/model.pt --size 128
"""

from __future__ import annotations

import argparse
from typing import cast

import numpy as np
import torch

from medaudit.models.corrections.base import pooled_activations
from medaudit.models.data.synthetic import SynthDerm, SynthDermConfig
from medaudit.models.registry import create_model
from medaudit.models.xai.concepts import ConceptBank

CONCEPTS = ("band_aid", "ruler", "skin_marker")


def pooled_acts(weights: str, ds: SynthDerm, layer: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Max-pooled activations at hook point ``layer`` of every image, their indices and splits."""
    model, cfg = create_model("resnet18", weights=weights)
    idx = np.concatenate([ds.indices(s) for s in ("train", "val", "test")])
    images = torch.from_numpy(np.stack([ds.sample(int(i)).image for i in idx])).permute(0, 3, 1, 2)
    return pooled_activations(model, cfg, layer, images, batch_size=100), idx, ds.split_of[idx]


def detection(
    acts: np.ndarray, fit: np.ndarray, val_clean: np.ndarray, mem: dict[str, np.ndarray]
) -> np.ndarray:
    """Band-aid presence of every image by a bank of the three concepts fitted on the ``fit`` rows."""
    labels = {a: np.where(fit, mem[a], -1).astype(np.int64) for a in CONCEPTS}
    bank = ConceptBank.fit("m", "l", acts, labels, acts[val_clean])
    return cast(np.ndarray, acts @ bank["band_aid"].v > bank.threshold("band_aid"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--layer", default="identity_1")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(2)
    ds = SynthDerm(SynthDermConfig(size=a.size, styles="split"))
    acts, idx, split = pooled_acts(a.weights, ds, a.layer)
    mem = {c: np.array([c in ds.artifacts_of(int(i)) for i in idx]) for c in CONCEPTS}
    style = np.array([ds.artifact_styles("all")["band_aid"].get(int(i), "") for i in idx])
    clean = ~np.any(list(mem.values()), axis=0)
    train, test = split == "train", split == "test"
    half = test & (np.random.default_rng(a.seed).random(len(idx)) < 0.5)
    audit_present = detection(acts, train, (split == "val") & clean, mem)
    oracle_present = detection(acts, train | half, (split == "val") & clean, mem)
    print(f"band-aid detection at the bank's FPR, layer {a.layer}, {a.size} px")
    print("(audit: CAV fitted on the training split; oracle: on it and half the test images)")
    print(f"{'style':28s} {'seen':>5s} {'n':>4s} {'audit':>7s} {'n':>4s} {'oracle':>7s}")
    for sty in sorted(set(style[test & mem["band_aid"]])):
        sel, ev = test & mem["band_aid"] & (style == sty), test & ~half & mem["band_aid"] & (style == sty)
        seen = bool((train & (style == sty)).any())
        print(
            f"{sty:28s} {str(seen):>5s} {sel.sum():4d} {100 * audit_present[sel].mean():6.1f}% "
            f"{ev.sum():4d} {100 * oracle_present[ev].mean():6.1f}%"
        )


if __name__ == "__main__":
    main()
