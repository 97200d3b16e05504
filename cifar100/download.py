"""Downloading the official CIFAR archives: md5-checked, extracted with bounds, into an empty folder."""

from __future__ import annotations

import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from cifar100.data import ARCHIVES, CIFAR10_FILES, CIFAR100_FILES, holds_files, md5sum
from cifar100.errors import DatasetError

MAX_ARCHIVE_MEMBERS = 100  # the official archives hold 5 (CIFAR-100) and 9 (CIFAR-10)
MAX_EXTRACTED_BYTES = 1 << 30  # they extract to ~180 MB


def _extract(archive: Path, target: Path, url: str) -> None:
    """Extract a downloaded archive of plain files and folders, bounded in count and total size; links,
    devices and anything else are refused before a byte is written."""
    with tarfile.open(archive) as tar:
        members = []
        for member in tar:
            if len(members) == MAX_ARCHIVE_MEMBERS:
                raise DatasetError(f"{url}: the archive holds more than {MAX_ARCHIVE_MEMBERS} entries; nothing "
                                   "was extracted")
            if not (member.isfile() or member.isdir()):
                raise DatasetError(f"{url}: the archive holds '{member.name}', which is not a plain file or "
                                   "folder (a link or device); nothing was extracted")
            members.append(member)
        size = sum(member.size for member in members)
        if size > MAX_EXTRACTED_BYTES:
            raise DatasetError(f"{url}: the archive would extract to {size} bytes, more than the "
                               f"{MAX_EXTRACTED_BYTES} allowed; nothing was extracted")
        tar.extractall(target, members=members, filter="data")


def fetch(path: str | Path = "cifar-100-python", kind: str = "cifar100", url: str | None = None,
          timeout: float = 20.0) -> Path:
    """Download the official archive, check its md5 and extract it into `path`.

    Without a network it fails within `timeout` seconds (plus name lookup), saying where to put the files.
    """
    from tqdm.auto import tqdm

    path = Path(path)
    default_url, expected_md5, folder = ARCHIVES[kind]
    url = url or default_url
    if holds_files(path):
        raise DatasetError(f"{path} already holds files: download into an empty or new folder (nothing was "
                           "changed)")
    blocking = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise DatasetError(f"{blocking}: a file, where a folder is needed to download into {path} (nothing was "
                           "downloaded)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".download-") as tmp:
        archive = Path(tmp) / "archive.tar.gz"
        started = time.monotonic()
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(archive, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {kind}") as bar:
                    for chunk in iter(lambda: response.read(1 << 20), b""):
                        out.write(chunk)
                        bar.update(len(chunk))
        except (urllib.error.URLError, OSError) as exc:
            waited = time.monotonic() - started
            extract = f"tar xzf {Path(default_url).name} -C {path.parent}"
            if path.name != folder:
                extract += f" && mv {path.parent / folder} {path}"
            raise DatasetError(
                f"could not download {url} ({type(exc).__name__}: {getattr(exc, 'reason', exc)}, after "
                f"{waited:.1f} s). No network? Download the archive on a machine that has one and extract "
                f"it so that {path}/ holds the files "
                f"{list(CIFAR100_FILES if kind == 'cifar100' else CIFAR10_FILES)}: {extract}") from None
        found = md5sum(archive)
        if found != expected_md5:
            raise DatasetError(f"{url}: md5 mismatch of the downloaded archive: expected {expected_md5}, "
                               f"found {found}. Nothing was extracted; try again.")
        _extract(archive, Path(tmp), url)
        extracted = Path(tmp) / folder
        if not extracted.is_dir():
            raise DatasetError(f"{url}: the archive holds no '{folder}/' folder")
        path.mkdir(parents=True, exist_ok=True)
        for item in extracted.iterdir():
            shutil.move(str(item), str(path / item.name))
    return path
