"""The wheel works on its own: build it from a copy of the checkout, install it with ``--no-deps`` into a folder outside
the checkout, and run the command line and the shipped configs from that folder with the checkout off ``sys.path``.

No network: the wheel is built with ``--no-build-isolation`` from the venv's own setuptools and wheel (torch and
astunparse pull both into the pinned set), and the dependencies come from the venv's site-packages.

The venv holds an editable install of this checkout, whose ``.pth`` finder would hand out the checkout's
``medmap_fast`` (and any file missing from the wheel) from ``medmap_fast/``. So each child runs with ``-S`` (no
``site``, no ``.pth`` files) and ``-P`` (no script or working folder on ``sys.path``), from a working folder outside
the checkout, with ``PYTHONPATH`` = the wheel's folder, then the venv's site-packages; and asserts that
``medmap_fast`` and every config come from the wheel's folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("demo", "demo_quick", "paper")
# Not copied for the build: environments, build outputs (a stale build/lib would hide a file missing from the
# package list), caches and run folders.
IGNORED = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "wheelhouse", "*.egg-info", "__pycache__",
                                 ".pytest_cache", ".benchmarks", "runs", "*.whl")


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], Path]:
    """(the wheel's install folder, the children's environment, a working folder outside the checkout)."""
    setuptools_version = version("setuptools")  # PackageNotFoundError names it when absent
    assert int(setuptools_version.split(".")[0]) >= 77, (
        f"setuptools {setuptools_version} in {sys.prefix}: pyproject.toml's build-system needs >= 77 "
        "(the build runs without isolation, so from the venv's own)")
    version("wheel")
    tmp = tmp_path_factory.mktemp("packaging")
    src, wheels, site, work = tmp / "src", tmp / "wheels", tmp / "site", tmp / "work"
    shutil.copytree(ROOT, src, ignore=IGNORED)
    work.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "--no-cache-dir"]
    _run(pip + ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(wheels), str(src)], tmp)
    (wheel,) = wheels.glob("medmap_fast-*.whl")
    _run(pip + ["install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)], tmp)

    deps = list(dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib")))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env |= {"PYTHONPATH": os.pathsep.join([str(site), *deps]), "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return site, env, work


def _python(*args: str) -> list[str]:
    # -S: no site, so no .pth file (the editable finder) runs; -P (3.11+): the working folder stays off sys.path
    # (which is outside the checkout anyway: the first test asserts the checkout is not on sys.path)
    return [sys.executable, "-S", *(["-P"] if sys.version_info >= (3, 11) else []), *args]


def test_wheel_ships_the_configs_and_loads_them_outside_the_checkout(installed):
    site, env, work = installed
    assert sorted(p.name for p in (site / "medmap_fast" / "configs").glob("*.yaml")) == [f"{n}.yaml" for n in SHIPPED]
    assert (site / "medmap_fast" / "kernels" / "interface.py").is_file()  # kernels/ installed as medmap_fast.kernels
    assert not (site / "kernels").exists() and not (site / "configs").exists()
    script = textwrap.dedent(f"""
        import sys
        from importlib.metadata import version
        from pathlib import Path

        site, root = Path({str(site)!r}).resolve(), Path({str(ROOT)!r}).resolve()
        assert not any(Path(p or ".").resolve() == root for p in sys.path), sys.path

        import medmap_fast
        from medmap_fast import configs
        from medmap_fast.train.config import load_config
        from medmap_fast.train.demo import configs_dir

        for module in (medmap_fast, medmap_fast.kernels, configs):
            assert Path(module.__file__).resolve().is_relative_to(site), module.__file__
        assert version("medmap-fast") == medmap_fast.__version__, (version("medmap-fast"), medmap_fast.__version__)
        assert configs_dir().resolve() == site / "medmap_fast" / "configs", configs_dir()
        assert configs.names() == {list(SHIPPED)!r}, configs.names()
        for name in configs.names():
            for given in (name, name + ".yaml"):
                path = configs.resolve(given)
                assert path.resolve().is_relative_to(site), path
            config = load_config(configs_dir() / (name + ".yaml"))
            assert config.data.path is None, name
        assert load_config(configs.resolve("paper")).encoder.embed_dim == 48
        try:
            configs.resolve("configs/paper.yaml")  # the checkout's old path: gone
        except FileNotFoundError as err:
            assert "--config paper" in str(err) and "demo, demo_quick, paper" in str(err), err
        else:
            raise AssertionError("configs/paper.yaml resolved")
        print("ok", medmap_fast.__version__)
        """)
    assert _run(_python("-c", script), work, env).startswith("ok ")


def test_wheel_command_line_runs_outside_the_checkout(installed):
    site, env, work = installed
    import medmap_fast

    expected = f"medmap-fast {medmap_fast.__version__}"
    assert _run(_python("-m", "medmap_fast.cli", "--version"), work, env).strip() == expected
    help_text = _run(_python("-m", "medmap_fast.cli", "demo", "--quick", "--help"), work, env)
    assert "--quick" in help_text and "demo_quick" in help_text
    # the console script pip wrote for the wheel (entry point medmap_fast.cli:main)
    script = site / "bin" / "medmap-fast"
    assert script.is_file(), sorted(p.name for p in site.iterdir())
    assert _run(_python(str(script), "--version"), work, env).strip() == expected

    proc = subprocess.run(_python("-m", "medmap_fast.cli", "pretrain", "--config", "papr", "--out", "run"), cwd=work,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "papr: no such file and not a shipped config" in proc.stderr, proc.stderr
    assert "demo, demo_quick, paper" in proc.stderr, proc.stderr
    assert not (work / "run").exists()
