"""Bank: the one interface of a memory bank, remote or in process.

    from bankd_client import Bank

    def top_values(bank: Bank, keys) -> ...:      # keys [B, d]
        with bank:
            bank.wait_ready()
            return bank.search(keys, k=5).values   # [B, 5, 32, 96] fp16

``BankClient`` (one bankd), ``ShardedBankClient`` (S shards searched as one) and
``bankd.search.local.LocalBank`` (the bank's files searched in this process) implement it,
so code written against ``Bank`` runs on any of them. Each may offer more (keyword
options such as the sharded client's ``window``, ``embed`` where a server holds the
encoder), but never less: ``conformance`` names where a class falls short, and the
tests run it on all three.

The protocol is structural (``typing.Protocol``): the three do not inherit from it,
and ``isinstance(x, Bank)`` checks method names only; ``conformance`` also checks
the parameters.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

from .identity import EncoderFingerprint
from .types import BankInfo, Hits


@runtime_checkable
class Bank(Protocol):
    """What every memory bank answers: its description, top-k search (one batch or a
    stream of them), values by entry id, the encoder check, and its lifecycle.

    Arguments and results are those of ``BankClient``'s methods of the same names:
    numpy in, numpy out; torch in, torch out; failures are ``bankd_client.errors``.
    """

    def info(self, *, timeout: float | None = None, refresh: bool = False) -> BankInfo:
        """Entries, key dim, value shape, encoder fingerprints, key function, limits."""
        ...

    def search(
        self,
        keys: Any,
        k: int = 5,
        *,
        exclude_ids: Any = None,
        with_values: bool = True,
        timeout: float | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> Hits:
        """Top-k entries for each of B query keys [B, d]; exclude_ids: B lists of ids."""
        ...

    def stream_search(
        self,
        queries: Iterable[Any],
        k: int = 5,
        *,
        with_values: bool = True,
        timeout: float | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> Iterator[Hits]:
        """Hits of each batch (keys [B, d] or ``SearchQuery``), in input order."""
        ...

    def fetch(self, ids: Any, *, with_keys: bool = False, timeout: float | None = None) -> Any:
        """Values [n, 32, 96] fp16 of entries by id (and keys [n, d] with with_keys)."""
        ...

    def check_encoder(
        self, encoder: Any, *, allow_mismatch: bool = False, model_id: str | None = None
    ) -> EncoderFingerprint:
        """EncoderMismatch unless the encoder is the bank's (or allow_mismatch)."""
        ...

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the bank answers searches (Unavailable after timeout seconds)."""
        ...

    def close(self) -> None:
        """Release connections and shared memory; the bank is unusable afterwards."""
        ...

    def __enter__(self) -> Bank: ...

    def __exit__(self, *exc: object) -> None: ...


# Dunder methods that are part of the interface (the context manager); the rest of a
# class's dunders (__init__, __subclasshook__, ...) are not.
_DUNDERS = {"__enter__", "__exit__"}


def protocol_methods(protocol: type = Bank) -> list[str]:
    """The methods a protocol declares, in declaration order."""
    return [
        name
        for name, member in vars(protocol).items()
        if inspect.isfunction(member) and (not name.startswith("_") or name in _DUNDERS)
    ]


def conformance(cls: type, protocol: type = Bank) -> list[str]:
    """Where ``cls`` falls short of ``protocol``; empty when it implements it.

    Each declared method must exist and accept every parameter the protocol's does,
    of the same kind (positional or keyword-only) and with the same default, so any
    call written against the protocol works. Extra parameters are allowed when they
    have defaults (or are ``*args`` / ``**kwargs``).
    """
    problems = []
    for name in protocol_methods(protocol):
        impl = inspect.getattr_static(cls, name, None)
        if impl is None:
            problems.append(f"{cls.__name__} has no {name}()")
            continue
        if not callable(impl):
            problems.append(f"{cls.__name__}.{name} is not a method")
            continue
        want = inspect.signature(vars(protocol)[name])
        have = inspect.signature(impl)
        problems += [f"{cls.__name__}.{name}: {p}" for p in _signature_gaps(want, have)]
    return problems


def _signature_gaps(want: inspect.Signature, have: inspect.Signature) -> list[str]:
    """How ``have`` fails to accept every call that ``want`` accepts."""
    gaps = []
    params = have.parameters
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    var_pos = any(p.kind is p.VAR_POSITIONAL for p in params.values())
    for name, p in want.parameters.items():
        q = params.get(name)
        if p.kind is p.VAR_POSITIONAL:
            if not var_pos:
                gaps.append(f"takes no *{name}")
            continue
        if q is None:
            if not (p.kind is p.KEYWORD_ONLY and var_kw):
                gaps.append(f"has no parameter {name!r}")
            continue
        if q.kind is not p.kind and not (
            q.kind is q.POSITIONAL_OR_KEYWORD and p.kind is p.KEYWORD_ONLY
        ):
            gaps.append(f"{name!r} is {q.kind.description}, not {p.kind.description}")
        if p.default is not p.empty and q.default != p.default:
            shown = "none" if q.default is q.empty else repr(q.default)
            gaps.append(f"{name!r} defaults to {shown}, not {p.default!r}")
    positional = [n for n, p in want.parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    theirs = [n for n, q in params.items() if q.kind is q.POSITIONAL_OR_KEYWORD]
    if theirs[: len(positional)] != positional:
        gaps.append(f"positional parameters {theirs}, not {positional}")
    for name, q in params.items():
        if name not in want.parameters and q.default is q.empty:
            if q.kind in (q.POSITIONAL_OR_KEYWORD, q.KEYWORD_ONLY):
                gaps.append(f"requires {name!r}, which the protocol does not pass")
    return gaps
