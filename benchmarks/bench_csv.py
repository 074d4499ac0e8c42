"""CSV benchmark: import and export of N synthetic contacts (default 1,000,000; --quick 20,000) on SQLite and
PostgreSQL, each step a real `omnicrm` process (wall time, rows/s, peak RSS of that process), next to the raw
engine floor measured in the same run (`sqlite3 .import` / `psql \\copy` of the same file into one
text table, and back out).

    .venv/bin/python benchmarks/bench_csv.py [--quick] [--rows N]   (default N: 1,000,000, the issue's size, or
                                                                     $OMNICRM_BENCH_CSV_ROWS)

PostgreSQL uses OMNICRM_BENCH_PG_URL or OMNICRM_TEST_PG_URL (a scratch database is created and dropped).
Writes benchmarks/results/csv.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pgscratch import scratch_database  # benchmarks/ is the script's folder

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "csv.json"
TARGETS = {"import_s": 30.0, "import_rss_mb": 300.0, "export_s": 8.0, "export_rss_mb": 150.0}
OMNICRM = [sys.executable, "-m", "omnicrm"]
# The full 1,000,000 rows take ~3 min on a 2-core machine (imports ~1 min each at most), inside the 15 min
# of `make bench`.
DEFAULT_ROWS = int(os.environ.get("OMNICRM_BENCH_CSV_ROWS", "1000000"))


LAST: dict[str, float] = {}  # the last run's CPU seconds ("cpu_s") and process-tree peak memory ("tree_mb")


def tree_rss_kb(pid: int) -> int:
    """Resident memory (kB) of a process and its descendants now (0 once it has gone), each process's
    proportional share (Pss: pages a forked child still shares with its parent count once, not twice)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as fh:
                total += next((int(line.split()[1]) for line in fh if line.startswith("Pss:")), 0)
            with open(f"/proc/{p}/task/{p}/children") as fh:
                todo += map(int, fh.read().split())
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return total


def run(cmd: list[str], env: dict | None = None, stdin=None, stdout=subprocess.DEVNULL) -> tuple[float, float]:
    """Run `cmd` as a child; (wall seconds, peak RSS in MB of that child). Fails loudly on a non-zero exit.
    The child's CPU seconds (user + system) are left in LAST["cpu_s"], and the peak of its whole process
    tree's resident memory (Pss, sampled every 0.1 s: the import's reader process, the export's readers) in
    LAST["tree_mb"]."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            peak[0] = max(peak[0], tree_rss_kb(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    LAST["cpu_s"] = usage.ru_utime + usage.ru_stime
    LAST["tree_mb"] = peak[0] / 1024
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}): {err[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def base_env(home: Path, db_url: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNICRM_") or k.startswith("OMNICRM_TEST_")}
    env.update({"OMNICRM_HOME": str(home), "OMNICRM_DATABASE_URL": db_url})
    return env


def measure_engine(name: str, db_url: str, csv_path: Path, rows: int, work: Path) -> dict:
    home = work / f"home-{name}"
    env = base_env(home, db_url)
    run([*OMNICRM, "--quiet", "init"], env)
    import_s, import_mb = run([*OMNICRM, "--quiet", "contacts", "import", str(csv_path)], env)
    import_cpu, import_tree_mb = LAST["cpu_s"], LAST["tree_mb"]  # with the forked reader process
    out = work / f"export-{name}.csv"
    export_s, export_mb = run([*OMNICRM, "--quiet", "contacts", "export", "-o", str(out)], env)
    export_cpu, export_tree_mb = LAST["cpu_s"], LAST["tree_mb"]
    with out.open("rb") as fh:
        exported_lines = sum(1 for _ in fh)
    # Our own export read back into the database it came from: every row is its contact (merged, none new).
    summary = work / f"reimport-{name}.json"
    with summary.open("wb") as fh:
        reimport_s, reimport_mb = run([*OMNICRM, "--quiet", "contacts", "import", str(out), "--format", "json"],
                                      env, stdout=fh)
    reimport = json.loads(summary.read_text())
    if reimport["created"] != 0 or reimport["merged"] != reimport["rows"]:
        raise SystemExit(f"re-import of the export created contacts: {reimport}")
    out.unlink()
    return {"reimport_s": round(reimport_s, 2), "reimport_rss_mb": round(reimport_mb, 1),
            "reimport_cpu_s": round(LAST["cpu_s"], 1), "reimport_merged": reimport["merged"],
            "import_s": round(import_s, 2), "import_rows_per_s": round(rows / import_s),
            "import_rss_mb": round(import_mb, 1), "import_tree_rss_mb": round(import_tree_mb, 1),
            "import_cpu_s": round(import_cpu, 1), "export_tree_rss_mb": round(export_tree_mb, 1),
            "export_s": round(export_s, 2), "export_cpu_s": round(export_cpu, 1),
            "export_rows_per_s": round(rows / export_s), "export_rss_mb": round(export_mb, 1),
            "exported_lines": exported_lines}


def sqlite_floor(csv_path: Path, work: Path) -> dict:
    sqlite = shutil.which("sqlite3")
    if not sqlite:
        return {"skipped": "sqlite3 CLI not installed (apt-get install sqlite3)"}
    db = work / "raw.db"
    import_s, _ = run([sqlite, str(db), ".mode csv", f".import {csv_path} raw"])
    out = work / "raw-out.csv"
    export_s, _ = run([sqlite, str(db), ".mode csv", ".headers on", f".output {out}", "SELECT * FROM raw;"])
    out.unlink()
    db.unlink()
    return {"import_s": round(import_s, 2), "export_s": round(export_s, 2)}


def pg_floor(url: str, csv_path: Path, work: Path) -> dict:
    psql = shutil.which("psql")
    if not psql:
        return {"skipped": "psql not installed"}
    columns = ", ".join(f"c{i} text" for i in range(10))
    run([psql, "-q", url, "-c", f"CREATE TABLE raw ({columns})"])
    import_s, _ = run([psql, "-q", url, "-c", f"\\copy raw FROM '{csv_path}' WITH (FORMAT csv, HEADER true)"])
    out = work / "raw-out.csv"
    export_s, _ = run([psql, "-q", url, "-c", f"\\copy raw TO '{out}' WITH (FORMAT csv, HEADER true)"])
    out.unlink()
    return {"import_s": round(import_s, 2), "export_s": round(export_s, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description="CSV import/export benchmark")
    parser.add_argument("--quick", action="store_true", help="20,000 rows instead of the default")
    parser.add_argument("--rows", type=int, help=f"number of rows (overrides --quick; default {DEFAULT_ROWS:,}, "
                                                 "or OMNICRM_BENCH_CSV_ROWS)")
    args = parser.parse_args()
    rows = args.rows or (20_000 if args.quick else DEFAULT_ROWS)
    figures: dict = {"rows": rows, "cpus": os.cpu_count(), "load_avg_at_start": round(os.getloadavg()[0], 1)}
    with tempfile.TemporaryDirectory(prefix="omnicrm-bench-csv-") as tmp:
        work = Path(tmp)
        csv_path = work / "contacts.csv"
        gen_s, _ = run([sys.executable, str(ROOT / "benchmarks" / "gen_contacts.py"), str(rows), "-o", str(csv_path)])
        figures["generate_s"] = round(gen_s, 2)
        figures["file_mb"] = round(csv_path.stat().st_size / 2**20, 1)
        print(f"generated {rows:,} rows ({figures['file_mb']} MB) in {gen_s:.1f} s")

        engines: dict = {}
        print("sqlite ...", flush=True)
        engines["sqlite"] = measure_engine("sqlite", f"sqlite:///{work / 'bench.db'}", csv_path, rows, work)
        engines["sqlite"]["floor"] = sqlite_floor(csv_path, work)
        pg = os.environ.get("OMNICRM_BENCH_PG_URL") or os.environ.get("OMNICRM_TEST_PG_URL")
        if pg:
            print("postgresql ...", flush=True)
            url, drop = scratch_database(pg, "omnicrm_bench_csv")
            try:
                engines["postgresql"] = measure_engine("postgresql", url, csv_path, rows, work)
                engines["postgresql"]["floor"] = pg_floor(url, csv_path, work)
            finally:
                drop()
        else:
            engines["postgresql"] = {"skipped": "set OMNICRM_BENCH_PG_URL or OMNICRM_TEST_PG_URL"}
        for data in engines.values():
            floor = data.get("floor", {})
            if "import_s" in floor and "import_s" in data:
                data["import_vs_floor"] = round(data["import_s"] / max(floor["import_s"], 0.01), 1)
                data["export_vs_floor"] = round(data["export_s"] / max(floor["export_s"], 0.01), 1)
        figures["engines"] = engines

    scale = rows / 1_000_000
    lines = [
        "## CSV import and export",
        "",
        f"{rows:,} synthetic contacts (`benchmarks/gen_contacts.py`: non-ASCII names, quoted commas, several phone "
        f"formats, blanks, multi-line notes, ~1% repeated emails that merge), {figures['file_mb']} MB. Each step is "
        "one `omnicrm` process; CPU is its user + system time, with its forked reader processes (the import's parser; a "
        "whole SQLite export's two readers) and without the PostgreSQL server's; peak RSS is that of its largest "
        "process (`ru_maxrss` via wait4) / of all its processes together (the sum of their Pss, which counts the "
        "pages a forked reader shares with its parent once; sampled every 0.1 s). "
        "Floor: the same file through `sqlite3 .import` / "
        "`psql \\copy` into one text table and back out, in the same run. "
        f"Targets for 1M rows: import ≤ {TARGETS['import_s']:.0f} s and ≤ {TARGETS['import_rss_mb']:.0f} MB, "
        f"export ≤ {TARGETS['export_s']:.0f} s and ≤ {TARGETS['export_rss_mb']:.0f} MB"
        + (f" (scaled to this run: import ≤ {TARGETS['import_s'] * scale:.1f} s, export ≤ "
           f"{TARGETS['export_s'] * scale:.1f} s)." if rows != 1_000_000 else "."),
        "",
        f"Machine: {figures['cpus']} CPUs, load average {figures['load_avg_at_start']} when the run started.",
        "",
        "| engine | import | CPU | rows/s | peak RSS | floor | × floor | export | CPU | rows/s | peak RSS | floor "
        "| × floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, d in engines.items():
        if "skipped" in d:
            lines.append(f"| {name} | skipped: {d['skipped']} |||||||||||")
            continue
        f = d.get("floor", {})
        lines.append(
            f"| {name} | {d['import_s']} s | {d['import_cpu_s']} s | {d['import_rows_per_s']:,} | "
            f"{d['import_rss_mb']:.0f} / {d['import_tree_rss_mb']:.0f} MB | {f.get('import_s', '–')} s | "
            f"{d.get('import_vs_floor', '–')}× | {d['export_s']} s | {d['export_cpu_s']} s | "
            f"{d['export_rows_per_s']:,} | {d['export_rss_mb']:.0f} / {d['export_tree_rss_mb']:.0f} MB | "
            f"{f.get('export_s', '–')} s | "
            f"{d.get('export_vs_floor', '–')}× |")
    lines += ["", "Re-import: the export read back into the database it came from (every row is its contact by id "
              "and created_at, and by email: all merge, none is new; at 1M rows the file is as big as the database, "
              "so PostgreSQL takes it as a bulk load).", "",
              "| engine | re-import | CPU | rows/s | peak RSS |", "|---|---|---|---|---|"]
    for name, d in engines.items():
        if "reimport_s" in d:
            lines.append(f"| {name} | {d['reimport_s']} s | {d['reimport_cpu_s']} s | "
                         f"{round(d['reimport_merged'] / d['reimport_s']):,} | {d['reimport_rss_mb']:.0f} MB |")
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    command = "python benchmarks/bench_csv.py" + (" --quick" if args.quick and not args.rows else "") + (
        f" --rows {args.rows}" if args.rows else "")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"title": "CSV import and export", "command": command, "figures": figures,
                                   "markdown": markdown}, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
