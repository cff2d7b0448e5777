"""localfly: the Fly Machines API on one laptop, each machine a local process.

A client written for the real Machines API works against it unchanged. Sortie uses it offline:
for the demo, the tests and the benchmarks. See `python -m localfly --help`.
"""
