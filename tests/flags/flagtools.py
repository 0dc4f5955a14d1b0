"""Helpers of the flag pipeline tests: audit results built from the service's own dataclasses."""

from __future__ import annotations

import base64
import io
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from medaudit.service.audit import AuditResult, ConceptScore, Prediction


def png_b64(value: int, size: int = 8) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), value % 256, np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def score(
    concept: str = "band_aid",
    *,
    present: bool = True,
    share: float = 0.4,
    percentile: float = 97.0,
    score: float = 2.0,
    threshold: float = 1.0,
    mask: bool = True,
) -> ConceptScore:
    return ConceptScore(
        concept=concept,
        score=score,
        percentile=percentile,
        present=present,
        threshold=threshold,
        relevance_share=share,
        mask_png=png_b64(7) if (mask and present) else None,
    )


def result(
    *concepts: ConceptScore,
    label: str = "benign",
    features: np.ndarray | None = None,
    seed: int = 0,
    dim: int = 16,
) -> AuditResult:
    """An audit result whose first concept flags under the default policy (unless given others)."""
    cs = concepts or (score("band_aid"), score("ruler", present=False, share=0.0))
    feats = (
        features if features is not None else np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    )
    probs = {"benign": 0.8, "malignant": 0.2} if label == "benign" else {"benign": 0.3, "malignant": 0.7}
    return AuditResult(
        prediction=Prediction(
            version="vanilla", label=label, class_index=int(label != "benign"), probabilities=probs
        ),
        heatmap_png=png_b64(seed),
        concepts=tuple(cs),
        layer="identity_2",
        features=feats,
    )


def stream_request_ids(client: Any, stream: str) -> list[str]:
    """Request ids of every entry of ``stream``, in stream order."""
    return [f[b"request_id"].decode() for _, f in client.xrange(stream)]


class RedisServer:
    """A ``redis-server`` of our own that a test may pause, kill and restart on the same port.

    Appendonly with fsync on every write, so a SIGKILL loses nothing Redis acknowledged: the
    test checks the *publisher's* guarantees, not a volatile server's.
    """

    def __init__(self, directory: Path, port: int) -> None:
        self.dir, self.port = directory, port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(self.dir), "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        from medaudit.service.flags.redis_conn import answers

        deadline = time.monotonic() + 10
        while not answers(self.url, timeout=0.2):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused server cannot die
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None
