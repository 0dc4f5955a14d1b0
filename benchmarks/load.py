"""Benchmark: the served app under a realistic locust mix (``make load``), and the soak (``make soak``).

Serves a store with ``bentoml serve`` (default ``artifacts/bentoml``, which ``make demo`` or
``medaudit demo --no-serve`` builds): the vanilla and a corrected version split A/B, the corrected
one also shadowing, flags off. Then runs ``cli/locustfile.py`` headless against it (predict-
heavy, audit, compare, PNG/JPEG 64–1024 px and DICOM, A/B subject keys) and writes a report: req/s,
p50/p95/p99 per endpoint and per payload, errors, the adaptive batch sizes the server formed and
the server's summed RSS (see :mod:`medaudit.cli.load`).

    python benchmarks/load.py                       # 16 users, 120 s -> benchmarks/results/load_cpu.md
    python benchmarks/load.py --soak                # 10 min, RSS growth after a 2 min warm-up ≤ 10%
    python benchmarks/load.py --home /tmp/tiny/bentoml --seconds 60 --name load_tiny
    python benchmarks/load.py --url http://host:3000 --seconds 60   # an already running service
    python benchmarks/load.py --screen 1 --name load_screen_cpu    # every /predict screened

Writes ``benchmarks/results/<name>.md`` and ``.json`` (``load_cpu``, or ``soak_cpu`` with
``--soak``); the server log and locust's own CSV/HTML reports go to ``benchmarks/results/logs/``.
Exits 1 when a request failed, or, in a soak, when RSS grew more than the limit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medaudit.cli.commands import SERVED_FILE  # noqa: E402
from medaudit.cli.load import LoadReport, run_load, write_report  # noqa: E402
from medaudit.service.process import serving  # noqa: E402

SOAK_SECONDS, SOAK_WARMUP, SOAK_LIMIT_PCT = 600.0, 120.0, 10.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--home", type=Path, default=ROOT / "artifacts" / "bentoml", help="BENTOML_HOME with the store"
    )
    p.add_argument("--url", help="load an already running service instead (no serving, no RSS)")
    p.add_argument(
        "--versions",
        help="MEDAUDIT_VERSIONS (default: what `medaudit demo` serves, from served.json beside --home: "
        "vanilla and the best corrected version by the correction criteria)",
    )
    p.add_argument("--ab-weights", help="MEDAUDIT_AB_WEIGHTS (default: 1:1 between the served versions)")
    p.add_argument(
        "--shadow", help="MEDAUDIT_SHADOW_VERSION ('' for none; default: the demo's, the best version)"
    )
    p.add_argument("--users", type=int, default=16, help="concurrent locust users (batching needs several)")
    p.add_argument("--spawn-rate", type=float, default=8.0, help="users started per second")
    p.add_argument("--seconds", type=float, help="run length (default 120; 600 with --soak)")
    p.add_argument("--wait", type=float, default=0.5, help="most think time between a user's requests, s")
    p.add_argument(
        "--screen",
        type=float,
        default=0.0,
        help="share of the /predict requests sent as screens (?detail=scores), 0 to 1",
    )
    p.add_argument("--soak", action="store_true", help="10 min, judge RSS growth after the warm-up")
    p.add_argument("--warmup", type=float, help="seconds before the RSS baseline (default 120 with --soak)")
    p.add_argument("--rss-limit", type=float, default=SOAK_LIMIT_PCT, help="soak: max RSS growth, %%")
    p.add_argument("--name", help="report name under benchmarks/results (default load_cpu / soak_cpu)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    args.seconds = args.seconds or (SOAK_SECONDS if args.soak else 120.0)
    args.warmup = args.warmup if args.warmup is not None else (SOAK_WARMUP if args.soak else 0.0)
    args.name = args.name or ("soak_cpu" if args.soak else "load_cpu")
    demo = _demo_served(args.home) if args.versions is None or args.shadow is None else {}
    args.versions = args.versions if args.versions is not None else demo["MEDAUDIT_VERSIONS"]
    names = [v for v in args.versions.split(",") if v]
    args.ab_weights = args.ab_weights or ",".join(f"{v}=1" for v in names)
    args.shadow = args.shadow if args.shadow is not None else demo.get("MEDAUDIT_SHADOW_VERSION", "")
    return args


def _demo_served(home: Path) -> dict[str, str]:
    """``served.json`` that ``medaudit demo`` writes beside its store (``<out>/bentoml``)."""
    path = home.resolve().parent / SERVED_FILE
    if not path.exists():
        sys.exit(f"{path} not found: build the demo store first (make demo), or name --versions and --shadow")
    served: dict[str, str] = json.loads(path.read_text())
    return served


def serve_env(args: argparse.Namespace) -> dict[str, str]:
    return {
        "BENTOML_HOME": str(args.home.resolve()),
        "MEDAUDIT_VERSIONS": args.versions,
        "MEDAUDIT_AB_WEIGHTS": args.ab_weights,
        "MEDAUDIT_SHADOW_VERSION": args.shadow,
        "MEDAUDIT_AUTH": "off",
        "MEDAUDIT_FLAGS": "off",
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs = args.out_dir / "logs" / args.name
    logs.mkdir(parents=True, exist_ok=True)
    title = ("Soak" if args.soak else "Load") + " test of the served app"
    workdir = str(logs.relative_to(ROOT)) if logs.is_relative_to(ROOT) else str(logs)
    command = " ".join(["python benchmarks/load.py", *(sys.argv[1:] if argv is None else argv)])

    def load(base: str, served_desc: str, server_pid: int | None) -> LoadReport:
        print(f"loading {base}: {args.users} users for {args.seconds:.0f} s ...", flush=True)
        return run_load(
            base,
            users=args.users,
            spawn_rate=args.spawn_rate,
            seconds=args.seconds,
            workdir=logs,
            server_pid=server_pid,
            rss_interval=5.0 if args.seconds > 180 else 2.0,
            warmup_s=args.warmup,
            rss_limit_pct=args.rss_limit if args.soak else None,
            env={"MEDAUDIT_LOAD_WAIT": str(args.wait), "MEDAUDIT_LOAD_SCREEN": str(args.screen)},
            meta={"served": served_desc, "workdir": workdir, "command": command},
        )

    if args.url:
        report = load(args.url.rstrip("/"), f"{args.url} (already running)", None)
    else:
        if not (args.home / "models").is_dir():
            sys.exit(
                f"no model store at {args.home}: run `make demo` (or `medaudit demo --no-serve --out "
                f"{args.home.parent}`) first, or pass --home / --url"
            )
        served_desc = (
            f"{args.versions} from `{args.home}`, A/B {args.ab_weights}, shadow {args.shadow or 'none'}, "
            "auth and flags off"
        )
        print(f"serving {served_desc} ...", flush=True)
        with serving(serve_env(args), logs / "serve.log", ready_timeout=300) as server:
            report = load(server.base, served_desc, server.proc.pid)
    md = write_report(report, args.out_dir / args.name, title)
    print(md)
    failed = report.total_failures > 0 or bool(report.exceptions)
    if report.rss_summary is not None and report.rss_summary.passed is False:
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
