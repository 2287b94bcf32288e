"""The bank on disk: its file layout (``paths``), the writer and the reader."""
