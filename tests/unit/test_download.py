"""Offline-safe fetching: clear errors offline, real pooch downloads from a localhost server with
sha256 checks, idempotence, and archive extraction that refuses members escaping the target."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.server
import io
import stat
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from reddino.data.sources.catalog import DownloadSpec, SourceSpec
from reddino.data.sources.download import (
    DEFAULT_LIMITS,
    ArchiveLimitError,
    ArchiveLimits,
    DatasetUnavailableError,
    DownloadFailedError,
    UnsafeArchiveError,
    UnverifiedDownloadError,
    fetch_source,
    safe_extract_tar,
    safe_extract_zip,
)

BASE = {
    "name": "toy",
    "title": "Toy smears",
    "citation": "Nobody et al. 2025",
    "licence": "MIT",
    "homepage": "https://example.org/toy",
    "download": [],
    "access": "Ask the toy lab for the toy archive.",
    "modality": "brightfield",
    "stain": "Giemsa",
    "magnification": None,
    "pixel_size_um": None,
    "labels": "none",
    "role": ["pretrain"],
    "root": "toy-smears",
    "units": ["patch"],
    "verified_layout": False,
    "layout": {"parser": "flat", "images": "**/*"},
    "subject": {"from": "image"},
    "source": {"from": "constant"},
}


def make_spec(*downloads: DownloadSpec) -> SourceSpec:
    return dataclasses.replace(SourceSpec.from_mapping(BASE), download=tuple(downloads))


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())


# --------------------------------------------------------------------------------------------------
# a real HTTP server on localhost, so the real pooch path (temp file, rename, sha256) is exercised


@contextlib.contextmanager
def serving(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve on a free localhost port in a thread; yields the base URL."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The folder a localhost server serves; proxies bypassed for localhost."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    folder = tmp_path / "served"
    folder.mkdir()
    return folder


@pytest.fixture
def server(served: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """(base URL, folder it serves, list of request paths)."""
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, *args):  # keep the test output clean
            pass

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

    with serving(Handler) as url:
        yield url, served, requests


GOOD_ZIP = {
    "toy-main/README.md": b"toy",
    "toy-main/images/a.png": b"png-a",
    "toy-main/images/b.png": b"png-b",
}


def test_download_checks_sha256_strips_the_wrapper_and_is_idempotent(server, tmp_path):
    url, served, requests = server
    payload = zip_bytes(GOOD_ZIP)
    (served / "toy.zip").write_bytes(payload)
    spec = make_spec(DownloadSpec(f"{url}/toy.zip", sha256(payload), "zip", ".", strip_components=1))
    data_root = tmp_path / "data"

    root = fetch_source(spec, data_root, offline=False)

    assert root == data_root / "toy-smears"
    assert files_under(root) == ["README.md", "images/a.png", "images/b.png"]
    assert (root / "images" / "a.png").read_bytes() == b"png-a"
    assert (data_root / ".downloads" / "toy-0-toy.zip").read_bytes() == payload
    assert sorted(p.name for p in data_root.iterdir()) == [".downloads", "toy-smears"]  # no staging left
    assert requests == ["/toy.zip"]

    assert fetch_source(spec, data_root, offline=False) == root  # second call: nothing fetched
    assert fetch_source(spec, data_root, offline=True) == root  # and offline is fine once present
    assert requests == ["/toy.zip"]


def test_wrong_checksum_fails_and_leaves_no_dataset(server, tmp_path):
    url, served, _ = server
    (served / "toy.zip").write_bytes(zip_bytes(GOOD_ZIP))
    spec = make_spec(DownloadSpec(f"{url}/toy.zip", "0" * 64, "zip", "."))
    data_root = tmp_path / "data"
    with pytest.raises(ValueError, match=r"toy: download of .*toy\.zip failed"):
        fetch_source(spec, data_root, offline=False)
    assert not (data_root / "toy-smears").exists()
    assert not list(data_root.glob(".toy-smears.partial-*"))


def test_unknown_checksum_needs_allow_unverified(server, tmp_path):
    url, served, requests = server
    (served / "toy.tar.gz").write_bytes(tar_bytes([_file("wrap/images/a.png", b"png-a")], mode="w:gz"))
    spec = make_spec(DownloadSpec(f"{url}/toy.tar.gz", None, "tar", "raw", strip_components=1))
    data_root = tmp_path / "data"
    with pytest.raises(UnverifiedDownloadError, match=r"toy: no sha256 .*allow_unverified=True"):
        fetch_source(spec, data_root, offline=False)
    assert requests == [] and not (data_root / "toy-smears").exists()

    root = fetch_source(spec, data_root, offline=False, allow_unverified=True)
    assert files_under(root) == ["raw/images/a.png"]


def test_offline_error_says_what_where_and_how(tmp_path):
    spec = make_spec(DownloadSpec("https://example.org/toy.zip", None, "zip", "."))
    with pytest.raises(DatasetUnavailableError) as info:
        fetch_source(spec, tmp_path, offline=True)
    message = str(info.value)
    for expected in ("'toy'", str(tmp_path / "toy-smears"), "https://example.org/toy.zip", BASE["access"]):
        assert expected in message
    assert "place/extract" in message and "offline" in message
    assert info.value.name == "toy" and info.value.root == tmp_path / "toy-smears"
    assert not (tmp_path / "toy-smears").exists() and not (tmp_path / ".downloads").exists()


def test_manual_only_source_is_unavailable_even_online(tmp_path):
    (tmp_path / "toy-smears").mkdir()  # an empty folder is not a dataset
    with pytest.raises(DatasetUnavailableError, match=r"cannot be downloaded automatically") as info:
        fetch_source(make_spec(), tmp_path, offline=False)
    assert BASE["homepage"] in str(info.value)


def test_present_dataset_is_returned_without_any_download(tmp_path, monkeypatch):
    (tmp_path / "toy-smears").mkdir()
    (tmp_path / "toy-smears" / "a.png").write_bytes(b"x")

    def no_network(*args, **kwargs):
        raise AssertionError("must not download")

    monkeypatch.setattr("pooch.retrieve", no_network)
    spec = make_spec(DownloadSpec("https://example.org/toy.zip", None, "zip", "."))
    assert fetch_source(spec, tmp_path, offline=False) == tmp_path / "toy-smears"


# --------------------------------------------------------------------------------------------------
# safe extraction: zip


def _zip_with(info: zipfile.ZipInfo, data: bytes = b"x") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("ok/first.txt", b"fine")  # a harmless member before the bad one
        zf.writestr(info, data)
    return buffer.getvalue()


def _zip_info(name: str, mode: int | None = None) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    if mode is not None:
        info.external_attr = mode << 16
    return info


@pytest.mark.parametrize(
    ("info", "data", "reason"),
    [
        (_zip_info("../evil.txt"), b"x", "'..' path component"),
        (_zip_info("ok/../../evil.txt"), b"x", "'..' path component"),
        (_zip_info("/tmp/abs_evil.txt"), b"x", "absolute path"),
        (_zip_info("C:/evil.txt"), b"x", "absolute path"),
        (_zip_info("..\\evil.txt"), b"x", "'..' path component"),
        (_zip_info("link", stat.S_IFLNK | 0o777), b"/etc/passwd", "symbolic link"),
        (_zip_info("dev", stat.S_IFCHR | 0o600), b"", "device or special file"),
    ],
)
def test_zip_with_unsafe_member_is_refused_before_writing(tmp_path, info, data, reason):
    archive = tmp_path / "bad.zip"
    archive.write_bytes(_zip_with(info, data))
    target = tmp_path / "box" / "target"
    with pytest.raises(UnsafeArchiveError, match=reason) as error:
        safe_extract_zip(archive, target)
    assert error.value.member == info.filename and repr(info.filename) in str(error.value)
    assert files_under(tmp_path) == ["bad.zip"]  # nothing written, inside or outside the target


def test_good_zip_extracts_with_strip_components(tmp_path):
    archive = tmp_path / "good.zip"
    archive.write_bytes(
        zip_bytes({"top/": b"", **{k.replace("toy-main", "top"): v for k, v in GOOD_ZIP.items()}})
    )
    written = safe_extract_zip(archive, tmp_path / "out", strip_components=1)
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in written) == [
        "README.md",
        "images/a.png",
        "images/b.png",
    ]


def test_zip_file_above_the_stripped_level_is_refused(tmp_path):
    archive = tmp_path / "flat.zip"
    archive.write_bytes(zip_bytes({"loose.txt": b"x", "top/kept.txt": b"y"}))
    with pytest.raises(UnsafeArchiveError, match=r"'loose\.txt'.*fewer than 2 path components"):
        safe_extract_zip(archive, tmp_path / "out", strip_components=1)


# --------------------------------------------------------------------------------------------------
# safe extraction: tar


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _link(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, b""


def _device(name: str) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    return info, b""


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes]], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (_file("../evil.txt", b"x"), "'..' path component"),
        (_file("/tmp/abs_evil.txt", b"x"), "absolute path"),
        (_link("etc", "/etc", tarfile.SYMTYPE), "symbolic link to absolute path"),
        (_link("up", "../../outside", tarfile.SYMTYPE), "symbolic link pointing outside"),
        (_link("ok/up", "../..", tarfile.SYMTYPE), "symbolic link pointing outside"),
        (_link("hard", "../outside.txt", tarfile.LNKTYPE), "hard link to '../outside.txt': '..' path"),
        (_link("hard", "/etc/passwd", tarfile.LNKTYPE), "hard link to '/etc/passwd': absolute path"),
        (_device("null"), "device or special file"),
    ],
)
def test_tar_with_unsafe_member_is_refused_before_writing(tmp_path, member, reason):
    archive = tmp_path / "bad.tar"
    archive.write_bytes(tar_bytes([_file("ok/first.txt", b"fine"), member]))
    target = tmp_path / "box" / "target"
    with pytest.raises(UnsafeArchiveError, match=reason) as error:
        safe_extract_tar(archive, target)
    assert repr(member[0].name) in str(error.value)
    assert files_under(tmp_path) == ["bad.tar"]  # nothing written, inside or outside the target


def test_good_tar_extracts_files_and_in_tree_links(tmp_path):
    archive = tmp_path / "good.tar.gz"
    archive.write_bytes(
        tar_bytes(
            [
                _file("wrap/data/a.txt", b"A"),
                _link("wrap/alias.txt", "data/a.txt", tarfile.SYMTYPE),
                _link("wrap/copy.txt", "wrap/data/a.txt", tarfile.LNKTYPE),
            ],
            mode="w:gz",
        )
    )
    out = tmp_path / "out"
    written = safe_extract_tar(archive, out, strip_components=1)
    assert [p.relative_to(out).as_posix() for p in written] == ["data/a.txt"]
    assert (out / "alias.txt").is_symlink() and (out / "alias.txt").read_bytes() == b"A"
    assert (out / "copy.txt").read_bytes() == b"A"


def test_tar_links_that_only_escape_together_are_refused(tmp_path):
    """x -> . and L -> x/.. are each inside the target, but together L points to its parent."""
    archive = tmp_path / "chain.tar"
    archive.write_bytes(
        tar_bytes(
            [
                _link("x", ".", tarfile.SYMTYPE),
                _link("L", "x/..", tarfile.SYMTYPE),
                _file("L/evil.txt", b"x"),
            ]
        )
    )
    with pytest.raises(UnsafeArchiveError, match=r"'L'.*goes through symbolic link 'x'"):
        safe_extract_tar(archive, tmp_path / "box" / "target")
    assert files_under(tmp_path) == ["chain.tar"]


def test_plain_file_download_is_copied_under_its_url_name(server, tmp_path):
    url, served, _ = server
    (served / "table.csv").write_bytes(b"file,label\n")
    spec = make_spec(DownloadSpec(f"{url}/table.csv", sha256(b"file,label\n"), "none", "meta"))
    root = fetch_source(spec, tmp_path / "data", offline=False)
    assert files_under(root) == ["meta/table.csv"]


@pytest.fixture
def range_server(served: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """Like ``server`` but honouring ``Range: bytes=N-`` (206 + the tail); records the Range headers."""
    ranges: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            data = (served / self.path.lstrip("/")).read_bytes()
            wanted = self.headers.get("Range")
            ranges.append(wanted or "")
            start = int(wanted.split("=")[1].rstrip("-")) if wanted else 0
            self.send_response(206 if wanted else 200)
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            self.wfile.write(data[start:])

    with serving(Handler) as url:
        yield url, served, ranges


def test_interrupted_download_resumes_from_the_part_file(range_server, tmp_path):
    from reddino.data.sources.download import partial_path

    url, served, ranges = range_server
    payload = zip_bytes(GOOD_ZIP)
    (served / "toy.zip").write_bytes(payload)
    spec = make_spec(DownloadSpec(f"{url}/toy.zip", sha256(payload), "zip", ".", strip_components=1))
    data_root = tmp_path / "data"
    cache = data_root / ".downloads"
    cache.mkdir(parents=True)
    half = len(payload) // 2
    partial_path(f"{url}/toy.zip", cache / "anything").write_bytes(payload[:half])  # an earlier run died here

    root = fetch_source(spec, data_root, offline=False)

    assert ranges == [f"bytes={half}-"]  # only the missing tail was asked for
    assert (cache / "toy-0-toy.zip").read_bytes() == payload
    assert (root / "images" / "b.png").read_bytes() == b"png-b"
    assert not list(cache.glob(".*.part"))


# --------------------------------------------------------------------------------------------------
# caps on what an archive may unpack to, and cached downloads re-checked on reuse


def deflated_zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def test_a_zip_bomb_is_refused_before_anything_is_written(tmp_path):
    archive = tmp_path / "bomb.zip"
    archive.write_bytes(deflated_zip({"a/zeros.bin": bytes(DEFAULT_LIMITS.ratio_free_bytes + (1 << 20))}))
    assert archive.stat().st_size < 200_000  # ~65 MiB of zeros in well under 1 MiB
    with pytest.raises(ArchiveLimitError, match=r"bomb\.zip: .* unpack to .*decompression bomb"):
        safe_extract_zip(archive, tmp_path / "out")
    assert files_under(tmp_path / "out") == []


def test_archive_member_count_and_size_caps(tmp_path):
    archive = tmp_path / "many.zip"
    archive.write_bytes(zip_bytes({f"d/{i}.png": b"x" * 10 for i in range(5)}))
    with pytest.raises(ArchiveLimitError, match="5 members, more than the cap of 4"):
        safe_extract_zip(archive, tmp_path / "out", limits=ArchiveLimits(max_members=4))
    with pytest.raises(ArchiveLimitError, match="unpacks to 50 bytes, more than the cap of 49"):
        safe_extract_zip(archive, tmp_path / "out", limits=ArchiveLimits(max_total_bytes=49))
    tar = tmp_path / "bomb.tar.gz"
    tar.write_bytes(tar_bytes([_file("w/zeros.bin", bytes(4 << 20))], mode="w:gz"))
    with pytest.raises(ArchiveLimitError, match="decompression bomb"):
        safe_extract_tar(tar, tmp_path / "out", limits=ArchiveLimits(ratio_free_bytes=1 << 20))
    assert files_under(tmp_path / "out") == []
    assert len(safe_extract_zip(archive, tmp_path / "ok")) == 5  # within the default caps


def test_a_cached_unverified_download_is_rechecked_on_reuse(server, tmp_path):
    url, served, requests = server
    (served / "toy.zip").write_bytes(zip_bytes(GOOD_ZIP))
    spec = make_spec(DownloadSpec(f"{url}/toy.zip", None, "zip", ".", strip_components=1))
    data_root = tmp_path / "data"
    root = fetch_source(spec, data_root, offline=False, allow_unverified=True)
    cached = data_root / ".downloads" / "toy-0-toy.zip"
    assert (cached.parent / "toy-0-toy.zip.sha256").read_text().strip() == sha256(cached.read_bytes())
    import shutil

    shutil.rmtree(root)
    assert fetch_source(spec, data_root, offline=False, allow_unverified=True) == root  # unchanged: reused
    assert requests == ["/toy.zip"]
    shutil.rmtree(root)
    cached.write_bytes(zip_bytes({"toy-main/images/evil.png": b"swapped"}))
    with pytest.raises(DownloadFailedError, match="changed since it was downloaded"):
        fetch_source(spec, data_root, offline=False, allow_unverified=True)
    (cached.parent / "toy-0-toy.zip.sha256").unlink()
    with pytest.raises(DownloadFailedError, match="without a recorded hash"):
        fetch_source(spec, data_root, offline=False, allow_unverified=True)
    assert not root.exists()


def test_a_failed_download_names_the_source_and_url(tmp_path, served):
    spec = make_spec(DownloadSpec("http://127.0.0.1:9/gone.zip", "0" * 64, "zip", "."))
    with pytest.raises(DownloadFailedError, match=r"toy: download of http://127\.0\.0\.1:9/gone\.zip failed"):
        fetch_source(spec, tmp_path / "data", offline=False)
