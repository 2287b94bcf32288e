"""Searching keys: FAISS indexes and their tuning, bankd's flat kernel, torch search on
CUDA, the shared top-k selection, shards, and the in-process bank (``LocalBank``)."""
