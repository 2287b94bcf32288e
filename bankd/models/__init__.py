"""Model-side code shared by the bank builder and the trainer.

Encoders, key function, value compressor. No server, faiss or grpc imports here.
"""
