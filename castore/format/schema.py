"""The tables of a store and what each format version holds (pure: no I/O).

A store is a set of named tables, each an ordered map of byte keys to byte values (see
``docs/format.md``).  The storage engines (``castore.storage``) know tables only by these
names; which tables exist at which format version, and how a store is brought up to the
current version, is said here and nowhere else.
"""

from __future__ import annotations

import enum


class Table(enum.StrEnum):
    """A named table of a store; its value is the table's name on disk."""

    META = "meta"  #: ``config`` (the store's config record) and ``counters``
    CHUNKS = "chunks"  #: chunk id -> chunk bytes, raw or encoded (format 4)
    PAGES = "pages"  #: page id -> chunk-list page (concatenated chunk ids)
    STEPS = "steps"  #: step key -> sealed manifest
    TRASH = "trash"  #: time + step key -> manifest of a deleted step (GC's input)
    JOURNAL = "journal"  #: save token + batch -> ids a save wrote before its manifest
    STEPINFO = "stepinfo"  #: step key -> sealed metrics record
    TAGS = "tags"  #: tag name -> step key


#: the current store format (config ``format``)
STORE_FORMAT = 5

#: the tables of each format version; format 3 changed keys, format 4 chunk values
#: (per-chunk codecs, ``castore.format.compression``) and format 5 manifest nodes (typed
#: values and non-str dict keys), not tables
TABLES = {
    1: (Table.META, Table.CHUNKS, Table.PAGES, Table.STEPS),
    2: tuple(Table),
    3: tuple(Table),
    4: tuple(Table),
    5: tuple(Table),
}

#: every table a store of the current format has, in the order engines create them
ALL_TABLES = TABLES[STORE_FORMAT]

#: the tables every format has: a store lacking one is damaged, not old
REQUIRED_TABLES = TABLES[1]


def missing_tables(version: int) -> tuple[Table, ...]:
    """Tables a store of format ``version`` lacks: they read as empty until the writer
    creates them on its way to the current format (see :func:`castore.format.config.migrate`)."""
    have = set(TABLES.get(version, ALL_TABLES))
    return tuple(t for t in ALL_TABLES if t not in have)
