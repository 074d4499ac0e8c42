"""A deterministic generator of many realistic contacts, bulk-loaded with Core/COPY (benchmark set-up only).

Names mix common and accented first names with synthetic surnames; ~40% of contacts work at one of
eight "big" companies (~5% each, the broad search terms), the rest at one of tens of thousands of small
ones; emails are derived from the name; ~70% have a phone written in varied formats; created_at spreads
over seven years; tags follow a long-tailed distribution (10% … 0.05%).
"""

from __future__ import annotations

import bisect
import itertools
import random
from datetime import datetime, timedelta, timezone
from typing import Iterator

from sqlalchemy import Engine, insert, text

from omnicrm.models import Contact, Tag, User
from omnicrm.normalize import digits, fold, search_text

FIRST = ("James Mary Robert Patricia John Jennifer Michael Linda David Elizabeth William Barbara Richard "
         "Susan Joseph Jessica Thomas Sarah Charles Karen Christopher Lisa Daniel Nancy Matthew Betty "
         "Anthony Margaret Mark Sandra Donald Ashley Steven Kimberly Paul Emily Andrew Donna Joshua Michelle "
         "Kenneth Carol Kevin Amanda Brian Dorothy George Melissa Timothy Deborah Zoë José Renée Björn "
         "Łukasz Søren Chloé Anaïs François Jürgen Ægir Noémie Iñaki Zoltán Mária Dvořák Ólafur Siân "
         "Aoife Hana Yuki Wei Priya Arjun Fatima Omar Amara Kwame Ngozi Mateo Valentina Sofía Luca Giulia "
         "Elif Emre Olga Ivan Nadia Tariq Leila Hamid Mei Jun Akira Hiroshi Sven Ingrid Astrid").split()
SYLLABLES = ("ab ad al am an ar as ba be bo bra ca ce cha co da de di do el en er fa fe fi fo ga ge gi go "
             "ha he hi ho ka ke ki ko la le li lo ma me mi mo na ne ni no ol on or pa pe pi po ra re ri "
             "ro sa se si so ta te ti to ul un ur va ve vi vo wa we wi ya yo za ze zi zo").split()
BIG_COMPANIES = ["Acme Corporation", "Globex", "Initech", "Umbrella Health", "Hooli", "Stark Industries",
                 "Wayne Enterprises", "Cyberdyne Systems"]
BIG_SHARE = 0.05
NO_COMPANY_SHARE = 0.2
# (domain, share): six at ~5% are broad search terms too.
DOMAINS = [("gmail.com", 0.40), ("outlook.com", 0.20), ("yahoo.com", 0.10), ("proton.me", 0.05),
           ("icloud.com", 0.05), ("fastmail.com", 0.05), ("hey.com", 0.05), ("zoho.com", 0.05),
           ("gmx.net", 0.05)]
TAGS = [("customer", 0.10), ("lead", 0.05), ("investor", 0.02), ("vip", 0.01), ("press", 0.005),
        ("conference-2025", 0.02), ("newsletter", 0.08), ("partner", 0.01), ("alumni", 0.03),
        ("board", 0.0005), ("supplier", 0.015), ("friend", 0.04)]
START = datetime(2019, 1, 1, tzinfo=timezone.utc)
SPAN_S = int((datetime(2026, 11, 1, tzinfo=timezone.utc) - START).total_seconds())


def _surnames(rng: random.Random, count: int) -> list[str]:
    names: set[str] = set()
    while len(names) < count:
        names.add("".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3, 3, 4)))).capitalize())
    return sorted(names)


def _company_names(rng: random.Random, count: int) -> list[str]:
    suffixes = ["Labs", "GmbH", "Ltd", "& Co", "Studio", "Partners", "Group", "SA", "Inc", "Works"]
    names: set[str] = set()
    while len(names) < count:
        names.add("".join(rng.choice(SYLLABLES) for _ in range(rng.choice((3, 4)))).capitalize()
                  + " " + rng.choice(suffixes))
    return sorted(names)


def _phone(rng: random.Random) -> tuple[str, str]:
    area, mid, last = rng.randint(201, 989), rng.randint(200, 999), rng.randint(0, 9999)
    style = rng.randrange(4)
    raw = (f"+1 {area}-{mid}-{last:04d}", f"({area}) {mid}-{last:04d}", f"{area}.{mid}.{last:04d}",
           f"+1{area}{mid}{last:04d}")[style]
    return raw, f"+1{area}{mid}{last:04d}"


CONTACT_COLUMNS = ("id", "user_id", "display_name", "company", "created_at", "updated_at", "search_text")


def contacts(count: int, user_id: int, seed: int = 7, first_id: int = 1) -> Iterator[tuple]:
    """(contact row, email row, phone row | None, tag names); rows are tuples ready for the driver.

    Datetimes are naive-UTC text (how omnicrm.models.UTCDateTime stores them); search_text is built from
    cached folded parts and equals omnicrm.normalize.search_text (checked by `check_sample`).
    """
    rng = random.Random(seed)
    surnames = _surnames(rng, 3000)
    small = _company_names(rng, max(1000, count // 12))
    folded = {name: fold(name) for name in [*FIRST, *surnames, *small, *BIG_COMPANIES]}
    ascii_first = {f: "".join(c for c in fold(f) if c.isascii() and c.isalnum()) or "x" for f in FIRST}
    big_cut = BIG_SHARE * len(BIG_COMPANIES)
    domain_of = [d for d, _ in DOMAINS] + [DOMAINS[0][0]]
    domain_cut = list(itertools.accumulate(share for _, share in DOMAINS))
    for n in range(count):
        cid = first_id + n
        first = rng.choice(FIRST)
        last = rng.choice(surnames)
        name = f"{first} {last}"
        roll = rng.random()
        if roll < big_cut:
            company = BIG_COMPANIES[int(roll / BIG_SHARE)]
        elif roll < big_cut + NO_COMPANY_SHARE:
            company = None
        else:
            company = rng.choice(small)
        email = f"{ascii_first[first]}.{last.lower()}{cid}@{domain_of[bisect.bisect(domain_cut, rng.random())]}"
        parts = [f"{folded[first]} {folded[last]}"]
        if company:
            parts.append(folded[company])
        parts.append(email)
        phone = None
        if rng.random() < 0.7:
            raw, e164 = _phone(rng)
            parts.append(digits(raw))
            parts.append(e164[1:])
            phone = (user_id, cid, raw, e164, 0)
        created = (START + timedelta(seconds=rng.randrange(SPAN_S))).strftime("%Y-%m-%d %H:%M:%S.000000")
        tags = [name_ for name_, share in TAGS if rng.random() < share]
        yield ((cid, user_id, name, company, created, created, "\n".join(parts)),
               (user_id, cid, email, 0), phone, tags)


def check_sample(count: int = 2000) -> None:
    """The fast search_text equals the product's own normalize.search_text."""
    for row, email, phone, _ in contacts(count, 1):
        phones = [(phone[2], phone[3])] if phone else []
        expected = search_text(row[2], row[3], [email[2]], phones)
        assert row[6] == expected, (row[6], expected)


def _python_defaults(table, given: set[str]) -> dict:
    """Scalar Python-side defaults of columns the generator does not fill (other engineers add columns)."""
    extra = {}
    for col in table.columns:
        if col.name in given or col.primary_key:
            continue
        if col.default is not None and getattr(col.default, "is_scalar", False):
            extra[col.name] = col.default.arg
    return extra


def generate(count: int, other_count: int = 2000) -> list[tuple[str, list[tuple]]]:
    """All rows, made once and loaded into each engine: [(user name, rows)] - the benchmark user first."""
    return [("bench", list(contacts(count, 0, seed=7, first_id=1))),
            ("bench-other", list(contacts(other_count, 0, seed=100, first_id=count + 1)))]


LOADED_TABLES = ("contacts", "contact_emails", "contact_phones", "contact_tags")


def _secondary_indexes(conn) -> list[tuple[str, str]]:
    """(name, CREATE statement) of the plain indexes on the loaded tables (not keys or constraints)."""
    tables = ", ".join(f"'{t}'" for t in LOADED_TABLES)
    if conn.dialect.name == "postgresql":
        return list(conn.execute(text(
            f"SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema() "
            f"AND tablename IN ({tables}) AND indexname NOT IN (SELECT conname FROM pg_constraint)")).all())
    return list(conn.execute(text(
        f"SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL AND tbl_name IN ({tables})")).all())


def load(engine: Engine, data: list[tuple[str, list[tuple]]], batch: int = 50_000) -> int:
    """Bulk-load generated rows (ids as generated) into an empty schema; returns the first user's id.

    The plain indexes are dropped for the load and built again afterwards (faster than keeping them up
    to date row by row); keys and unique constraints stay.
    """
    with engine.begin() as conn:
        indexes = _secondary_indexes(conn)
        for name, _ in indexes:
            conn.execute(text(f'DROP INDEX "{name}"'))
    try:
        return _load(engine, data, batch)
    finally:
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(text("SET LOCAL maintenance_work_mem = '512MB'"))
            for _, create in indexes:
                conn.execute(text(create))
            if engine.dialect.name == "sqlite":
                from omnicrm.search_index import write_sqlite_stats

                write_sqlite_stats(conn)  # dropping an index drops its statistics


def _load(engine: Engine, data: list[tuple[str, list[tuple]]], batch: int) -> int:
    ids = []
    for user_name, rows in data:
        with engine.begin() as conn:
            uid = conn.execute(insert(User).values(name=user_name, created_at=START).returning(User.id)).scalar()
            tag_ids = {name_: conn.execute(insert(Tag).values(user_id=uid, name=name_).returning(Tag.id)).scalar()
                       for name_, _ in TAGS}
        ids.append(uid)
        with engine.connect() as conn:
            raw = conn.connection.dbapi_connection
            if engine.dialect.name == "sqlite":
                raw.execute("PRAGMA cache_size = -1000000")  # ~1 GB page cache for random index inserts
            for start in range(0, len(rows), batch):
                with conn.begin():
                    _insert_chunk(engine, conn, uid, rows[start:start + batch], tag_ids)
            if engine.dialect.name == "sqlite":
                raw.execute("PRAGMA cache_size = -2000")
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            for table in ("contacts", "contact_emails", "contact_phones"):
                conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                                  f"(SELECT max(id) FROM {table}))"))
    return ids[0]


EMAIL_COLUMNS = ("user_id", "contact_id", "email", "position")
PHONE_COLUMNS = ("user_id", "contact_id", "raw", "e164", "position")


def _insert_chunk(engine: Engine, conn, uid: int, chunk: list[tuple], tag_ids: dict[str, int]) -> None:
    extra = _python_defaults(Contact.__table__, set(CONTACT_COLUMNS))
    contact_cols = CONTACT_COLUMNS + tuple(extra)
    tail = tuple(extra.values())
    batches = [
        ("contacts", contact_cols, [(r[0][0], uid) + r[0][2:] + tail for r in chunk]),
        ("contact_emails", EMAIL_COLUMNS, [(uid,) + r[1][1:] for r in chunk]),
        ("contact_phones", PHONE_COLUMNS, [(uid,) + r[2][1:] for r in chunk if r[2]]),
        ("contact_tags", ("contact_id", "tag_id"), [(r[0][0], tag_ids[t]) for r in chunk for t in r[3]]),
    ]
    cur = conn.connection.dbapi_connection.cursor()
    for table, names, rows in batches:
        if not rows:
            continue
        if engine.dialect.name == "postgresql":
            with cur.copy(f"COPY {table} ({', '.join(names)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        else:
            cur.executemany(f"INSERT INTO {table} ({', '.join(names)}) "
                            f"VALUES ({', '.join('?' * len(names))})", rows)
    cur.close()


__all__ = ["contacts", "generate", "load", "check_sample", "BIG_COMPANIES", "TAGS"]
