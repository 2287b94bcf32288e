"""Print the requirements of bankd for one variant (gpu or cpu), plus any extras.

    python deploy/image_requirements.py pyproject.toml cpu > requirements.txt
    python deploy/image_requirements.py pyproject.toml cpu test   # with the test extra

The dependencies come from pyproject.toml, so deploy/Dockerfile installs them in a
layer of its own (source edits do not reinstall them), and ``make install CPU_ONLY=1``
installs a checkout without the CUDA libraries from the same list. Two changes: torch
is left out, because both install it first from the variant's index; and the variant,
not the platform marker, picks the faiss build (pyproject's marker names faiss-gpu,
which pulls about 1.2 GB of nvidia-* wheels, on every Linux x86_64 machine, GPU or
not). The project itself is then installed with ``pip install --no-deps``.
Python 3.11+ (tomllib).
"""

from __future__ import annotations

import re
import sys

import tomllib

VARIANTS = ("gpu", "cpu")


def requirements(pyproject: dict, variant: str, extras: tuple[str, ...] = ()) -> list[str]:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: one of {VARIANTS}")
    project = pyproject["project"]
    unknown = set(extras) - set(project.get("optional-dependencies", {}))
    if unknown:
        raise ValueError(f"unknown extras {sorted(unknown)}")
    deps = list(project["dependencies"])
    for extra in extras:
        deps += project["optional-dependencies"][extra]
    out = []
    for dep in deps:
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
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0], "rb") as f:
        pyproject = tomllib.load(f)
    print("\n".join(requirements(pyproject, argv[1], tuple(argv[2:]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
