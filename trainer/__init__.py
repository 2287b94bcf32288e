"""tinyalign: TinyAlign vision-language models trained with retrieval streamed from bankd.

The trainer reads retrieved values through ``bankd_client`` and computes query keys
with the bank's own key function (``bankd.models.keys``); it never imports the server.
"""

__version__ = "0.1.0"
