"""Benchmarks: each scenario runs the real workers against the local servers and reports its
figures next to the targets, as a table and as ``bench/results/latest-<scenario>.json``.

Run with ``make bench`` (all servers started and migrated first) or ``python -m bench``.
"""
