"""Identities that both sides of the wire must compute the same way.

* ``sample_id_to_int``: the int64 id a bank entry records for the training sample it
  came from. Search exclusion and Fetch use these ids, so the trainer maps its own
  samples with the same function.
* ``EncoderFingerprint`` / ``fingerprint_encoder``: what identifies a vision (or text)
  encoder. A bank built with one encoder is useless to a VLM using another (the
  mismatched-encoder collapse), so clients compare fingerprints before retrieving.
* ``tune_allocator``: process setting both server and trainer processes want.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

_INT64_MAX = 2**63 - 1

# Config keys that change with the library or the save location, not with the model.
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "transformers_version",
        "_name_or_path",
        "architectures",
        "torch_dtype",
        "dtype",
        "_commit_hash",
        "_attn_implementation_autoset",
        "_attn_implementation",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "use_return_dict",
    }
)


def sample_id_to_int(sample_id: str | int) -> int:
    """Map a dataset sample id to the non-negative int64 a bank entry records.

    The rule, exactly (the wire contract, proto/bankd/v1/bankd.proto, states it too;
    a client in any language must compute the same number):

    * an int in [0, 2**63) keeps its value (bool and other types are refused);
    * a str of ASCII digits only ("0"-"9", leading zeros allowed, no sign, no
      whitespace) whose value is at most 2**63 - 1 keeps that value ("00017" -> 17);
    * any other non-empty str: BLAKE2b with an 8-byte digest (``digest_size=8``, no
      key, salt or personalisation; not the first 8 bytes of BLAKE2b-512, which
      differ) over the id's UTF-8 bytes, read as an unsigned 64-bit little-endian
      integer, top bit cleared (``& 0x7FFF_FFFF_FFFF_FFFF``)::

          int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest(),
                         "little") & (2**63 - 1)

      e.g. "a" -> 3405396810240292928, "GCC_train_000000001" -> 1085658593928978518.

    Hashed ids are nearly always above 2**53 (JavaScript's Number.MAX_SAFE_INTEGER):
    a JavaScript client must hold them as BigInt, never as Number.
    Raises ValueError for an empty string, a negative or too large int, or another type.
    """
    if isinstance(sample_id, bool):
        raise ValueError(f"sample id must be str or int, got {sample_id!r}")
    if isinstance(sample_id, int):
        if not 0 <= sample_id <= _INT64_MAX:
            raise ValueError(f"integer sample id {sample_id} is outside [0, 2**63)")
        return sample_id
    if not isinstance(sample_id, str) or not sample_id:
        raise ValueError(f"sample id must be a non-empty str or int, got {sample_id!r}")
    if sample_id.isascii() and sample_id.isdigit() and int(sample_id) <= _INT64_MAX:
        return int(sample_id)
    digest = hashlib.blake2b(sample_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _INT64_MAX


@dataclass(frozen=True)
class EncoderFingerprint:
    """Identity of an encoder: where it came from, and hashes of its config and weights.

    Two encoders match when config and weights hashes are equal; the model id is
    informational (a hub id and a local copy of it are the same encoder).
    """

    model_id: str
    config_sha256: str
    weights_sha256: str

    def matches(self, other: EncoderFingerprint) -> bool:
        return (self.config_sha256, self.weights_sha256) == (
            other.config_sha256,
            other.weights_sha256,
        )

    def short(self) -> str:
        cfg, weights = self.config_sha256[:12], self.weights_sha256[:12]
        return f"{self.model_id} (config {cfg}, weights {weights})"

    def to_dict(self) -> dict[str, str]:
        return {
            "model_id": self.model_id,
            "config_sha256": self.config_sha256,
            "weights_sha256": self.weights_sha256,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderFingerprint:
        return cls(str(d["model_id"]), str(d["config_sha256"]), str(d["weights_sha256"]))


def _config_dict(config: Any) -> dict[str, Any]:
    if hasattr(config, "to_diff_dict"):
        d = config.to_dict()
    elif isinstance(config, dict):
        d = dict(config)
    else:
        raise ValueError(f"cannot read a config from {type(config).__name__}")

    def clean(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: clean(v) for k, v in sorted(x.items()) if k not in _VOLATILE_CONFIG_KEYS}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return clean(d)


def fingerprint_encoder(model: Any, model_id: str | None = None) -> EncoderFingerprint:
    """Fingerprint a torch encoder (e.g. a transformers ``SiglipVisionModel``).

    The weights hash covers every parameter and buffer, in name order, as float32
    little-endian bytes, so it does not change with the device or autocast dtype the
    model is run in. Imports torch lazily.
    """
    import torch

    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no .config; cannot fingerprint it")
    cfg = _config_dict(config)
    config_sha = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()
    h = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            h.update(name.encode())
            t = tensor.detach().to("cpu")
            if t.is_floating_point():
                t = t.to(torch.float32)
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().numpy().tobytes())
    if model_id is None:
        model_id = str(getattr(config, "_name_or_path", "") or type(model).__name__)
    return EncoderFingerprint(model_id, config_sha, h.hexdigest())


def tune_allocator() -> bool:
    """Keep glibc from returning multi-megabyte buffers to the OS after every call.

    Each Search response carries megabytes of values; by default glibc maps and unmaps
    such buffers per call, and the page faults of touching fresh pages cost several
    milliseconds per response. Raising the mmap and trim thresholds (64 MiB / 256 MiB)
    keeps them in the heap. Linux/glibc only; returns whether it was applied. Servers
    call it at start; long-running clients (trainers) may call it too.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_mmap_threshold, 64 << 20) == 1
    return libc.mallopt(m_trim_threshold, 256 << 20) == 1 and ok
