"""Print the runtime requirements of bankd for one image variant, for deploy/Dockerfile.

    python deploy/image_requirements.py pyproject.toml cpu > requirements.txt

The dependencies come from pyproject.toml, so the image installs them in a layer of its
own (source edits do not reinstall them). Two changes: torch is left out, because the
Dockerfile installs it first from the variant's index; and the variant, not the
platform marker, picks the faiss build (pyproject's marker names faiss-gpu on every
Linux x86_64 machine, GPU or not). Python 3.11+ (tomllib).
"""

from __future__ import annotations

import re
import sys

import tomllib

VARIANTS = ("gpu", "cpu")


def requirements(pyproject: dict, variant: str) -> list[str]:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: one of {VARIANTS}")
    out = []
    for dep in pyproject["project"]["dependencies"]:
        match = re.match(r"[A-Za-z0-9_.-]+", dep)
        assert match, dep
        name = match.group(0).lower()
        if name == "torch":
            continue
        if name.startswith("faiss-"):
            if name != f"faiss-{variant}":
                continue
            dep = dep.split(";")[0].strip()
        out.append(dep)
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0], "rb") as f:
        pyproject = tomllib.load(f)
    print("\n".join(requirements(pyproject, argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
