"""Search, filters and start-up at 1,000,000 contacts, on SQLite and PostgreSQL.

    .venv/bin/python benchmarks/bench_search.py [--quick] [--rows N] [--no-pg]

Loads N contacts for one user (plus a few thousand for another) with a bulk generator
(benchmarks/searchdata.py), then measures in the same run:
- `contacts list --search T --page-size 50` (first page with its count) in-process: p50/p95 over
  50 varied terms, selective (<= 100 matches) and broad (3-8% of rows), with the index and as a
  plain LIKE scan (SQLite: index switched off; PostgreSQL: index dropped inside a rolled-back
  transaction) for the ratio;
- date-range (`--created FROM..TO`) and `--tag` first pages with their counts;
- the count alone (the `page P of N` total) for the default list, a broad search and the largest tag;
- whole-process wall time of `omnicrm --help` and `omnicrm contacts list --search T` on the loaded
  database, next to `python -c "import typer"`.
PostgreSQL: OMNICRM_BENCH_PG_URL (or OMNICRM_TEST_PG_URL) names a server where a scratch database is
created and dropped; without either it tries postgresql://postgres@127.0.0.1:5432/postgres.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import searchdata  # noqa: E402
from pgscratch import scratch_database  # noqa: E402  (benchmarks/ is the script's folder)

from omnicrm.search_index import COUNT_CAP  # noqa: E402

BIN = Path(sys.executable).parent
TARGETS = {"selective_p95_ms": 50, "broad_p95_ms": 300, "filter_p95_ms": 100, "help_s": 0.25, "list_search_s": 0.9}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- databases ------------------------------------------------------------------------------------

def pg_server_url() -> str:
    url = os.environ.get("OMNICRM_BENCH_PG_URL") or os.environ.get("OMNICRM_TEST_PG_URL") \
        or "postgresql://postgres@127.0.0.1:5432/postgres"
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def prepare(url: str, home: Path, data) -> dict:
    """Schema via the real migrations, bulk load with the search index off, then the index built once."""
    from omnicrm import search_index
    from omnicrm.config import load_settings
    from omnicrm.db import ready_engine

    settings = load_settings({"OMNICRM_HOME": str(home), "OMNICRM_DATABASE_URL": url, "OMNICRM_USER": "bench"})
    engine = ready_engine(settings)
    with engine.begin() as conn:
        search_index.drop_index(conn)  # bulk load first, index after: the usual way to load a big table
    started = time.perf_counter()
    uid = searchdata.load(engine, data)
    loaded = time.perf_counter() - started
    started = time.perf_counter()
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql("SET LOCAL maintenance_work_mem = '512MB'")
        assert search_index.create_index(conn)
    indexed = time.perf_counter() - started
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")
    else:
        with engine.connect() as conn:
            conn.connection.dbapi_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    search_index.attach(engine)
    return {"settings": settings, "engine": engine, "uid": uid, "load_s": round(loaded, 1),
            "index_s": round(indexed, 1)}


# --- terms ----------------------------------------------------------------------------------------

def candidate_terms(data, rng: random.Random) -> tuple[list[str], list[str]]:
    rows = data[0][1]
    picks = [rows[rng.randrange(len(rows))] for _ in range(80)]
    selective = []
    for i, (contact, email, phone, _) in enumerate(picks):
        kind = i % 5
        if kind == 0:
            selective.append(contact[2])  # full name as typed, accents and capitals included
        elif kind == 1:
            selective.append(email[2].split("@")[0])  # an email's local part
        elif kind == 2 and phone:
            selective.append(phone[2][-8:])  # the end of a phone number as written ("555-0123")
        elif kind == 3 and contact[3] and contact[3] not in searchdata.BIG_COMPANIES:
            selective.append(contact[3].split()[0])  # a small company
        else:
            first, last = contact[2].split(" ", 1)
            selective.append(f"{first[:3]} {last[:5]}".strip())
    broad = [c.split()[0] for c in searchdata.BIG_COMPANIES] + \
            ["acme corp", "lobex", "nitech", "mbrella h", "ooli", "stark ind", "ayne ent", "berdyne",
             "proton.me", "icloud", "fastmail", "hey.com", "zoho", "gmx.n"]
    return selective, broad


def classify(bench: dict, selective: list[str], broad: list[str], total: int) -> tuple[list, list]:
    from omnicrm import contacts as svc
    from omnicrm.db import session_scope
    from omnicrm.filters import ContactFilter

    with session_scope(bench["settings"]) as session:
        def count(term):
            return len(svc.matching_ids(session, bench["uid"], ContactFilter(search=term)))
        sel = [(t, n) for t in dict.fromkeys(selective) if 1 <= (n := count(t)) <= 100][:30]
        wide = [(t, n) for t in dict.fromkeys(broad) if 0.03 * total <= (n := count(t)) <= 0.08 * total][:20]
    return sel, wide


# --- measurements ---------------------------------------------------------------------------------

def time_list(bench: dict, flt_kwargs: list[dict], before=None) -> list[float]:
    """Seconds for `list_contacts(..., page_size=50)` (count + first page + its eager loads) per filter."""
    from omnicrm import contacts as svc
    from omnicrm.db import session_scope
    from omnicrm.filters import ContactFilter

    times = []
    with session_scope(bench["settings"]) as session:
        if before:
            before(session)
        for kwargs in flt_kwargs:
            started = time.perf_counter()
            page = svc.list_contacts(session, bench["uid"], ContactFilter(**kwargs), page_size=50)
            times.append(time.perf_counter() - started)
            assert page.total >= len(page.items)
        session.rollback()
    return times


def time_counts(bench: dict, cases: dict[str, dict]) -> dict[str, float]:
    from sqlalchemy import func, select

    from omnicrm.db import session_scope
    from omnicrm.filters import ContactFilter, apply_filter
    from omnicrm.config import now
    from omnicrm.models import Contact

    out = {}
    with session_scope(bench["settings"]) as session:
        for label, kwargs in cases.items():
            ids = apply_filter(select(Contact.id), bench["uid"], ContactFilter(**kwargs), now())
            runs = []
            for _ in range(3):
                started = time.perf_counter()
                session.scalar(select(func.count()).select_from(ids.subquery()))
                runs.append(time.perf_counter() - started)
            out[label] = ms(statistics.median(runs))
    return out


def baseline(bench: dict, terms: list[str]) -> list[float]:
    """The same list calls as a plain LIKE scan: no index."""
    from omnicrm import search_index

    engine = bench["engine"]
    if engine.dialect.name == "sqlite":
        search_index.use_index(engine, False)
        try:
            return time_list(bench, [{"search": t} for t in terms])
        finally:
            search_index.use_index(engine, True)
    # PostgreSQL: DDL is transactional - drop the index, measure, roll back.
    return time_list(bench, [{"search": t} for t in terms],
                     before=lambda s: s.connection().exec_driver_sql(f"DROP INDEX {search_index.PG_INDEX}"))


CPU_TIMES: dict[str, list[float]] = {}


def installed_env(work: Path) -> dict:
    """The environment of an installed tool: bytecode cached (here under `work`, not in the checkout)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    return env


def wall(cmd: list[str], env: dict, runs: int, label: str | None = None) -> list[float]:
    """Wall seconds per run; the CPU seconds (user + sys) of each run go to CPU_TIMES[label]."""
    import resource

    times = []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if label:
            CPU_TIMES.setdefault(label, []).append(
                after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {result.stderr.strip()[:300]}")
    return times


def plans(bench: dict, broad_term: str) -> list[str]:
    from sqlalchemy import func, select

    from omnicrm.config import now
    from omnicrm.db import session_scope
    from omnicrm.filters import ContactFilter, apply_filter, order_by, search_term
    from omnicrm.models import Contact

    flt = ContactFilter(search=broad_term, many=True)  # the count passed the cap: the sort index drives
    with session_scope(bench["settings"]) as session:
        conn = session.connection()
        page = apply_filter(select(Contact.id), bench["uid"], flt, now()).order_by(*order_by("created", "desc")).limit(50)
        count = select(func.count()).select_from(apply_filter(select(Contact.id), bench["uid"], ContactFilter(
            search=broad_term), now()).limit(COUNT_CAP + 1).subquery())
        default = select(Contact.id).where(Contact.user_id == bench["uid"]).order_by(*order_by("created", "desc")).limit(50)
        out = []
        for label, stmt in (("search page", page), ("search count (capped)", count), ("default list", default)):
            sql = str(stmt.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
            if conn.dialect.name == "sqlite":
                rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}").all()
                text_ = "; ".join(r[-1] for r in rows)
            else:
                rows = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) {sql}").all()
                text_ = "; ".join(r[0].strip() for r in rows[:6])
            out.append(f"{label}: {text_}")
        session.rollback()
    del search_term
    return out


def run_engine(name: str, url: str, data, total: int, rng: random.Random, home: Path, quick: bool) -> dict:
    log(f"[{name}] loading {total:,} contacts …")
    bench = prepare(url, home, data)
    log(f"[{name}] loaded in {bench['load_s']} s, index built in {bench['index_s']} s")
    selective, broad = classify(bench, *candidate_terms(data, rng), total)
    terms = [t for t, _ in selective] + [t for t, _ in broad]
    time_list(bench, [{"search": t} for t in ("warm", "zzq", "acme")])  # warm caches and the statement cache
    sel_times = time_list(bench, [{"search": t} for t, _ in selective])
    broad_times = time_list(bench, [{"search": t} for t, _ in broad])
    log(f"[{name}] {len(terms)} terms: selective p95 {ms(pct(sel_times, .95))} ms, broad p95 {ms(pct(broad_times, .95))} ms")
    base_sel = baseline(bench, [t for t, _ in selective[:8]])
    base_broad = baseline(bench, [t for t, _ in broad[:8]])
    log(f"[{name}] scan baseline: selective p50 {ms(pct(base_sel, .5))} ms, broad p50 {ms(pct(base_broad, .5))} ms")

    days = (date(2026, 11, 1) - date(2019, 1, 1)).days
    ranges = []
    for _ in range(20):
        start = date(2019, 1, 1) + timedelta(days=rng.randrange(days - 100))
        ranges.append(f"{start.isoformat()}..{(start + timedelta(days=rng.choice((7, 30, 90)))).isoformat()}")
    time_list(bench, [{"created": "2020-02-02..2020-03-01"}, {"tags": ("nosuch",)}, {"tags": ("board",)}])  # warm-up
    range_times = time_list(bench, [{"created": r} for r in ranges])
    tag_times = time_list(bench, [{"tags": (t,)} for t, _ in searchdata.TAGS])
    default_times = time_list(bench, [{}] * 5)
    counts = time_counts(bench, {"all contacts": {}, f"search {broad[0][0]!r}": {"search": broad[0][0]},
                                 "tag customer (10%)": {"tags": ("customer",)},
                                 "created 90 days": {"created": ranges[0]}})
    log(f"[{name}] date ranges p95 {ms(pct(range_times, .95))} ms, tags p95 {ms(pct(tag_times, .95))} ms")
    log(f"[{name}] date ranges (ms): " + ", ".join(f"{r}={ms(t)}" for r, t in zip(ranges, range_times)))

    env = {**installed_env(home.parent), "OMNICRM_DATABASE_URL": url, "OMNICRM_HOME": str(home),
           "OMNICRM_USER": "bench"}
    exe = str(BIN / "omnicrm")
    wall([exe, "contacts", "list", "--search", "warm"], env, 1)  # bytecode cached, OS caches warm
    runs = 3 if quick else 5
    cli_terms = [selective[i % len(selective)][0] for i in range(runs // 2 + 1)] + \
        [broad[i % len(broad)][0] for i in range(runs - runs // 2 - 1)]
    list_wall = []
    for term in cli_terms:
        list_wall += wall([exe, "contacts", "list", "--search", term], env, 1, label=f"list-{name}")
    bench["engine"].dispose()
    return {
        "load_s": bench["load_s"], "index_s": bench["index_s"],
        "selective": {"terms": len(selective), "matches_max": max(n for _, n in selective),
                      "p50_ms": ms(pct(sel_times, .5)), "p95_ms": ms(pct(sel_times, .95)),
                      "scan_p50_ms": ms(pct(base_sel, .5)), "scan_p95_ms": ms(pct(base_sel, .95))},
        "broad": {"terms": len(broad), "matches_min": min(n for _, n in broad), "matches_max": max(n for _, n in broad),
                  "p50_ms": ms(pct(broad_times, .5)), "p95_ms": ms(pct(broad_times, .95)),
                  "scan_p50_ms": ms(pct(base_broad, .5)), "scan_p95_ms": ms(pct(base_broad, .95))},
        "created_range": {"ranges": len(ranges), "p50_ms": ms(pct(range_times, .5)), "p95_ms": ms(pct(range_times, .95))},
        "tag": {"tags": len(searchdata.TAGS), "p50_ms": ms(pct(tag_times, .5)), "p95_ms": ms(pct(tag_times, .95))},
        "default_list": {"p50_ms": ms(pct(default_times, .5)), "p95_ms": ms(pct(default_times, .95))},
        "count_ms": counts,
        "cli_list_search_s": {"runs": len(list_wall), "p50": round(pct(list_wall, .5), 3),
                              "max": round(max(list_wall), 3),
                              "cpu_p50": round(pct(CPU_TIMES[f"list-{name}"], .5), 3)},
        "load_average": round(os.getloadavg()[0], 2),
        "plans": plans(bench, broad[0][0]),
        "sample_terms": {"selective": [t for t, _ in selective[:6]], "broad": [t for t, _ in broad[:6]]},
    }


# --- report ---------------------------------------------------------------------------------------

def ok(value: float, target: float) -> str:
    return "✅" if value <= target else "❌"


def markdown(figures: dict, command: str) -> str:
    rows = figures["rows"]
    lines = [f"### Search, filters and start-up at {rows:,} contacts", "",
             f"`{command}` — one user with {rows:,} contacts (+{figures['other_rows']:,} of another user), "
             "first page of 50 **with its count**, in-process (`omnicrm.contacts.list_contacts`). "
             "Selective terms match 1–100 contacts, broad ones 3–8%. The scan is the same call with the "
             "index off (plain LIKE).", ""]
    engines = [e for e in ("sqlite", "postgresql") if e in figures]
    head = "| measure | target | " + " | ".join(engines) + " |"
    lines += [head, "|" + "---|" * (2 + len(engines))]

    def row(label, target, getter, unit="ms", target_value=None):
        cells = []
        for e in engines:
            value = getter(figures[e])
            mark = f" {ok(value, target_value)}" if target_value is not None else ""
            cells.append(f"{value} {unit}{mark}")
        lines.append(f"| {label} | {target} | " + " | ".join(cells) + " |")

    row("load (bulk generator) / index build", "–", lambda f: f"{f['load_s']} s / {f['index_s']}", "s")
    row("search, selective: p50", "–", lambda f: f["selective"]["p50_ms"])
    row("search, selective: p95", "≤ 50 ms", lambda f: f["selective"]["p95_ms"], target_value=TARGETS["selective_p95_ms"])
    row("search, broad: p50", "–", lambda f: f["broad"]["p50_ms"])
    row("search, broad: p95", "≤ 300 ms", lambda f: f["broad"]["p95_ms"], target_value=TARGETS["broad_p95_ms"])
    row("scan baseline, selective: p50", "–", lambda f: f["selective"]["scan_p50_ms"])
    row("scan baseline, broad: p50", "–", lambda f: f["broad"]["scan_p50_ms"])
    row("index speed-up (scan p50 / index p50), selective", "–",
        lambda f: round(f["selective"]["scan_p50_ms"] / max(f["selective"]["p50_ms"], 0.1), 1), "×")
    row("index speed-up, broad", "–", lambda f: round(f["broad"]["scan_p50_ms"] / max(f["broad"]["p50_ms"], 0.1), 1), "×")
    row("`--created FROM..TO` (20 ranges of 7–90 days): p95", "≤ 100 ms", lambda f: f["created_range"]["p95_ms"],
        target_value=TARGETS["filter_p95_ms"])
    row("`--tag T` (12 tags, 0.05–10%): p95", "≤ 100 ms", lambda f: f["tag"]["p95_ms"], target_value=TARGETS["filter_p95_ms"])
    row("default list (no filter): p50", "–", lambda f: f["default_list"]["p50_ms"])
    for label in next(iter(figures[e]["count_ms"] for e in engines)):
        row(f"uncapped count (what the {COUNT_CAP:,} cap avoids): {label}", "–",
            lambda f, label=label: f["count_ms"][label])
    row("`omnicrm contacts list --search T` wall time: p50", "≤ 0.9 s", lambda f: f["cli_list_search_s"]["p50"], "s",
        target_value=TARGETS["list_search_s"])
    row("`omnicrm contacts list --search T` wall time: max", "–", lambda f: f["cli_list_search_s"]["max"], "s")
    row("`omnicrm contacts list --search T` CPU time (user+sys): p50", "–",
        lambda f: f["cli_list_search_s"]["cpu_p50"], "s")
    row("1-min load average when measured", "–", lambda f: f["load_average"], "")
    lines += ["", "| start-up (whole process, median of 7 runs) | target | wall s | CPU s (user+sys) |",
              "|---|---|---|---|",
              f"| `omnicrm --help` | ≤ 0.25 s | {figures['help_s']} {ok(figures['help_s'], TARGETS['help_s'])} | "
              f"{figures['help_cpu_s']} |",
              f"| `python -c \"import typer\"` (same run) | – | {figures['import_typer_s']} | {figures['import_typer_cpu_s']} |",
              f"| `omnicrm --help` minus `import typer` | – | {round(figures['help_s'] - figures['import_typer_s'], 3)} | "
              f"{round(figures['help_cpu_s'] - figures['import_typer_cpu_s'], 3)} |",
              "", f"The machine's 1-min load average was {figures['load_average']} at the end of the run: other "
              "work shares the CPUs, so wall times can exceed CPU times by a wide margin.",
              "", "Query plans (broad term, as `list_contacts` runs them once the count passes the cap):", ""]
    for e in engines:
        for plan in figures[e]["plans"]:
            lines.append(f"- {e} — {plan}")
    lines += ["", "Sample terms: " + "; ".join(
        f"{e}: " + ", ".join(f"`{t}`" for t in figures[e]["sample_terms"]["selective"][:3]
                             + figures[e]["sample_terms"]["broad"][:3]) for e in engines[:1])]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50,000 contacts instead of 1,000,000")
    parser.add_argument("--rows", type=int, help="number of contacts (overrides --quick)")
    parser.add_argument("--no-pg", action="store_true", help="SQLite only")
    args = parser.parse_args()
    rows = args.rows or (50_000 if args.quick else 1_000_000)
    command = "python benchmarks/bench_search.py" + (" --quick" if args.quick else "") + \
        (f" --rows {args.rows}" if args.rows else "")
    rng = random.Random(42)
    started = time.perf_counter()
    log(f"generating {rows:,} contacts …")
    data = searchdata.generate(rows)
    # Millions of generated tuples stay alive for both engines: keep them out of the garbage collector, whose
    # full passes over them would otherwise land inside the timings (a 1.5 s pause in one query).
    gc.collect()
    gc.freeze()
    log(f"generated in {time.perf_counter() - started:.1f} s")
    figures: dict = {"rows": rows, "other_rows": len(data[1][1])}
    work = Path(tempfile.mkdtemp(prefix="omnicrm-bench-search-"))
    try:
        figures["sqlite"] = run_engine("sqlite", f"sqlite:///{work / 'bench.db'}", data, rows, random.Random(1),
                                       work / "home", args.quick)
        if not args.no_pg:
            server = pg_server_url()
            try:
                url, drop = scratch_database(server)
            except Exception as exc:  # noqa: BLE001 - no server: report SQLite alone
                log(f"PostgreSQL skipped: {str(exc).splitlines()[0]}")
            else:
                try:
                    figures["postgresql"] = run_engine("postgresql", url, data, rows, random.Random(1),
                                                       work / "home-pg", args.quick)
                finally:
                    drop()
        env = {**installed_env(work), "OMNICRM_HOME": str(work / "home")}
        wall([str(BIN / "omnicrm"), "--help"], env, 1)
        figures["help_s"] = round(statistics.median(wall([str(BIN / "omnicrm"), "--help"], env, 7, "help")), 3)
        figures["import_typer_s"] = round(statistics.median(
            wall([sys.executable, "-c", "import typer"], env, 7, "typer")), 3)
        figures["help_cpu_s"] = round(statistics.median(CPU_TIMES["help"]), 3)
        figures["import_typer_cpu_s"] = round(statistics.median(CPU_TIMES["typer"]), 3)
        figures["load_average"] = round(os.getloadavg()[0], 2)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    del rng
    figures["total_s"] = round(time.perf_counter() - started, 1)
    figures["python"] = platform.python_version()
    md = markdown(figures, command)
    print(md)
    out = HERE / "results" / "search.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"title": "Search, filters and start-up", "command": command, "figures": figures,
                               "markdown": md}, indent=2, default=str))
    log(f"wrote {out} ({figures['total_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
