"""The demo data and a bank built from it, for the benchmarks that train or answer
(``train_step.py``, ``overhead.py``): made once in a work folder and reused while the
settings that made them stay the same.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bankd.build.config import BuildConfig
from bankd.build.demo_data import DemoDataConfig, generate
from bankd.build.pipeline import build_bank
from bankd.store.manifest import Manifest
from bankd.store.paths import BankPaths


def demo_data(
    workdir: Path,
    data: str | Path | None,
    image_folder: str | Path | None,
    *,
    n: int,
    log: Callable[[str], None],
) -> tuple[Path, Path]:
    """(data JSON, image folder): the given ones, else ``n`` demo pairs under ``workdir``."""
    if data is None:
        data, image_folder = workdir / "data" / "data.json", workdir / "data"
        if not Path(data).is_file():
            log(f"generating {n} demo pairs in {image_folder}")
            generate(DemoDataConfig(out=Path(image_folder), n=n, heldout=0), progress=False)
    data = Path(data)
    return data, Path(image_folder or data.parent)


def demo_bank(
    workdir: Path,
    data: Path,
    image_folder: Path,
    *,
    encoder: str = "tiny",
    perceiver_steps: int,
    seed: int = 0,
    device: str = "auto",
    log: Callable[[str], None],
) -> Path:
    """``workdir/bank/bank.faiss`` built from ``data``, reused when its manifest says it
    was built from the same data, encoder, Perceiver steps and seed."""
    index = workdir / "bank" / "bank.faiss"
    manifest = BankPaths(index).manifest
    wanted = {
        "data": str(data),
        "encoder": encoder,
        "perceiver_steps": perceiver_steps,
        "seed": seed,
    }
    if manifest.is_file():
        built = Manifest.from_json(manifest.read_bytes(), where=manifest).config
        if all(built.get(key) == value for key, value in wanted.items()):
            log(f"reusing the bank {index}")
            return index
    log(f"building a bank from {data} ({perceiver_steps} Perceiver steps)")
    build_bank(
        BuildConfig(
            data=data,
            image_folder=image_folder,
            out=index,
            encoder=encoder,
            seed=seed,
            perceiver_steps=perceiver_steps,
            eval_fraction=0.0,
            workers=0,
            device=device,
            progress=False,
        )
    )
    return index
