"""bankd: build a TinyAlign memory bank and serve it over gRPC.

Importing this package is cheap: it pulls in neither faiss, grpc nor torch. The
model-side code (``bankd.models``) is importable by the trainer without the server.
"""

__version__ = "0.1.0"
