"""Shared fixtures: the bundled demo photos, a small configuration, sockets blocked."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from common.config import REPO_ROOT, load_config
from local_fea.features import ImageFeatures, extract_image

DATA = REPO_ROOT / "data"
DEFAULT_INDEX = load_config()["local_search"]["index"]  # the default: "auto"
SHARED = REPO_ROOT.parent / "shared"
DEVSET = SHARED / "devset"
NO_NETWORK = REPO_ROOT / "tests" / "no_network"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are skipped where torch sees no CUDA device."""
    from common.devices import torch_gpus

    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_tests and not torch_gpus():
        skip = pytest.mark.skip(reason="no CUDA device torch can see")
        for item in gpu_tests:
            item.add_marker(skip)


def demo_references() -> list[Path]:
    return sorted((DATA / "referenceimages").glob("*.jpg"))


def demo_photo(i: int, side: int = 480) -> Image.Image:
    """The ``i``-th demo reference photo, RGB, its long side at most ``side``."""
    with Image.open(demo_references()[i]) as im:
        im = im.convert("RGB")
        im.thumbnail((side, side))
        return im


def described(img: Image.Image, tmp: Path, name: str, query: bool) -> ImageFeatures:
    """The local features of ``img`` saved as a JPEG under ``tmp`` (a query's: both views)."""
    path = tmp / f"{name}.jpg"
    img.save(path, quality=92)
    return extract_image(path, load_config()["local_fea"], mirror=query)


@pytest.fixture
def conf() -> dict:
    """Defaults with small shards (several shards even for a handful of images)."""
    return load_config(overrides=["run.shard_size=4", "run.n_jobs=2"])


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """A folder with six real photos of the demo set."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in demo_references()[:6]:
        shutil.copy(path, folder / path.name)
    return folder


def offline_env() -> dict[str, str]:
    """Environment for a subprocess in which every network connection fails."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(NO_NETWORK), str(REPO_ROOT)])
    return env


def python() -> str:
    return sys.executable


def kill_midway(cmd: list[str], watch: Path, pattern: str, after: int, total: int) -> None:
    """Start ``cmd``, SIGKILL it once ``after`` files matching ``pattern`` exist under
    ``watch``, and check that it really died midway (some but not all ``total`` written)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(watch.rglob(pattern))) < after:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: workers too
    proc.wait()
    done = len(list(watch.rglob(pattern)))
    assert 0 < done < total, f"the kill must land midway ({done} of {total} written)"


@contextlib.contextmanager
def tmpfs(mount: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted on ``mount`` (created) with ``options`` (``size=2m``, ``ro``) for the
    block; the test is skipped where mounting is not allowed (not root, a container)."""
    mount.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill the file system of ``disk`` up to ``leave`` bytes free; return the filler."""
    filler = disk / "filler"
    filler.write_bytes(b"\0" * max(0, shutil.disk_usage(disk).free - leave))
    return filler
