"""Serving a bank over gRPC: the server's lifecycle (``server``), the gRPC edge
(``servicer``), the service without the wire (``service``), the response writer
(``wire``), shared memory, security, metrics, each ``bankd serve`` flag (``flags``),
and ``bankd serve`` as a child process (``process``)."""
