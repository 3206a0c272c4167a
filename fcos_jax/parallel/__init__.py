"""Many devices and many processes (docs/architecture.md#parallelism).

sharding.py     the mesh, multi-process start-up, host <-> global arrays, per-device programs,
                gathering from processes, once-per-directory work
collectives.py  the collectives of a compiled program, read from its HLO text
"""
