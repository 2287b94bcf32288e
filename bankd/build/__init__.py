"""Building a bank: LLaVA-format pairs -> keys, trained values -> a bank on disk.

``config`` (BuildConfig and the flags of ``bankd build``, importable without torch),
``pipeline`` (``build_bank``), ``train`` (pass 1 and the value compressor's training),
``parallel`` and ``distributed`` (torchrun), ``data`` (LLaVA reading), ``demo_data``
(the synthetic dataset), ``demo_instruct`` (its instruction, eval and LM-corpus sets),
``workdir`` (checkpoints of an unfinished build).
"""
