"""Downloads that resume, verify a checksum and extract atomically.

A download writes ``<file>.part`` and asks the server for the missing bytes (HTTP ``Range``)
when the part exists; only a verified file is renamed to its final name. An archive is
extracted into a temporary directory next to its destination and then renamed into place,
so a destination directory either is complete or does not exist.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

__all__ = ["md5sum", "download_file", "extract_tar"]

logger = logging.getLogger(__name__)


def md5sum(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Returns the hex md5 digest of a file, read in chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(
    url: str,
    path: str | Path,
    md5: str | None = None,
    *,
    chunk_size: int = 1 << 20,
    timeout: float = 60.0,
) -> Path:
    """Downloads ``url`` to ``path``, resuming an interrupted download.

    Args:
        url: what to download.
        path: the final file; ``<path>.part`` holds the bytes received so far.
        md5: the published md5 of the file. A mismatch deletes the part (a resume cannot fix
            it) and raises.
        chunk_size: bytes per read.
        timeout: socket timeout in seconds.

    Returns:
        ``path``. If it already exists it is not downloaded again (but is checked if ``md5``).

    Raises:
        ValueError: checksum mismatch (names the file, the expected and the actual md5).
        ConnectionError: the connection ended before the announced size; run again to resume.
    """
    path = Path(path)
    if path.exists():
        if md5 is not None and (actual := md5sum(path)) != md5:
            raise ValueError(
                f"{path} exists but its md5 is {actual}, expected {md5}: delete it to download again"
            )
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    offset = part.stat().st_size if part.exists() else 0

    request = urllib.request.Request(url, headers={"User-Agent": "tta"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not offset:  # 416: nothing left to send, the part is complete
            raise
        response = None
    if response is not None:
        with response:
            if offset and response.status == 206:
                mode = "ab"
                logger.info("resuming %s at byte %d", url, offset)
            else:  # the server ignored the range: start over
                mode, offset = "wb", 0
            length = response.headers.get("Content-Length")
            total = offset + int(length) if length is not None else None
            received = offset
            with open(part, mode) as f, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, desc=path.name, disable=None
            ) as bar:
                while chunk := response.read(chunk_size):
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            if total is not None and received < total:
                raise ConnectionError(
                    f"download of {url} stopped at {received} of {total} bytes; "
                    f"the part is kept in {part}, run again to resume"
                )
    if md5 is not None and (actual := md5sum(part)) != md5:
        part.unlink()
        raise ValueError(
            f"checksum mismatch for {path} downloaded from {url}: md5 {actual}, expected {md5}; "
            "the download was deleted"
        )
    os.replace(part, path)
    return path


def _check_members(archive: Path, members: list[tarfile.TarInfo]) -> None:
    """Rejects members that would land outside the destination (for Pythons without
    ``tarfile.data_filter``)."""
    for m in members:
        name = Path(m.name)
        if name.is_absolute() or ".." in name.parts or not (m.isfile() or m.isdir()):
            raise ValueError(f"{archive}: refusing to extract unsafe member {m.name!r}")


def extract_tar(archive: str | Path, destination: str | Path, member_dir: str) -> Path:
    """Extracts ``archive`` (any tar compression) so that its top directory ``member_dir``
    becomes ``destination / member_dir``, atomically.

    Returns the extracted directory; if it exists already nothing is done.

    Raises:
        ValueError: the archive is truncated or corrupt, or lacks ``member_dir``.
    """
    archive, destination = Path(archive), Path(destination)
    final = destination / member_dir
    if final.is_dir():
        return final
    destination.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{member_dir}.extract-", dir=destination))
    try:
        try:
            with tarfile.open(archive) as tar:
                logger.info("extracting %s to %s", archive, final)
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(tmp, filter="data")
                else:  # pragma: no cover - Python < 3.10.12 / 3.11.4
                    members = tar.getmembers()
                    _check_members(archive, members)
                    tar.extractall(tmp, members=members)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise ValueError(f"cannot extract {archive} (truncated or corrupt?): {e}") from e
        if not (tmp / member_dir).is_dir():
            raise ValueError(f"{archive} has no top directory {member_dir!r}")
        os.replace(tmp / member_dir, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
