"""The on-disk format, pure: no module here does I/O (``docs/format.md`` is its spec).

``ids`` (BLAKE3-256 chunk ids), ``chunker`` (row-aligned chunks), ``manifest`` (records of
a step and their msgpack form), ``sealing`` (digests of records that are not
content-addressed; the bounded decoder of untrusted bytes), ``codec`` (state trees <->
manifest nodes), ``keys`` (step, branch, tag and trash keys), ``journal`` (journal entries
and counters), ``config`` (the config record and :func:`~castore.format.config.migrate`),
``schema`` (tables per format version).
"""
