"""Generate the Python stubs of the wire contract; the one place stubs come from.

    python proto/generate.py            # writes client/proto/bankd_pb2{,_grpc}.py{,i}

The stubs live in the ``bankd_client.proto`` package. protoc writes absolute imports
(``from bankd.v1 import bankd_pb2``) that would collide with the ``bankd`` server
package, so the import in the grpc stub is rewritten to a relative one. The test
``tests/client/test_proto_stubs.py`` regenerates into a temporary folder and fails
when the committed stubs differ.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILE = "bankd/v1/bankd.proto"
STUB_DIR = PROTO_ROOT.parent / "client" / "proto"
STUB_NAMES = ("bankd_pb2.py", "bankd_pb2.pyi", "bankd_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (grpcio-tools) on the contract and write the stubs into out_dir."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(PROTO_ROOT / PROTO_FILE),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_FILE}")
        written = []
        for name in STUB_NAMES:
            text = (Path(tmp) / "bankd" / "v1" / name).read_text()
            text = text.replace("from bankd.v1 import bankd_pb2", "from . import bankd_pb2")
            target = out_dir / name
            target.write_text(text)
            written.append(target)
    return written


def main() -> int:
    for path in generate(STUB_DIR):
        print(f"wrote {path.relative_to(PROTO_ROOT.parent)}")
    init = STUB_DIR / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated gRPC stubs of proto/bankd/v1/bankd.proto (do not edit)."""\n')
    return 0


if __name__ == "__main__":
    sys.exit(main())
