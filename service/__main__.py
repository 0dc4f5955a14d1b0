"""``python -m medaudit.service``: serve the store with ``bentoml serve medaudit.service.api:MedAudit``.

Usage::

    BENTOML_HOME=artifacts/bentoml MEDAUDIT_AUTH=off \\
    MEDAUDIT_VERSIONS=vanilla,pclarc-band_aid MEDAUDIT_AB_WEIGHTS=vanilla=1 \\
    python -m medaudit.service --port 3000

Every other argument is passed to ``bentoml serve`` unchanged (``--host``, ``--port``,
``--development``, …). Settings come from the environment (:mod:`medaudit.service.config`), read once when
the service starts.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

SERVICE = "medaudit.service.api:MedAudit"


def main(argv: list[str]) -> None:
    exe = Path(sys.executable).parent / "bentoml"
    bentoml = str(exe) if exe.exists() else shutil.which("bentoml") or "bentoml"
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    os.execv(bentoml, [bentoml, "serve", SERVICE, *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
