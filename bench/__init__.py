"""Benchmarks: each scenario runs the real workers against the local servers and reports its
figures next to the targets, as a table and as a file per run,
``bench/results/<scenario>/<UTC time>-<commit>.json`` (see :func:`bench.report.write`).

Run with ``make bench`` (all servers started and migrated first) or ``python -m bench``.
"""
