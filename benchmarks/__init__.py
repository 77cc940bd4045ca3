"""Benchmark suite: aioqueue against stock Celery, its asyncio/threaded peers and a raw floor.

Run ``python -m benchmarks --help`` (or ``scripts/bench``). Each system's worker runs as a real
process, a separate client process drives it, and the parent process only orchestrates: it
starts and stops workers, samples their memory and prints the table. See
``docs/benchmarks.md`` for the measured results and how each measurement is kept fair.
"""
