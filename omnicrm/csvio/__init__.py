"""CSV import and export of contacts, streamed in constant memory and written in bulk.

Export reads contacts in id-keyed batches with plain Core/driver SQL (emails, phones, tags and notes
aggregated by the engine), never ORM objects per row, and writes them through `omnicrm.output`.

Import reads a file or stdin (UTF-8 with or without BOM, UTF-16 with BOM, or `--encoding`), sniffs
the delimiter, skips preamble lines (LinkedIn), detects the format from the header, and then works in
batches: parse and validate the rows (in a forked reader process for a big input), tell new contacts
from rows that may repeat an email (a bitmap of email hashes; those are looked up, and merged, at the
end), and write with driver-level `executemany` (SQLite) or `COPY` (PostgreSQL) into the real tables.
Everything happens in the caller's one transaction, so an atomic import that finds a bad row is rolled
back by simply not committing.

reading.py (the input), importing.py, bulk.py (each engine's bulk writes), exporting.py, forked.py (the
reader processes of both); the names below are the package's interface.
"""

from omnicrm.csvio.bulk import sqlite_bulk_journal
from omnicrm.csvio.exporting import EXPORT_COLUMNS, export_contacts, iter_export_batches
from omnicrm.csvio.importing import (ImportOptions, ImportSummary, RejectsWriter, RowError, check_columns,
                                     import_contacts, import_job, job_payload, phone_e164)
from omnicrm.csvio.reading import DELIMITERS, CsvInput, open_csv

__all__ = ["CsvInput", "DELIMITERS", "EXPORT_COLUMNS", "ImportOptions", "ImportSummary", "RowError",
           "RejectsWriter", "check_columns", "export_contacts", "import_contacts", "import_job",
           "iter_export_batches", "job_payload", "open_csv", "phone_e164", "sqlite_bulk_journal"]
