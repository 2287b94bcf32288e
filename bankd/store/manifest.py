"""The bank's manifest, typed: what ``bank.manifest.json`` holds, read and written here only.

    manifest = Manifest.from_json(raw, where=path)   # BankFileError naming the problem
    raw = manifest.to_json()

The JSON is the ``bankd-bank/1`` format's: the files the manifest lists with their
sizes and SHA-256 checksums, counts and shapes, the index (factory, how it was chosen,
default search parameters, recall measured at build), the encoders' fingerprints, the
key function, the weights files, the resolved build config and the build report.
Unknown keys of ``index`` are kept as they were read (``IndexRecord.extra``), so a
manifest read and written again loses nothing. ``bank_info`` turns a manifest and a
bank's serving facts into the ``BankInfo`` that GetInfo and ``LocalBank.info`` return.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from bankd.store.paths import FORMAT, VALUE_SHAPE
from bankd_client.errors import BankFileError
from bankd_client.identity import EncoderFingerprint
from bankd_client.types import BankInfo, KeyFunctionSpec

VALUE_DTYPE = "float16"


@dataclass(frozen=True)
class FileRecord:
    """One file of the bank: its size and SHA-256 checksum."""

    bytes: int
    sha256: str


@dataclass(frozen=True)
class KeyFunctionRecord:
    """The key function: its JSON config and the file of its safetensors weights."""

    config: dict[str, Any]
    weights_file: str

    @property
    def name(self) -> str:
        return str(self.config.get("name", ""))


@dataclass(frozen=True)
class IndexRecord:
    """The index: the factory string it was built from and how, the search parameters
    the server applies by default, and recall@k measured at build ({"k", "value",
    "protocol", ...})."""

    factory: str
    requested: str = ""  # what was asked for ("auto", or the factory string itself)
    reason: str = ""  # why "auto" chose the factory
    search_params: dict[str, int] = field(default_factory=dict)
    recall: dict[str, Any] = field(default_factory=dict)
    bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # other keys, kept as read

    def to_dict(self) -> dict[str, Any]:
        out = {**self.extra, "factory": self.factory}
        out |= {"search_params": dict(self.search_params), "recall": dict(self.recall)}
        out |= {k: getattr(self, k) for k in ("requested", "reason", "bytes") if getattr(self, k)}
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], factory: str) -> IndexRecord:
        known = {"factory", "requested", "reason", "search_params", "recall", "bytes"}
        return cls(
            factory=str(d.get("factory") or factory),
            requested=str(d.get("requested", "")),
            reason=str(d.get("reason", "")),
            search_params={str(k): int(v) for k, v in (d.get("search_params") or {}).items()},
            recall=dict(d.get("recall") or {}),
            bytes=int(d.get("bytes", 0)),
            extra={k: v for k, v in d.items() if k not in known},
        )


@dataclass(frozen=True)
class Manifest:
    """Everything ``bank.manifest.json`` records about a bank.

    The writer (``bankd.store.writer.BankWriter.finish``) fills what it alone knows:
    entries, key_dim, value_shape, files and the weights' file names; a builder gives
    the rest (``Manifest(index=IndexRecord(...), vision_encoder=..., config=...)``).
    """

    index: IndexRecord
    entries: int = 0
    key_dim: int = 0
    value_shape: tuple[int, ...] = VALUE_SHAPE
    value_dtype: str = VALUE_DTYPE
    metric: str = "ip"
    vision_encoder: EncoderFingerprint | None = None
    text_encoder: EncoderFingerprint | None = None
    key_function: KeyFunctionRecord | None = None
    weights: dict[str, str] = field(default_factory=dict)  # name -> file name
    config: dict[str, Any] = field(default_factory=dict)  # the resolved build config
    report: dict[str, Any] = field(default_factory=dict)  # the build's report
    files: dict[str, FileRecord] = field(default_factory=dict)  # file name -> record
    format: str = FORMAT

    @property
    def index_factory(self) -> str:
        return self.index.factory

    @property
    def seed(self) -> int:
        """The build's seed (encoder initialisation of a tiny encoder; 0 if unrecorded)."""
        return int(self.config.get("seed", 0))

    def with_config(self, **changes: Any) -> Manifest:
        """A copy with ``config`` updated (e.g. a shard's record)."""
        return replace(self, config={**self.config, **changes})

    def to_dict(self) -> dict[str, Any]:
        def fingerprint(fp: EncoderFingerprint | None) -> dict | None:
            return fp.to_dict() if fp is not None else None

        kf = self.key_function
        return {
            "format": self.format,
            "entries": self.entries,
            "key_dim": self.key_dim,
            "value_shape": list(self.value_shape),
            "value_dtype": self.value_dtype,
            "index_factory": self.index.factory,  # read by 0.1.0 code; index.factory too
            "index": self.index.to_dict(),
            "metric": self.metric,
            "vision_encoder": fingerprint(self.vision_encoder),
            "text_encoder": fingerprint(self.text_encoder),
            "key_function": (
                {"config": kf.config, "weights_file": kf.weights_file} if kf else None
            ),
            "weights": dict(self.weights),
            "config": self.config,
            "report": self.report,
            "files": {n: {"bytes": f.bytes, "sha256": f.sha256} for n, f in self.files.items()},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str, where: object = "manifest") -> Manifest:
        """Parse a manifest; BankFileError naming ``where`` and the problem if it is not
        valid JSON, not a bankd-bank/1 manifest, or a field is missing or malformed."""
        try:
            d = json.loads(raw)
        except json.JSONDecodeError as e:
            raise BankFileError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise BankFileError(f"{where}: not a {FORMAT} manifest")
        try:
            return cls._from_dict(d)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BankFileError(f"{where}: missing or bad field {e}") from None

    @classmethod
    def _from_dict(cls, d: dict[str, Any]) -> Manifest:
        def fingerprint(value: Any) -> EncoderFingerprint | None:
            return EncoderFingerprint.from_dict(value) if value else None

        kf = d.get("key_function")
        files = dict(d["files"])
        return cls(
            index=IndexRecord.from_dict(d.get("index") or {}, d.get("index_factory", "")),
            entries=int(d["entries"]),
            key_dim=int(d["key_dim"]),
            value_shape=tuple(int(s) for s in d["value_shape"]),
            value_dtype=str(d.get("value_dtype", VALUE_DTYPE)),
            metric=str(d.get("metric", "ip")),
            vision_encoder=fingerprint(d.get("vision_encoder")),
            text_encoder=fingerprint(d.get("text_encoder")),
            key_function=KeyFunctionRecord(dict(kf["config"]), str(kf["weights_file"]))
            if kf
            else None,
            weights={str(k): str(v) for k, v in (d.get("weights") or {}).items()},
            config=dict(d.get("config") or {}),
            report=dict(d.get("report") or {}),
            files={
                str(name): FileRecord(int(f["bytes"]), str(f["sha256"]))
                for name, f in files.items()
            },
        )


def bank_info(
    manifest: Manifest,
    *,
    bank_id: str,
    server_version: str,
    key_function_weights: bytes = b"",
    **serving: Any,
) -> BankInfo:
    """The ``BankInfo`` of a bank: what its manifest records, and what the one serving
    it sets in ``serving`` (index_type, max_k, max_batch, search_device, ...; the
    index type and recall default to the manifest's)."""
    kf = manifest.key_function
    recall = manifest.index.recall
    serving.setdefault("index_type", manifest.index.factory)
    serving.setdefault("recall", float(recall.get("value", 0.0)))
    serving.setdefault("recall_k", int(recall.get("k", 0)))
    return BankInfo(
        entries=manifest.entries,
        key_dim=manifest.key_dim,
        value_shape=tuple(manifest.value_shape),
        value_dtype=manifest.value_dtype,
        metric=manifest.metric,
        vision_encoder=manifest.vision_encoder,
        text_encoder=manifest.text_encoder,
        key_function=KeyFunctionSpec(kf.name, kf.config, key_function_weights) if kf else None,
        bank_id=bank_id,
        server_version=server_version,
        **serving,
    )
