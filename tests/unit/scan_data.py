"""What the scan tests share: the scan settings and the row comparison."""

from __future__ import annotations

import numpy as np

#: Presence at a 50 % FPR and a low share threshold, so that random weights still flag images
#: and the flag decision is compared on many rows, not on none.
POLICY = "share=0.01"
FPR = 0.5
FLOATS = ("confidence", "_score", "_percentile", "_share")


def assert_same_rows(got: list[dict], want: list[dict]) -> None:
    """Same items, once each, in order; same decisions exactly; same numbers to float rounding."""
    assert [r["index"] for r in got] == list(range(len(want)))
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for k, v in w.items():
            if v is not None and (k.endswith(FLOATS) or k == "probabilities"):
                np.testing.assert_allclose(g[k], v, rtol=1e-6, atol=1e-9, err_msg=f"{w['id']}: {k}")
            else:
                assert g[k] == v, f"{w['id']}: {k}"
