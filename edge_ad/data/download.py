"""Download and extract the VisA dataset (Amazon, CC BY-NC-SA 4.0).

``download_visa(to)`` fetches ``VisA_20220922.tar`` (about 1.8 GB), checks its SHA-256 and
extracts it into ``to``, which then loads with ``load_dataset(to, "candle", layout="visa")``
(the archive contains ``split_csv/1cls.csv``). Details:

* Sources: ``http(s)://`` URLs are streamed with ``requests`` into ``<name>.part`` next to the
  final file, with a rich progress bar; an interrupted download resumes when the server
  supports ranges. ``file://`` URLs and plain paths to a local archive are read in place (not
  copied): that is the offline route, and how the tests run.
* Checksum: ``VISA_SHA256`` is the value anomalib records for this archive (its VisA
  ``DownloadInfo.hashsum``). ``sha256=None`` skips the check. On a mismatch the downloaded
  file is deleted (a local archive given by the user is left alone).
* Extraction is safe: absolute paths, ``..`` components, links and device files are refused
  (and ``tarfile``'s ``"data"`` filter applies on top). ``split_csv/`` is extracted last, so
  its presence marks a complete extraction; a later call finds it and returns at once.
* The downloaded archive is deleted after a successful extraction unless ``keep_archive``.

Every failure is a one-line :class:`~edge_ad.errors.DownloadError` saying what to do.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import tarfile
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from edge_ad.data.layout import VISA_SPLIT_CSV
from edge_ad.errors import DownloadError

VISA_URL = "https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar"
VISA_SHA256 = "2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362"
"""SHA-256 of ``VisA_20220922.tar`` as recorded by anomalib (``DOWNLOAD_INFO.hashsum`` in
``anomalib/data/datamodules/image/visa.py``)."""
VISA_ARCHIVE_NAME = "VisA_20220922.tar"

CHUNK = 1 << 20
TIMEOUT = (15, 60)  # connect, read (seconds)


_DNS_ERRORS = (
    "name or service not known",
    "nodename nor servname",
    "temporary failure in name resolution",
    "getaddrinfo failed",
    "no address associated",
    "failed to resolve",
)


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reason(exc: BaseException) -> str:
    """A short, human reason for a network error (requests' messages nest several layers)."""
    import requests

    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        r = exc.response
        return f"HTTP {r.status_code} {r.reason or ''}".strip()
    text = str(exc)
    lowered = text.lower()
    if any(s in lowered for s in _DNS_ERRORS):
        return "cannot resolve the host name (DNS)"
    if isinstance(exc, requests.Timeout) or "timed out" in lowered:
        return "the connection timed out"
    match = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if match:
        return match.group(1).strip().rstrip(".")
    return _one_line(text or type(exc).__name__, 160)


def _offline_hint(url: str) -> str:
    name = PurePosixPath(urllib.parse.urlparse(url).path).name or VISA_ARCHIVE_NAME
    return f"offline? download it elsewhere and pass --url file:///path/to/{name}"


def _local_source(url: str) -> Path | None:
    """The local archive a ``file://`` URL or a plain path names, else None (a remote URL)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path)).expanduser()
    if parsed.scheme in ("http", "https"):
        return None
    if parsed.scheme and len(parsed.scheme) > 1:  # 'C:' is a Windows drive, not a scheme
        raise DownloadError(
            f"unsupported URL scheme '{parsed.scheme}' in {url}; use https://, file:// or a path"
        )
    return Path(url).expanduser()


def find_visa_root(folder: str | Path) -> Path | None:
    """The folder holding ``split_csv/1cls.csv``: ``folder`` itself or one sub-folder (an
    archive with a top-level directory). None if VisA is not extracted there."""
    folder = Path(folder)
    if (folder / VISA_SPLIT_CSV).is_file():
        return folder
    if folder.is_dir():
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            if (sub / VISA_SPLIT_CSV).is_file():
                return sub
    return None


@contextmanager
def _progress_bar(enabled: bool, description: str, total: int | None) -> Iterator:
    """Yields ``advance(n_bytes)``; a rich bar with bytes, speed and time left when enabled."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def _sha256_file(path: Path, progress: bool, hasher=None) -> str:
    hasher = hasher or hashlib.sha256()
    total = path.stat().st_size
    with _progress_bar(progress, f"verifying {path.name}", total) as advance, path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            hasher.update(chunk)
            advance(len(chunk))
    return hasher.hexdigest()


def _http_download(url: str, dest: Path, progress: bool) -> str:
    """Stream ``url`` to ``dest`` via ``dest.part`` (resuming it if possible); returns the
    file's SHA-256. Raises DownloadError."""
    import requests

    part = dest.with_name(dest.name + ".part")
    hasher = hashlib.sha256()
    done = part.stat().st_size if part.is_file() else 0
    headers = {"Range": f"bytes={done}-"} if done else {}
    try:
        with requests.get(url, stream=True, timeout=TIMEOUT, headers=headers) as resp:
            if resp.status_code == 416 and done:  # part already complete (or stale): restart
                part.unlink()
                return _http_download(url, dest, progress)
            resp.raise_for_status()
            if done and resp.status_code == 206:
                with part.open("rb") as fh:
                    while chunk := fh.read(CHUNK):
                        hasher.update(chunk)
                mode = "ab"
            else:
                done, mode = 0, "wb"
            length = resp.headers.get("Content-Length")
            total = done + int(length) if length and length.isdigit() else None
            with _progress_bar(progress, f"downloading {dest.name}", total) as advance:
                advance(done)
                with part.open(mode) as fh:
                    for chunk in resp.iter_content(chunk_size=CHUNK):
                        if chunk:
                            fh.write(chunk)
                            hasher.update(chunk)
                            advance(len(chunk))
    except requests.RequestException as exc:
        raise DownloadError(
            f"could not download VisA from {url}: {_reason(exc)}; {_offline_hint(url)}"
        ) from exc
    except OSError as exc:
        raise DownloadError(
            f"could not write {part}: {exc.strerror or exc}; free some disk space or choose "
            "another destination folder"
        ) from exc
    os.replace(part, dest)
    return hasher.hexdigest()


def _escapes(path: str) -> bool:
    """True if a member path is absolute or climbs out of the destination with ``..``."""
    path = path.replace("\\", "/")
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        return True
    return posixpath.normpath(path).split("/")[0] == ".." or ".." in PurePosixPath(path).parts


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    """Refuse members that would land outside the destination, links pointing outside it and
    device/FIFO files. (tarfile's ``"data"`` filter checks the same again.)"""
    name = _one_line(member.name, 120)
    if _escapes(member.name):
        raise DownloadError(
            f"refusing to extract {archive}: member '{name}' would be written outside the "
            "destination folder; the archive is not the official VisA tar"
        )
    if member.issym() or member.islnk():
        base = posixpath.dirname(member.name) if member.issym() else ""
        target = member.linkname
        if target.startswith("/") or _escapes(posixpath.join(base, target)):
            raise DownloadError(
                f"refusing to extract {archive}: link '{name}' points outside the destination "
                "folder; the archive is not the official VisA tar"
            )
    elif not (member.isfile() or member.isdir()):
        raise DownloadError(
            f"refusing to extract {archive}: member '{name}' is a device or special file; the "
            "archive is not the official VisA tar"
        )


def _extract(archive: Path, to: Path, progress: bool) -> None:
    """Safely extract ``archive`` into ``to``, ``split_csv/`` last."""
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member, archive)
            marker = VISA_SPLIT_CSV.parts[0]
            members.sort(key=lambda m: marker in PurePosixPath(m.name).parts)  # stable
            total = sum(m.size for m in members)
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            with _progress_bar(progress, f"extracting {archive.name}", total) as advance:
                for member in members:
                    tar.extract(member, to, **kwargs)
                    advance(member.size)
    except DownloadError:
        raise
    except tarfile.ReadError as exc:
        raise DownloadError(
            f"{archive} is not a readable tar archive ({_one_line(exc, 120)}); delete it and "
            "download again"
        ) from exc
    except tarfile.TarError as exc:  # FilterError and friends: refused by the data filter
        raise DownloadError(
            f"refusing to extract {archive}: {_one_line(exc, 160)}; the archive is not the "
            "official VisA tar"
        ) from exc
    except (OSError, EOFError) as exc:
        raise DownloadError(
            f"could not extract {archive} into {to}: {_one_line(exc, 160)}; check the free disk "
            "space, delete the archive and download again"
        ) from exc


def download_visa(
    to: str | Path,
    url: str = VISA_URL,
    sha256: str | None = VISA_SHA256,
    progress: bool = True,
    keep_archive: bool = False,
) -> Path:
    """Download, verify and extract VisA into ``to``; return the dataset root (the folder
    holding ``split_csv/1cls.csv``, usually ``to`` itself) for ``load_dataset(..., "visa")``.

    Args:
        to: Destination folder (created if missing).
        url: ``https://`` URL, ``file://`` URL or local path of ``VisA_20220922.tar``.
        sha256: Expected SHA-256 of the archive; ``None`` skips the check.
        progress: Show rich progress bars.
        keep_archive: Keep a downloaded archive after extraction (local ones are never
            touched).

    Raises:
        DownloadError: offline/unreachable/HTTP error, checksum mismatch, unsafe or broken
            archive, archive without ``split_csv/1cls.csv``.
    """
    to = Path(to).expanduser()
    existing = find_visa_root(to)
    if existing is not None:
        return existing
    try:
        to.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(
            f"cannot create {to}: {exc.strerror or exc}; choose a writable destination folder"
        ) from exc

    expected = sha256.strip().lower() if sha256 else None
    local = _local_source(url)
    if local is not None:
        if not local.is_file():
            raise DownloadError(
                f"archive {local} not found (from --url {url}); pass the path or file:// URL of "
                f"a downloaded {VISA_ARCHIVE_NAME}"
            )
        archive, downloaded = local, False
        actual = _sha256_file(local, progress) if expected else None
    else:
        name = PurePosixPath(urllib.parse.urlparse(url).path).name or VISA_ARCHIVE_NAME
        archive, downloaded = to / name, True
        if archive.is_file():  # a finished download whose extraction did not complete
            actual = _sha256_file(archive, progress) if expected else None
            if expected and actual != expected:
                archive.unlink()
                actual = _http_download(url, archive, progress)
        else:
            actual = _http_download(url, archive, progress)

    if expected and actual != expected:
        if downloaded:
            archive.unlink(missing_ok=True)
        fix = (
            "deleted it, download again"
            if downloaded
            else "replace the file, or pass its checksum if it is a different release"
        )
        raise DownloadError(
            f"checksum mismatch for {url}: expected sha256 {expected}, got {actual}; the file is "
            f"corrupt or not {VISA_ARCHIVE_NAME} ({fix})"
        )

    _extract(archive, to, progress)
    root = find_visa_root(to)
    if root is None:
        raise DownloadError(
            f"{archive} has no {VISA_SPLIT_CSV.as_posix()}; it is not the VisA archive, pass the "
            f"official {VISA_ARCHIVE_NAME} (--url {VISA_URL})"
        )
    if downloaded and not keep_archive:
        archive.unlink(missing_ok=True)
    return root
