"""Property-based fuzzing of the exec API against a live broker (hypothesis).

- ``props``: what every answer must be, the leak and liveness checks, the runner;
- ``values``: text, numbers and JSON at and past the bounds;
- ``wire``: a raw websocket client that writes any frame;
- ``execs``, ``frames``, ``routes``, ``files``: the targets (what is sent, what else is checked);
- ``targets``: the list, as tests/test_fuzz.py (short) and bench/workloads/fuzz.py (long) run it.
"""
