"""Benchmark: the served app under load: /predict (ONNX Runtime vs eager torch), screens, /audit.

Starts real ``bentoml serve medaudit.service.api:MedAudit`` processes on a built store (``make demo`` builds
one under ``artifacts/bentoml``) and drives them with concurrent HTTP clients, every contender in
the same run:

* ``predict_onnx``: ``/predict`` as served (ONNX Runtime, adaptively batched);
* ``predict_torch``: the same server started with ``MEDAUDIT_PREDICT_BACKEND=torch`` (eager);
* ``audit``: ``/audit`` (LRP heatmap + concept scores + masks + flag), continuously batched in
  the auditor's own queue over its LRP processes (:mod:`medaudit.service.audit_pool`);
* ``screen``: ``/predict?detail=scores`` on a server started with ``MEDAUDIT_SCREEN_HEATMAPS=off``:
  prediction, concept scores, relevance shares and flag for every request, no heatmap
  (:mod:`medaudit.service.screening`), in the same auditor queue;
* ``screen_flagged``: the same on the default server, where a screen that flags also gets the
  full audit (heatmap and masks) in the same request: the throughput of the demo's mixed traffic
  (half the images carry the band-aid), with its flag rate.
* ``audit_dicom_json`` and ``audit_dicom``: ``/audit`` of the same images as DICOM files (RGB
  secondary captures), answered in JSON, and in DICOM (``Accept: multipart/related;
  type="application/dicom"``: SEG, Parametric Map and SR written, stored for WADO-RS and returned;
  :mod:`medaudit.service.dicomweb`): what DICOM out costs.

Every contender runs at each concurrency of ``--users`` (closed loop: each user sends its next
request when the last is answered), because the comparison depends on it: ONNX Runtime's cost per
image hardly changes with the batch size, eager torch's falls as batches grow, and the adaptive
batches grow with the number of requests in flight. Phases are interleaved round-robin over
``--rounds`` so background load on the shared machine hits each alike; the table reports the
median over rounds of throughput and of p50/p99 latency, and the batch sizes the server's own
histograms saw (``bentoml_service_adaptive_batch_size`` for /predict, ``medaudit_batch_images``
of the auditor for /audit). The load generator shares the
machine's cores with the server: on 2 cores every figure is a lower bound for a dedicated host,
and ratios (same run, same generator) are what to compare.

    python benchmarks/serve.py                          # artifacts/bentoml, 4, 8 and 16 users, 3×15 s
    python benchmarks/serve.py --users 16 32 --seconds 20 --rounds 5
    python benchmarks/serve.py --users 16 --contenders predict_onnx screen screen_flagged audit

Writes ``benchmarks/results/serve_cpu.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_name  # noqa: E402
from medaudit.cli.load import ADAPTIVE, BATCH_IMAGES, batch_histogram  # noqa: E402
from medaudit.service.config import audit_workers  # noqa: E402
from medaudit.service.process import Server, serving  # noqa: E402


@dataclass
class Phase:
    """One contender over one round."""

    name: str
    users: int
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    batch_mean: float | None
    batch_hist: dict[str, float] = field(default_factory=dict)
    #: CPU milliseconds per answered request, by process role (entry ``medaudit``, the
    #: ``medaudit-predictor``/``medaudit-auditor`` workers, ``load generator``).
    cpu_ms: dict[str, float] = field(default_factory=dict)
    #: CPU seconds each of the auditor's LRP processes spent in the phase, busiest first: whether
    #: the queue kept every process working (several BentoML workers sharing one socket leave all
    #: but one idle: BentoML issue #5426).
    lrp_cpu_s: list[float] = field(default_factory=list)
    #: Screens only: answers the flag policy flagged, and answers that carry a heatmap.
    flagged: int = 0
    heatmaps: int = 0

    @property
    def lrp_balance(self) -> float | None:
        """Least busy LRP process's CPU over the busiest's (1.0: even), when there are several."""
        if len(self.lrp_cpu_s) < 2 or self.lrp_cpu_s[0] <= 0:
            return None
        return self.lrp_cpu_s[-1] / self.lrp_cpu_s[0]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--home", type=Path, default=ROOT / "artifacts" / "bentoml", help="BENTOML_HOME with the store"
    )
    p.add_argument("--version", default="vanilla", help="the served version under test")
    p.add_argument(
        "--users",
        type=int,
        nargs="+",
        default=[4, 8, 16],
        help="concurrent clients, one sweep point each (batching needs concurrency)",
    )
    p.add_argument("--seconds", type=float, default=15.0, help="measured seconds per phase per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--images", type=int, default=32, help="distinct synthderm test images (PNG) sent")
    p.add_argument(
        "--contenders",
        nargs="+",
        default=list(CONTENDERS),
        choices=list(CONTENDERS),
        help="which contenders to run (default all)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_cpu")
    return p.parse_args()


def test_images(n: int) -> list[bytes]:
    """PNG bytes of synthderm test images, half of them attacked with the band-aid."""
    from medaudit.testing.versions import synthderm_images

    out = []
    for image in synthderm_images(n):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


#: contender -> (endpoint, server: its MEDAUDIT_PREDICT_BACKEND and whether flagged screens get
#: their heatmap).
CONTENDERS: dict[str, tuple[str, str]] = {
    "predict_onnx": ("/predict", "onnx"),
    "audit": ("/audit", "onnx"),
    "screen_flagged": ("/predict?detail=scores", "onnx"),
    "screen": ("/predict?detail=scores", "screen-only"),
    "predict_torch": ("/predict", "torch"),
    "audit_dicom_json": ("/audit", "onnx"),
    "audit_dicom": ("/audit", "onnx"),
}
#: Contenders that send DICOM files, and the headers they add.
DICOM_HEADERS: dict[str, dict[str, str]] = {
    "audit_dicom_json": {"Content-Type": "application/dicom"},
    "audit_dicom": {
        "Content-Type": "application/dicom",
        "Accept": 'multipart/related; type="application/dicom"',
    },
}


def dicom_images(images: list[bytes]) -> list[bytes]:
    """The test images as DICOM files (RGB secondary captures of one made-up patient)."""
    from medaudit.testing.dicom import source

    out = []
    for i, png in enumerate(images):
        rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        out.append(source("rgb", *rgb.shape[:2], seed=i, pixels=rgb))
    return out


@contextmanager
def served_version(home: Path, version: str, server: str, log_path: Path) -> Iterator[Server]:
    """A ``bentoml serve`` process serving ``version``: ``onnx`` or ``torch`` (the predict path),
    or ``screen-only`` (ONNX, and no heatmap for flagged screens)."""
    env = {
        "BENTOML_HOME": str(home),
        "MEDAUDIT_VERSIONS": version,
        "MEDAUDIT_AUTH": "off",
        "MEDAUDIT_PREDICT_BACKEND": "torch" if server == "torch" else "onnx",
    }
    if server == "screen-only":
        env["MEDAUDIT_SCREEN_HEATMAPS"] = "off"
    with serving(env, log_path, ready_timeout=300) as served:
        yield served


async def drive(
    base: str,
    endpoint: str,
    images: list[bytes],
    users: int,
    seconds: float,
    extra_headers: dict[str, str] | None = None,
) -> tuple[list[float], int, dict[str, int]]:
    """``users`` clients posting images back to back for ``seconds``: latencies (s), errors and,
    for screens (``detail=scores``), how many answers were flagged and carried a heatmap.

    aiohttp, not httpx: the generator shares the server's cores, and aiohttp takes a third of the
    CPU per request that httpx took (0.3-0.5 ms against 1.2-1.4 on 2 cores), CPU the server then
    has (the per-process table shows it).
    The body is read in full before a request counts as answered.
    """
    latencies: list[float] = []
    errors = 0
    screens = {"flagged": 0, "heatmaps": 0}
    screening = "detail=scores" in endpoint
    stop = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=users)
    timeout = aiohttp.ClientTimeout(total=120)
    headers = {"Content-Type": "image/png", **(extra_headers or {})}
    async with aiohttp.ClientSession(base, connector=connector, timeout=timeout) as client:

        async def user(u: int) -> None:
            nonlocal errors
            k = u
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                try:
                    async with client.post(endpoint, data=images[k % len(images)], headers=headers) as r:
                        body = await r.read()
                        ok = r.status == 200
                    if ok and screening:
                        answer = json.loads(body)
                        screens["flagged"] += bool(answer["flag"]["flagged"])
                        screens["heatmaps"] += answer["heatmap_png"] is not None
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1
                k += users

        await asyncio.gather(*(user(u) for u in range(users)))
    return latencies, errors, screens


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def run_phase(
    name: str,
    server: Server,
    endpoint: str,
    batches: str,
    images: list[bytes],
    users: int,
    args: argparse.Namespace,
    headers: dict[str, str] | None = None,
) -> Phase:
    """One contender at one concurrency; ``batches`` names the batch-size histogram to read
    (:func:`medaudit.cli.load.batch_histogram`)."""
    base = server.base
    asyncio.run(drive(base, endpoint, images, users, 3.0, headers))  # warm-up at this concurrency
    before = batch_histogram(base, batches)
    audits = endpoint in ("/audit", "/compare") or "detail=scores" in endpoint

    def lrp_cpu() -> dict[int, float]:
        return server.spawned_cpu_seconds("medaudit-auditor") if audits else {}

    cpu0, own0, lrp0 = server.cpu_seconds(), _own_cpu_s(), lrp_cpu()
    t0 = time.perf_counter()
    lat, errors, screens = asyncio.run(drive(base, endpoint, images, users, args.seconds, headers))
    wall = time.perf_counter() - t0
    cpu1, own1, lrp1 = server.cpu_seconds(), _own_cpu_s(), lrp_cpu()
    after = batch_histogram(base, batches)
    n = max(len(lat), 1)
    cpu_ms = {role: 1e3 * (t - cpu0.get(role, 0.0)) / n for role, t in cpu1.items()}
    cpu_ms["load generator"] = 1e3 * (own1 - own0) / n
    hist = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    count = hist.get("count", 0.0)
    lat_ms = np.asarray(lat) * 1e3 if lat else np.asarray([float("nan")])
    return Phase(
        name=name,
        users=users,
        requests=len(lat),
        errors=errors,
        seconds=wall,
        rps=len(lat) / wall,
        p50_ms=float(np.percentile(lat_ms, 50)),
        p99_ms=float(np.percentile(lat_ms, 99)),
        batch_mean=hist["sum"] / count if count else None,
        batch_hist={k: v for k, v in hist.items() if k.startswith("le=")},
        cpu_ms={k: v for k, v in cpu_ms.items() if v >= 0.05},
        lrp_cpu_s=sorted((lrp1[pid] - t for pid, t in lrp0.items() if pid in lrp1), reverse=True),
        flagged=screens["flagged"],
        heatmaps=screens["heatmaps"],
    )


def summarize(phases: list[Phase]) -> dict[int, dict[str, dict[str, Any]]]:
    """Medians over rounds: ``{users: {contender: figures}}``."""
    out: dict[int, dict[str, dict[str, Any]]] = {}
    for users, name in dict.fromkeys((p.users, p.name) for p in phases):
        ps = [p for p in phases if p.name == name and p.users == users]
        means = [p.batch_mean for p in ps if p.batch_mean is not None]
        balances = [b for p in ps if (b := p.lrp_balance) is not None]
        out.setdefault(users, {})[name] = {
            "rps_median": statistics.median(p.rps for p in ps),
            "p50_ms_median": statistics.median(p.p50_ms for p in ps),
            "p99_ms_median": statistics.median(p.p99_ms for p in ps),
            "requests": sum(p.requests for p in ps),
            "errors": sum(p.errors for p in ps),
            "batch_mean_median": statistics.median(means) if means else None,
            "lrp_balance_min": min(balances) if balances else None,
            "rounds": len(ps),
            "flag_rate": sum(p.flagged for p in ps) / max(1, sum(p.requests for p in ps)),
            "heatmap_rate": sum(p.heatmaps for p in ps) / max(1, sum(p.requests for p in ps)),
            "cpu_ms_median": {
                role: statistics.median(p.cpu_ms.get(role, 0.0) for p in ps)
                for role in dict.fromkeys(r for p in ps for r in p.cpu_ms)
            },
        }
    return out


def in_process(
    home: Path, version: str, images: list[bytes], batches: list[int], repeats: int
) -> dict[str, float]:
    """Images/s of the three model paths alone (no HTTP) at each batch size, medians over
    interleaved repeats: ``{"onnx_predict b8": ...}``. The models are loaded once.

    Separates what the model costs from what serving adds: if ONNX Runtime is not faster here,
    no server setting will make ``/predict`` faster than the torch path.
    """
    from medaudit.service.audit import AuditEngine, TorchPredictor
    from medaudit.service.inputs import decode_image
    from medaudit.service.store import load_version

    engine = AuditEngine.from_store(version, home=home)
    torch_pred = TorchPredictor(load_version(engine.tag, home=home))
    out: dict[str, float] = {}
    for batch in batches:
        rgb = engine.predictor.pixels([decode_image(b, "image/png") for b in images[:batch]])
        paths = {
            "onnx_predict": lambda rgb=rgb: engine.predictor.predict_pixels(rgb),
            "torch_predict": lambda rgb=rgb: torch_pred.predict_pixels(rgb),
            "audit": lambda rgb=rgb: engine.audit(list(rgb)),
            "screen": lambda rgb=rgb: engine.screen(list(rgb)),
        }
        for f in paths.values():
            f()  # warm-up
        runs: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(repeats):
            for name, f in paths.items():
                t0 = time.perf_counter()
                f()
                runs[name].append(time.perf_counter() - t0)
        out.update({f"{k} b{batch}": len(rgb) / statistics.median(v) for k, v in runs.items()})
    return out


GOALS = {
    "audit_over_predict_onnx": 0.25,
    "predict_onnx_over_torch": 1.3,
    "screen_over_predict_onnx": 0.6,
    "screen_flagged_over_audit": 1.0,
    "dicom_over_json_audit": 0.5,
}
#: ratio -> (numerator, denominator) contenders
RATIOS = {
    "audit_over_predict_onnx": ("audit", "predict_onnx"),
    "predict_onnx_over_torch": ("predict_onnx", "predict_torch"),
    "screen_over_predict_onnx": ("screen", "predict_onnx"),
    "screen_flagged_over_audit": ("screen_flagged", "audit"),
    "dicom_over_json_audit": ("audit_dicom", "audit_dicom_json"),
}


def ratios_of(summary: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The acceptance ratios (:data:`GOALS`) at one concurrency, of the contenders that ran."""
    return {
        k: summary[a]["rps_median"] / summary[b]["rps_median"]
        for k, (a, b) in RATIOS.items()
        if a in summary and b in summary
    }


def markdown(
    meta: dict[str, Any],
    summary: dict[int, dict[str, dict[str, Any]]],
    engine_ips: dict[str, float],
    args: argparse.Namespace,
) -> str:
    users = list(summary)
    lines = [
        f"# Served app under load ({meta['date']}, {meta['cpu_count']} CPUs, {meta['cpu']}, "
        f"{', '.join(map(str, users))} users, {args.rounds}×{args.seconds:.0f} s per contender and "
        f"concurrency, {meta['audit_workers']} LRP process(es))",
        "",
        "The acceptance ratios at each concurrency (closed loop: `users` requests always in flight):",
        "",
    ]
    names = {
        "audit_over_predict_onnx": "/audit ÷ /predict",
        "predict_onnx_over_torch": "ONNX Runtime ÷ eager torch /predict",
        "screen_over_predict_onnx": "screened /predict ÷ /predict",
        "screen_flagged_over_audit": "screened with flagged heatmaps ÷ /audit",
        "dicom_over_json_audit": "DICOM-out /audit ÷ JSON /audit (DICOM in)",
    }
    shown = [k for k in RATIOS if any(k in ratios_of(summary[u]) for u in users)]
    lines += [
        "| users | " + " | ".join(f"{names[k]} (goal ≥ {GOALS[k]:g})" for k in shown) + " |",
        "|---:|" + "---:|" * len(shown),
    ]
    for u in users:
        r = ratios_of(summary[u])
        cells = [
            "-" if k not in r else f"**{r[k]:.2f}**" + ("" if r[k] >= GOALS[k] else " (below)") for k in shown
        ]
        lines.append(f"| {u} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| users | contender | req/s (median) | p50 ms | p99 ms | mean batch | LRP balance "
        "| flagged | requests | errors |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for u in users:
        for name, st in summary[u].items():
            b = f"{st['batch_mean_median']:.1f}" if st["batch_mean_median"] else "-"
            bal = st.get("lrp_balance_min")
            flagged = f"{100 * st['flag_rate']:.0f} %" if name.startswith("screen") else "-"
            lines.append(
                f"| {u} | {name} | {st['rps_median']:.1f} | {st['p50_ms_median']:.0f} "
                f"| {st['p99_ms_median']:.0f} | {b} | {'-' if bal is None else f'{bal:.2f}'} "
                f"| {flagged} | {st['requests']} | {st['errors']} |"
            )
    lines += [
        "",
        "Mean batch: requests per batch of BentoML's dispatcher for /predict, images per LRP call "
        "of the auditor's queue for /audit and screens. LRP balance: the least busy LRP process's "
        "CPU over the busiest's, the worst round (1.00 even; 0 is one process doing everything). "
        "Flagged: the share of screens the flag policy flagged (screen_flagged: each of them also "
        "got the full audit in the same request). Images: synthderm test images, every other one "
        "with the band-aid.",
    ]
    roles = list(
        dict.fromkeys(r for per in summary.values() for st in per.values() for r in st["cpu_ms_median"])
    )
    lines += [
        "",
        "CPU milliseconds per answered request, by process (medians over rounds; on 2 cores a "
        "contender's req/s is at most 2000 / its total):",
        "",
        "| users | contender | " + " | ".join(roles) + " | total |",
        "|---:|---|" + "---:|" * (len(roles) + 1),
    ]
    for u in users:
        for name, st in summary[u].items():
            cpu = st["cpu_ms_median"]
            lines.append(
                f"| {u} | {name} | "
                + " | ".join(f"{cpu.get(r, 0.0):.1f}" for r in roles)
                + f" | {sum(cpu.values()):.1f} |"
            )
    lines += [
        "",
        "In-process, no HTTP, batch 1 / 4 / 8 (medians of 7 interleaved repeats; the model's cost per "
        "image at the batch sizes the server forms): "
        + "; ".join(f"{k} {v:.1f} img/s" for k, v in engine_ips.items())
        + ".",
        "",
        "The load generator runs on the same machine as the server; figures are lower bounds for a",
        "dedicated host, ratios are comparable. Reproduce: `python benchmarks/serve.py`.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    if not (args.home / "models").is_dir():
        sys.exit(f"no model store at {args.home}: run `make demo` (or `medaudit build`) first")
    images = test_images(args.images)
    dicoms = dicom_images(images) if DICOM_HEADERS.keys() & set(args.contenders) else []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    phases: list[Phase] = []
    log_dir = args.out.parent / "logs"
    log_dir.mkdir(exist_ok=True)
    # Two servers at once would fight over 2 cores: each server kind (onnx, screen-only, torch)
    # is started per round, one after the other, and runs its contenders at every concurrency.
    servers = dict.fromkeys(CONTENDERS[c][1] for c in CONTENDERS if c in args.contenders)
    for r in range(args.rounds):
        for kind in servers:
            with served_version(args.home, args.version, kind, log_dir / f"serve_{kind}.log") as server:
                for users in args.users:
                    for name in (c for c in CONTENDERS if c in args.contenders and CONTENDERS[c][1] == kind):
                        endpoint = CONTENDERS[name][0]
                        batches = (
                            f"{ADAPTIVE}|predict_batch"
                            if endpoint == "/predict"
                            else f"{BATCH_IMAGES}|auditor/{args.version}"
                        )
                        sent, headers = (
                            (dicoms, DICOM_HEADERS[name]) if name in DICOM_HEADERS else (images, None)
                        )
                        phases.append(run_phase(name, server, endpoint, batches, sent, users, args, headers))
                        print(f"round {r + 1}: {phases[-1]}", flush=True)
    engine_ips = in_process(args.home, args.version, images, batches=[1, 4, 8], repeats=7)
    print(f"in-process images/s: {engine_ips}", flush=True)
    summary = summarize(phases)
    meta = {
        "version": args.version,
        "users": args.users,
        "seconds_per_phase": args.seconds,
        "rounds": args.rounds,
        "cpu_count": os.cpu_count(),
        "cpu": cpu_name(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "audit_workers": audit_workers(os.environ),
        "env": {
            k: os.environ[k]
            for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")
            if k in os.environ
        },
    }
    args.out.with_suffix(".json").write_text(
        json.dumps(
            {
                "meta": meta,
                "summary": {str(u): per for u, per in summary.items()},
                "ratios": {str(u): ratios_of(per) for u, per in summary.items()},
                "in_process_images_per_s": engine_ips,
                "phases": [asdict(p) for p in phases],
            },
            indent=2,
        )
    )
    text = markdown(meta, summary, engine_ips, args)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
