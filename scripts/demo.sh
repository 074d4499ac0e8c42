#!/usr/bin/env bash
# `make demo`: the main job on the embedded default (SQLite database, SQLite queue), in a throw-away home.
# Each step is a separate block; later steps (CSV import/export, a queued job) go in their own blocks below.
set -euo pipefail
cd "$(dirname "$0")/.."

OMNICRM=${OMNICRM:-"$PWD/.venv/bin/omnicrm"}
OMNICRM_HOME=$(mktemp -d /tmp/omnicrm-demo.XXXXXX)
export OMNICRM_HOME
unset OMNICRM_DATABASE_URL OMNICRM_QUEUE_URL OMNICRM_USER OMNICRM_FORMAT OMNICRM_NOW
trap 'rm -rf "$OMNICRM_HOME"' EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() {  # echo the command as a user would type it, then run it
    local shown="" arg
    for arg in "$@"; do
        if [[ $arg =~ [^A-Za-z0-9@._,:/=+-] ]]; then shown+=" '$arg'"; else shown+=" $arg"; fi
    done
    printf '$ omnicrm%s\n' "$shown"
    "$OMNICRM" "$@"
}

# --- contacts --------------------------------------------------------------------------------
step "Create the database (OMNICRM_HOME=$OMNICRM_HOME)"
run init

step "Add a few contacts"
run contacts add --name "Zoë Adams" --email zoe@example.com --phone "+1 (415) 555-0101" --company Acme \
    --tag customer --tag vip
run contacts add --name "Émile Zola" --email emile@zola.fr --phone "+33 6 12 34 56 78" --tag author
run contacts add --name "Bob Stone" --email bob@stone.io --company "Café Ltd" --tag customer
run contacts add --name "Temp Person" --email temp@example.org --tag temp

step "List them (table; the page footer goes to stderr)"
run contacts list

step "Search ignores case and accents, and phone formatting"
run contacts list --search ZOE
run contacts list --search emile --format json
run contacts list --search 4155550101 --fields id,display_name,phone

step "Filter by tag and sort"
run contacts list --tag customer --sort name --order asc --format csv

step "Tags"
run tags list
run tags rename customer client
run tags list

step "A note, a contact card and its timeline"
run contacts note zoe@example.com "Call back about the renewal"
run contacts show zoe@example.com
run contacts timeline zoe@example.com --format jsonl

step "Bulk delete: preview, then delete"
run contacts delete --tag temp --dry-run
run contacts delete --tag temp --yes
run contacts list --fields id,display_name,tags

# --- CSV import/export -----------------------------------------------------------------------
step "Import a Google Contacts CSV export (format detected from the header; dry run first)"
run contacts import scripts/data/google_contacts.csv --dry-run
run contacts import scripts/data/google_contacts.csv
run contacts list --search globex

step "Export through a pipe (CSV with a header, formulas neutralised)"
printf '$ omnicrm contacts export --portable | head -4\n'
"$OMNICRM" contacts export --portable | head -4

step "Export only one tag as JSON lines to a file, then count the lines"
run contacts export --tag vip --format jsonl -o "$OMNICRM_HOME/vip.jsonl"
wc -l < "$OMNICRM_HOME/vip.jsonl"

# --- queued jobs and a worker -----------------------------------------------------------------
step "Queue an import as a background job, then run a worker until the queue is empty"
printf 'id,display_name,email,tags\n,Queued Person,queued@example.net,from-job\n' > "$OMNICRM_HOME/queued.csv"
run contacts import "$OMNICRM_HOME/queued.csv" --background
run jobs list
run worker --workers 2 --once
run jobs list --status done
run contacts show queued@example.net

step "Done"
