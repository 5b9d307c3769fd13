"""streamchat benchmarks: ingest throughput, memory over a long stream, concurrent sessions.

Each benchmark is a script (``python -m bench.ingest``, ``bench.memory``,
``bench.concurrency``) that generates its own input video with PyAV, repeats
its measurements, prints a small table of medians with min/max and writes a
JSON result under ``--out`` (default ``artifacts/bench/``, git-ignored).
``--quick`` only proves the script still runs: tiny inputs, one repetition.
Servers run on loopback addresses only; every run is bounded in time.
Method and figures: ``docs/benchmarks.md``.
"""
