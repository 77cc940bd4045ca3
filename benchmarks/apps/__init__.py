"""App modules: what each system's worker imports (``-A``) and its client sends to.

Every module defines the same four tasks (``noop``, ``noop_sig``, ``sleep``, ``sleep_sig``)
with each system's idiomatic code, configured from ``BENCH_*`` variables (``common.py``).
"""
