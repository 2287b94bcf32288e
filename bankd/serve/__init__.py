"""Serving a bank over gRPC: lifecycle, the no-wire service, shared memory, security,
metrics, and ``bankd serve`` as a child process (``process``)."""
