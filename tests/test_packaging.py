"""A plain wheel install (not editable) gives working imports and the bankd command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_install_gives_imports_and_command(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
    )
    wheels = list(dist.glob("bankd-*.whl"))
    assert len(wheels) == 1, wheels
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    # The dependencies come from this interpreter's site-packages, added by a .pth file
    # (which adds the folder to sys.path without running the editable-install hooks in
    # it); only the project itself is installed from the wheel.
    site_dir = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    deps = [p for p in sys.path if p.endswith("site-packages")]
    Path(site_dir, "zz_deps.pth").write_text("\n".join(deps) + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "--no-deps",
            "-q",
            str(wheels[0]),
        ],
        check=True,
        capture_output=True,
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = (
        "import bankd, bankd_client, tinyalign, bankd.store, bankd_client.proto.bankd_pb2;"
        "import bankd.models.keys, tinyalign.model;"
        "import bankd.search.flat_kernel;"
        "print(bankd.__file__, bankd_client.__file__, tinyalign.__file__,"
        "      'kernel', bankd.search.flat_kernel.available())"
    )
    out = subprocess.run(
        [str(py), "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path, env=env
    ).stdout
    assert str(ROOT) not in out and "site-packages" in out, out
    # The wheel carries the flat-search kernel wherever this checkout built one.
    from bankd.search import flat_kernel

    assert out.split()[-1] == str(flat_kernel.available()), out
    help_text = subprocess.run(
        [str(env_dir / "bin" / "bankd"), "--help"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    ).stdout
    for command in ("demo-data", "build", "serve", "info", "query"):
        assert command in help_text


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_install_cpu_only_leaves_out_the_cuda_build(tmp_path: Path) -> None:
    """`make install CPU_ONLY=1` installs the cpu list and the project without its
    declared dependencies; the default install is unchanged (make -n: nothing runs)."""

    def plan(*args: str) -> str:
        argv = ["make", "-n", "-C", str(ROOT), "install", f"VENV={tmp_path / 'venv'}", *args]
        return subprocess.run(argv, check=True, capture_output=True, text=True).stdout

    cpu = plan("CPU_ONLY=1")
    assert "image_requirements.py pyproject.toml cpu test" in cpu
    assert "pip install -q --no-deps -e ." in cpu and '".[test]"' not in cpu
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in cpu
    default = plan()
    assert 'pip install -q -e ".[test]"' in default
    assert "image_requirements" not in default and "extra-index-url" not in default
