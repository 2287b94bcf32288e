"""What writing a Search answer costs the server: the reference answer (B=128, k=5,
values fp16 [128, 5, 32, 96] = 3.9 MB, gathered from a memory-mapped stand-in bank)
written three ways, gather included, median of ``--reps``:

* join: ``bankd.serve.wire`` (values gathered into a new array, the parts joined into
  the bytes gRPC sends: one copy of every byte);
* in place: what bankd 0.1.0 did, reproduced here as the reference: a new bytes object
  from ``PyBytes_FromStringAndSize(NULL, n)`` through ctypes, the values gathered
  straight into it (no copy, but a write into an immutable object; CPython only);
* protobuf: ``Hits.to_pb().SerializeToString()``.

    python bench/wire_write.py                    # B=128, k=5
    python bench/wire_write.py --batch 1024 -k 10 # 63 MB answers

Prints one line per way with its median and its ratio to "in place".
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bankd.search.topk import gather_values
from bankd.serve import wire
from bankd_client.types import Hits

VALUE_SHAPE = (32, 96)


def in_place_bytes(n: int) -> tuple[bytes, memoryview]:
    """0.1.0's way: an uninitialised bytes object and a writable view of its contents."""
    new = ctypes.pythonapi.PyBytes_FromStringAndSize
    new.restype = ctypes.py_object
    new.argtypes = (ctypes.c_char_p, ctypes.c_ssize_t)
    b = new(None, n)
    offset = bytes.__basicsize__ - 1
    return b, memoryview((ctypes.c_char * n).from_address(id(b) + offset)).cast("B")


def write_in_place(parts: list) -> bytes:
    """0.1.0's writer: every part written into the new bytes object where it belongs."""
    out, buf = in_place_bytes(sum(_nbytes(p) for p in parts))
    pos = 0
    for p in parts:
        n = _nbytes(p)
        if isinstance(p, wire.Fill):
            dest = np.frombuffer(buf, dtype=np.dtype(p.dtype), count=n // 2, offset=pos)
            p.fill(dest.reshape(p.shape))
        elif isinstance(p, np.ndarray):
            buf[pos : pos + n] = p.reshape(-1).view(np.uint8).data
        else:
            buf[pos : pos + n] = p
        pos += n
    return out


def _nbytes(p: object) -> int:
    return p.nbytes if isinstance(p, (np.ndarray, wire.Fill)) else len(p)


def cpu_model() -> str:
    """The CPU's model name (Linux), else the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--entries", type=int, default=20_000, help="rows of the stand-in bank")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "values.npy"
        bank = np.lib.format.open_memmap(path, "w+", np.float16, (args.entries, *VALUE_SHAPE))
        bank[:] = rng.standard_normal(bank.shape, dtype=np.float32).astype(np.float16)
        bank.flush()
        values = np.load(path, mmap_mode="r")
        rows = rng.integers(0, args.entries, size=(args.batch, args.k)).astype(np.int64)
        ids = rows + 1000
        scores = rng.standard_normal((args.batch, args.k)).astype(np.float32)
        shape = (args.batch, args.k, *VALUE_SHAPE)

        def parts() -> list:
            fill = wire.Fill(shape, np.float16, lambda out: gather_values(values, rows, out))
            return wire.search_response_parts(ids, scores, "", fill)

        joined = wire.write(parts())
        in_place = write_in_place(parts())
        via_pb = Hits(ids, scores, gather_values(values, rows)).to_pb().SerializeToString()
        assert joined == in_place == via_pb, "the three ways disagree"
        for _ in range(5):  # warm the pages of the bank and the allocator
            wire.write(parts())
        results = {
            "in place (0.1.0, ctypes)": median_ms(lambda: write_in_place(parts()), args.reps),
            "join (bankd.serve.wire)": median_ms(lambda: wire.write(parts()), args.reps),
            "protobuf runtime": median_ms(
                lambda: Hits(ids, scores, gather_values(values, rows)).to_pb().SerializeToString(),
                args.reps,
            ),
        }
    ref = results["in place (0.1.0, ctypes)"]
    print(
        f"Search answer B={args.batch} k={args.k}: {len(joined) / 1e6:.2f} MB, gather included, "
        f"median of {args.reps}; {cpu_model()}, {os.cpu_count()} CPUs, "
        f"Python {sys.version.split()[0]}"
    )
    for name, ms in results.items():
        print(f"  {name:<28} {ms:8.3f} ms  {ms / ref:5.2f}x in place")
    return 0


if __name__ == "__main__":
    sys.exit(main())
