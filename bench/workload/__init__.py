"""What the benchmarks in bench/ share: the reference workload and its bank, the
in-process reference search, the `bankd serve` child, and running and reporting.

    from workload.bank import BenchConfig, bank_for, make_queries   # N, d, B, k, seeded data
    from workload.reference import Reference                       # in-process FAISS + gather
    from workload.server import BenchServer                        # `bankd serve` child
    from workload.run import progress, publish, run_program, workdir_for

The benchmarks are programs run as ``python bench/NAME.py``, so Python puts bench/ first
on the module path and this package imports as ``workload``; tests/bench/ does the same
for the programs it loads.
"""
