"""What the served processes need set before torch and BentoML load: imported first by
:mod:`medaudit.service.api`, and only there (every ``bentoml serve`` process imports that module).

* ``OMP_WAIT_POLICY=PASSIVE``: torch's OpenMP threads sleep between parallel regions instead of
  spinning. The three served processes share the cores, and spinning LRP threads in the auditor
  took the CPU the entry service needs to decode and answer: served /audit throughput +13-16 % on
  2 CPUs (benchmarks/serve.py, 2 interleaved rounds each). Must be set before torch is imported.
* ``BENTOML_DO_NOT_TRACK``: no usage telemetry from a hospital's network.
* BentoML 1.4.40's import-time ``GitWildMatchPattern`` deprecation warning is silenced (its
  pathspec use, not ours; see :mod:`medaudit.service.store`).
* :func:`medaudit.service.bentoml_patches.apply`: BentoML's per-request costs fixed.

An operator's own value of either variable wins.
"""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=DeprecationWarning, message=r"GitWildMatchPattern")
    import _bentoml_sdk  # noqa: F401  (what bentoml.service loads lazily, warning included)
    import bentoml  # noqa: F401

from medaudit.service import bentoml_patches  # noqa: E402  (after the environment above)

PATCHES = bentoml_patches.apply()
