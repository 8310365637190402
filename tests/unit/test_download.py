"""VisA download, offline: a tiny fake VisA tar served through file:// URLs and local paths."""

from __future__ import annotations

import hashlib
import io
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_ad.data import load_dataset
from edge_ad.data.download import VISA_SHA256, VISA_URL, download_visa, find_visa_root
from edge_ad.errors import DownloadError


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def make_fake_visa(path: Path, extra: dict[str, bytes] | None = None, prefix: str = "") -> Path:
    """A VisA-like tar: object 'candle' with 3 normal (2 train, 1 test) and 2 anomalous images,
    their masks (values 0/1) and split_csv/1cls.csv."""
    rows = ["object,split,label,image,mask"]
    with tarfile.open(path, "w") as tar:
        for i in range(3):
            rel = f"candle/Data/Images/Normal/{i:04d}.JPG"
            _add(tar, prefix + rel, _png(np.full((12, 16, 3), 30 * i, np.uint8)))
            rows.append(f"candle,{'train' if i < 2 else 'test'},normal,{rel},")
        for i in range(2):
            rel = f"candle/Data/Images/Anomaly/{i:03d}.JPG"
            mrel = f"candle/Data/Masks/Anomaly/{i:03d}.png"
            mask = np.zeros((12, 16), np.uint8)
            mask[2:6, 3:9] = 1
            _add(tar, prefix + rel, _png(np.full((12, 16, 3), 200, np.uint8)))
            _add(tar, prefix + mrel, _png(mask))
            rows.append(f"candle,test,anomaly,{rel},{mrel}")
        _add(tar, prefix + "split_csv/1cls.csv", ("\n".join(rows) + "\n").encode())
        for name, data in (extra or {}).items():
            _add(tar, name, data)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_published_checksum_is_a_sha256() -> None:
    assert VISA_URL.endswith("/VisA_20220922.tar")
    assert VISA_SHA256 is not None and len(VISA_SHA256) == 64
    int(VISA_SHA256, 16)


def test_download_from_file_url_then_load(tmp_path: Path) -> None:
    archive = make_fake_visa(tmp_path / "VisA_20220922.tar")
    dest = tmp_path / "visa"
    root = download_visa(dest, url=archive.as_uri(), sha256=sha256(archive), progress=False)
    assert root == dest and (dest / "split_csv" / "1cls.csv").is_file()
    assert archive.is_file()  # a local source archive is never deleted
    ds = load_dataset(root, "candle", layout="visa")
    assert len(ds.train) == 2 and len(ds.test) == 3
    assert sum(s.label for s in ds.test) == 2
    assert all(s.mask_path is not None for s in ds.test if s.label == 1)
    assert load_dataset(root, "candle").layout == "visa"

    # Idempotent: already extracted -> returns at once, even with a bogus URL.
    stamp = (dest / "split_csv" / "1cls.csv").stat().st_mtime_ns
    time.sleep(0.01)
    assert download_visa(dest, url="http://127.0.0.1:9/VisA.tar", progress=False) == dest
    assert (dest / "split_csv" / "1cls.csv").stat().st_mtime_ns == stamp


def test_plain_path_with_top_level_folder_and_no_checksum(tmp_path: Path) -> None:
    archive = make_fake_visa(tmp_path / "visa.tar", prefix="VisA_20220922/")
    root = download_visa(tmp_path / "out", url=str(archive), sha256=None, progress=False)
    assert root == tmp_path / "out" / "VisA_20220922"
    assert find_visa_root(tmp_path / "out") == root
    assert len(load_dataset(root, "candle", layout="visa").train) == 2


def test_checksum_mismatch_raises_and_extracts_nothing(tmp_path: Path) -> None:
    archive = make_fake_visa(tmp_path / "VisA_20220922.tar")
    dest = tmp_path / "visa"
    with pytest.raises(DownloadError, match="checksum mismatch") as err:
        download_visa(dest, url=archive.as_uri(), sha256="0" * 64, progress=False)
    assert "\n" not in str(err.value)
    assert not (dest / "split_csv").exists() and not (dest / "candle").exists()
    assert not list(dest.glob("*.part"))
    assert archive.is_file()


def test_unreachable_url_raises_one_line_download_error(tmp_path: Path) -> None:
    url = "http://127.0.0.1:9/VisA_20220922.tar"  # discard port: nothing listens there
    start = time.monotonic()
    with pytest.raises(DownloadError) as err:
        download_visa(tmp_path / "visa", url=url, progress=False)
    msg = str(err.value)
    assert url in msg and "file://" in msg and "\n" not in msg
    assert time.monotonic() - start < 30
    assert not list((tmp_path / "visa").glob("*.part"))
    assert not list((tmp_path / "visa").glob("*.tar"))


def test_missing_local_archive(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=r"nowhere\.tar not found"):
        download_visa(tmp_path / "visa", url=(tmp_path / "nowhere.tar").as_uri(), progress=False)


def test_not_a_tar(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar archive" * 100)
    with pytest.raises(DownloadError, match="not a readable tar"):
        download_visa(tmp_path / "visa", url=str(junk), sha256=None, progress=False)


def test_archive_without_split_csv(tmp_path: Path) -> None:
    archive = tmp_path / "other.tar"
    with tarfile.open(archive, "w") as tar:
        _add(tar, "candle/a.png", _png(np.zeros((4, 4, 3), np.uint8)))
    with pytest.raises(DownloadError, match=r"split_csv/1cls\.csv"):
        download_visa(tmp_path / "visa", url=str(archive), sha256=None, progress=False)


@pytest.mark.parametrize("evil", ["../evil.txt", "/tmp/edge_ad_evil_abs.txt", "a/../../evil.txt"])
def test_path_traversal_is_refused(tmp_path: Path, evil: str) -> None:
    archive = make_fake_visa(tmp_path / "evil.tar", extra={evil: b"pwned"})
    dest = tmp_path / "sub" / "visa"
    with pytest.raises(DownloadError, match="refusing to extract"):
        download_visa(dest, url=archive.as_uri(), sha256=sha256(archive), progress=False)
    assert not (tmp_path / "sub" / "evil.txt").exists()
    assert not (tmp_path / "evil.txt").exists()
    assert not Path("/tmp/edge_ad_evil_abs.txt").exists()
    assert find_visa_root(dest) is None


def test_symlink_member_is_refused(tmp_path: Path) -> None:
    archive = make_fake_visa(tmp_path / "link.tar")
    with tarfile.open(archive, "a") as tar:
        info = tarfile.TarInfo("candle/link")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(DownloadError, match="points outside"):
        download_visa(tmp_path / "visa", url=str(archive), sha256=None, progress=False)


@pytest.fixture
def http_server(tmp_path: Path):
    """A local HTTP server (no internet needed) serving tmp_path/www; yields its base URL."""
    import functools
    import http.server
    import threading

    www = tmp_path / "www"
    www.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", www
    finally:
        server.shutdown()
        server.server_close()


def test_http_download_verify_extract_and_cleanup(tmp_path: Path, http_server) -> None:
    base, www = http_server
    archive = make_fake_visa(www / "VisA_20220922.tar")
    dest = tmp_path / "visa"
    dest.mkdir()
    (dest / "VisA_20220922.tar.part").write_bytes(b"stale partial download")  # no Range: restart
    root = download_visa(
        dest, url=f"{base}/VisA_20220922.tar", sha256=sha256(archive), progress=True
    )
    assert root == dest and len(load_dataset(root, "candle").test) == 3
    assert not list(dest.glob("*.tar*"))  # the archive and its .part are removed


def test_http_checksum_mismatch_deletes_the_download(tmp_path: Path, http_server) -> None:
    base, www = http_server
    make_fake_visa(www / "VisA_20220922.tar")
    dest = tmp_path / "visa"
    with pytest.raises(DownloadError, match="checksum mismatch"):
        download_visa(dest, url=f"{base}/VisA_20220922.tar", sha256="1" * 64, progress=False)
    assert not list(dest.glob("*.tar*")) and not (dest / "split_csv").exists()


def test_http_404_is_a_download_error(tmp_path: Path, http_server) -> None:
    base, _ = http_server
    with pytest.raises(DownloadError, match=r"HTTP 404.*file://") as err:
        download_visa(tmp_path / "visa", url=f"{base}/missing.tar", progress=False)
    assert f"{base}/missing.tar" in str(err.value)
    assert not list((tmp_path / "visa").glob("*.part"))


def test_links_inside_the_archive_are_allowed(tmp_path: Path) -> None:
    archive = make_fake_visa(tmp_path / "inner.tar")
    with tarfile.open(archive, "a") as tar:
        info = tarfile.TarInfo("candle/alias.JPG")
        info.type = tarfile.SYMTYPE
        info.linkname = "Data/Images/Normal/0000.JPG"
        tar.addfile(info)
        fifo = tarfile.TarInfo("candle/pipe")
        fifo.type = tarfile.FIFOTYPE
    root = download_visa(tmp_path / "visa", url=str(archive), sha256=None, progress=False)
    assert (root / "candle" / "alias.JPG").is_file()
    with tarfile.open(archive, "a") as tar:
        tar.addfile(fifo)
    with pytest.raises(DownloadError, match="special file"):
        download_visa(tmp_path / "visa2", url=str(archive), sha256=None, progress=False)
