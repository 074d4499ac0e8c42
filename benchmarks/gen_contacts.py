"""Write N synthetic contacts as a native OmniCRM CSV, with the mess real files have.

Non-ASCII names, companies with quoted commas, phones in several national and international
formats, blanks, several emails and tags per contact, multi-line notes, and about 1% of rows
repeating an earlier row's email (they merge on import). Deterministic for a given --seed.

    python benchmarks/gen_contacts.py 1000000 -o /tmp/contacts.csv
"""

from __future__ import annotations

import argparse
import csv
import random
import sys

FIRST = ["Ann", "Bob", "Zoë", "José", "Łukasz", "Mónica", "Søren", "Chloé", "Nguyễn", "Ömer", "Priya", "Wei",
         "Fatima", "Olu", "Émile", "Ingrid", "Kenji", "Ana", "Mateo", "Sara", "Yusuf", "Liam", "Maëlle", "Rui"]
LAST = ["Adams", "Brown", "Müller", "García", "Kowalski", "Núñez", "Ødegaard", "Dubois", "Tran", "Yılmaz",
        "Patel", "Zhang", "Haddad", "Okafor", "Lefèvre", "Johansson", "Sato", "Silva", "Rossi", "O'Brien"]
COMPANIES = ["Acme, Inc.", "Globex", "Initech", "Umbrella Corp", "Stark Industries", "Wayne Enterprises",
             "Soylent \"Green\" Co", "Müller & Söhne GmbH", "", "", "Hooli", "Pied Piper", "Vandelay Industries"]
TITLES = ["CEO", "CTO", "Engineer", "Sales, EMEA", "", "", "Designer", "Product Manager", "Founder"]
TAGS = ["vip", "lead", "customer", "partner", "investor", "press", "friend", "2024 conference", "newsletter"]
DOMAINS = ["example.com", "example.org", "mail.example.net", "exämple.de", "example.co.uk"]


def phone(rng: random.Random) -> str:
    area, exchange, line = rng.randint(201, 989), rng.randint(200, 999), rng.randint(0, 9999)
    shape = rng.random()
    if shape < 0.25:
        return f"+1 ({area}) {exchange}-{line:04d}"
    if shape < 0.45:
        return f"{area}.{exchange}.{line:04d}"
    if shape < 0.65:
        return f"({area}) {exchange} {line:04d}"
    if shape < 0.80:
        return f"{area}{exchange}{line:04d}"
    if shape < 0.88:
        return f"1-{area}-{exchange}-{line:04d}"
    if shape < 0.93:
        return f"+44 20 {rng.randint(7000, 8999)} {line:04d}"
    if shape < 0.97:
        return f"+49 30 {rng.randint(1000000, 9999999)}"
    return f"{exchange}-{line:04d}"


def rows(n: int, seed: int):
    rng = random.Random(seed)
    emails_so_far: list[str] = []
    for i in range(1, n + 1):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        name = f"{first} {last}" if rng.random() > 0.03 else ""
        local = f"{first.lower()}.{last.lower()}.{i}".replace("'", "")
        emails = [f"{local}@{rng.choice(DOMAINS)}"]
        if rng.random() < 0.3:
            emails.append(f"{first[0].lower()}{i}@work.example.com")
        if emails_so_far and rng.random() < 0.01:
            emails = [rng.choice(emails_so_far)]  # the same person again: merges
        elif rng.random() < 0.001:
            emails_so_far.append(emails[0])
        phones = [] if rng.random() < 0.2 else [phone(rng) for _ in range(rng.choice((1, 1, 1, 2)))]
        tags = rng.sample(TAGS, rng.choice((0, 0, 1, 1, 2, 3)))
        note = ""
        roll = rng.random()
        if roll < 0.05:
            note = f"Met at the {rng.choice(TAGS)} event.\nFollow up, re: \"pricing\"; budget ~{rng.randint(1, 90)}k"
        elif roll < 0.07:
            note = "-- call back after 5pm"
        yield ["", name, ";".join(emails), ";".join(phones), rng.choice(COMPANIES), rng.choice(TITLES),
               ";".join(tags), note, "", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("count", type=int, nargs="?", default=1000)
    parser.add_argument("-o", "--output", help="file (default: stdout)")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    out = open(args.output, "w", encoding="utf-8", newline="") if args.output else sys.stdout
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(["id", "display_name", "email", "phone", "company", "title", "tags", "notes", "created_at",
                     "updated_at"])
    writer.writerows(rows(args.count, args.seed))
    if args.output:
        out.close()


if __name__ == "__main__":
    main()
