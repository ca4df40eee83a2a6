"""Get a catalog source onto disk, or say exactly how to get it by hand.

Most machines this runs on cannot reach the datasets' hosts (CI, clusters without internet), and
several datasets need a registration anyway. So the first thing ``fetch_source`` does is look for
the dataset where the catalog says it lives; only when it is missing, online, and the catalog has
URLs does it download. When it cannot, ``DatasetUnavailableError`` names the folder to fill and where
the data comes from, which is the actionable part for a person.

Downloads go through pooch (temporary file, then rename; sha256 checked) into
``<data root>/.downloads``. Archives are unpacked by our own small extractors, which refuse any member
that could write outside the target (absolute paths, ``..``, links leaving the tree, device files)
before writing anything, into a temporary folder next to the final root that is renamed into place
only when everything has been extracted: a half-unpacked dataset never looks like a complete one.
"""

from __future__ import annotations

import copy
import hashlib
import os
import posixpath
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import pooch

from reddino.data.sources.catalog import DownloadSpec, SourceSpec, resolve_root

DOWNLOADS_DIR = ".downloads"


class DatasetUnavailableError(RuntimeError):
    """The dataset is not on disk and cannot be fetched now; the message says how to get it."""

    def __init__(self, spec: SourceSpec, root: Path, message: str) -> None:
        super().__init__(message)
        self.name = spec.name
        self.root = root


class UnverifiedDownloadError(ValueError):
    """A download without a known checksum was requested without ``allow_unverified``."""


class DownloadFailedError(ValueError):
    """A download that failed (network, server, checksum) or a cached file that no longer matches."""


class ArchiveLimitError(ValueError):
    """An archive past the member-count, size or compression-ratio caps (a zip bomb, or not a dataset)."""


@dataclass(frozen=True)
class ArchiveLimits:
    """Caps checked on an archive's own listing before anything is written.

    Images compress little (JPEG/PNG already are), so a dataset archive unpacks to about its own size;
    the ratio cap only applies past ``ratio_free_bytes``, since tiny archives of text compress well.
    """

    max_members: int = 2_000_000
    max_total_bytes: int = 1 << 40  # 1 TiB
    max_ratio: float = 100.0
    ratio_free_bytes: int = 64 << 20

    def check(self, archive: Path, members: int, total_bytes: int) -> None:
        if members > self.max_members:
            raise ArchiveLimitError(f"{archive}: {members} members, more than the cap of {self.max_members}")
        if total_bytes > self.max_total_bytes:
            raise ArchiveLimitError(
                f"{archive}: unpacks to {total_bytes} bytes, more than the cap of {self.max_total_bytes}"
            )
        size = max(archive.stat().st_size, 1)
        if total_bytes > self.ratio_free_bytes and total_bytes / size > self.max_ratio:
            raise ArchiveLimitError(
                f"{archive}: {size} bytes unpack to {total_bytes} (ratio {total_bytes / size:.0f}, cap "
                f"{self.max_ratio:.0f}); refused as a likely decompression bomb"
            )


DEFAULT_LIMITS = ArchiveLimits()
HASH_SUFFIX = ".sha256"


class UnsafeArchiveError(ValueError):
    """An archive member that could escape the target folder or is not a plain file/folder/link."""

    def __init__(self, archive: Path | str, member: str, reason: str) -> None:
        super().__init__(f"{archive}: unsafe member {member!r}: {reason}; nothing was extracted")
        self.member = member
        self.reason = reason


# --------------------------------------------------------------------------------------------------
# fetch


def fetch_source(spec: SourceSpec, data_root: Path, *, offline: bool, allow_unverified: bool = False) -> Path:
    """The source's root folder, downloading and unpacking it first if it is missing.

    An existing non-empty root is returned untouched (idempotent; a dataset placed by hand counts).
    Offline, or when the catalog lists no files, a missing dataset raises DatasetUnavailableError.
    Entries without a sha256 are refused unless ``allow_unverified`` (then pooch logs the hash it saw,
    which can be copied into the catalog).
    """
    root = resolve_root(spec, data_root)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{spec.name}: {root} exists but is not a folder")
    if _is_populated(root):
        return root
    if offline or not spec.download:
        raise DatasetUnavailableError(spec, root, unavailable_message(spec, root, offline=offline))
    unverified = [d.url for d in spec.download if d.sha256 is None]
    if unverified and not allow_unverified:
        raise UnverifiedDownloadError(
            f"{spec.name}: no sha256 is recorded for {unverified}, so the download cannot be checked. "
            "Add the checksum to the catalog YAML, or pass allow_unverified=True to download anyway."
        )
    cache = Path(data_root) / DOWNLOADS_DIR
    files = [retrieve(spec, i, entry, cache) for i, entry in enumerate(spec.download)]
    return _install(list(zip(spec.download, files, strict=True)), root)


class ResumableHTTPDownloader:
    """A pooch downloader that continues an interrupted download instead of starting over.

    Bytes go to ``<file>.part`` next to pooch's target; a rerun asks the server for the rest
    (``Range: bytes=<have>-``) and appends when it answers 206, or starts over when it ignores the
    range (200). pooch then checks the sha256 of the whole file and renames it into place.
    """

    def __init__(self, chunk_size: int = 1 << 20, timeout: float = 60.0) -> None:
        self.chunk_size = chunk_size
        self.timeout = timeout

    def __call__(self, url: str, output_file: str | Path, pooch_obj: Any, check_only: bool = False) -> Any:
        import requests  # pooch's own HTTP dependency

        if check_only:
            return requests.head(url, allow_redirects=True, timeout=self.timeout).ok
        part = partial_path(url, Path(output_file))
        have = part.stat().st_size if part.is_file() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        with requests.get(url, headers=headers, stream=True, timeout=self.timeout) as response:
            if response.status_code == 416:  # the part file already holds everything
                response.close()
            else:
                response.raise_for_status()
                mode = "ab" if have and response.status_code == 206 else "wb"
                with open(part, mode) as out:
                    for chunk in response.iter_content(chunk_size=self.chunk_size):
                        out.write(chunk)
        os.replace(part, output_file)  # complete: pooch checks the hash, then renames it into place
        return None


def partial_path(url: str, output_file: Path) -> Path:
    """Where the bytes of an unfinished download of ``url`` wait between runs.

    pooch hands each attempt a fresh temporary name in the cache folder, so the part file is keyed by
    the URL, in that same folder.
    """
    key = hashlib.sha1(url.encode()).hexdigest()[:12]
    return output_file.parent / f".{url_file_name(url)}.{key}.part"


def retrieve(spec: SourceSpec, index: int, entry: DownloadSpec, cache: Path) -> Path:
    """Download one catalog file into ``cache`` with pooch (reused when already there and valid;
    an interrupted download resumes where it stopped).

    Without a catalog sha256, the hash of what was downloaded is kept beside it (``<file>.sha256``) and
    a reused file must still match it, so a cached archive changed after its download is refused.
    """
    import requests

    known_hash = f"sha256:{entry.sha256}" if entry.sha256 else None
    cached = cache / download_name(spec, index, entry)
    if known_hash is None and cached.is_file():
        check_recorded_hash(spec, cached)
    try:
        path = Path(
            pooch.retrieve(
                entry.url,
                known_hash=known_hash,
                fname=cached.name,
                path=cache,
                progressbar=False,
                downloader=ResumableHTTPDownloader(),
            )
        )
    except (ValueError, OSError, requests.RequestException) as exc:  # checksum mismatch is ValueError
        raise DownloadFailedError(f"{spec.name}: download of {entry.url} failed: {exc}") from exc
    record = path.with_name(path.name + HASH_SUFFIX)
    if not record.is_file():
        record.write_text(file_sha256(path) + "\n")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_recorded_hash(spec: SourceSpec, path: Path) -> None:
    """A cached download without a catalog sha256 must match the hash recorded when it was fetched."""
    record = path.with_name(path.name + HASH_SUFFIX)
    if not record.is_file():
        raise DownloadFailedError(
            f"{spec.name}: {path} is cached without a recorded hash ({record.name}), so it cannot be "
            "checked; delete it to download again"
        )
    expected, actual = record.read_text().strip(), file_sha256(path)
    if actual != expected:
        raise DownloadFailedError(
            f"{spec.name}: {path} changed since it was downloaded (sha256 {actual}, recorded {expected}); "
            "delete it to download again"
        )


def download_name(spec: SourceSpec, index: int, entry: DownloadSpec) -> str:
    """Cache file name: unique per source and entry (many GitHub archives are all called HEAD.zip)."""
    return f"{spec.name}-{index}-{url_file_name(entry.url)}"


def url_file_name(url: str) -> str:
    """The last path component of a URL, made safe as a file name."""
    base = PurePosixPath(urlparse(url).path).name or "download"
    return re.sub(r"[^A-Za-z0-9._-]", "_", base)


def unavailable_message(spec: SourceSpec, root: Path, *, offline: bool) -> str:
    """What a person needs to put the dataset in place by hand."""
    why = "offline mode is on" if offline and spec.download else "it cannot be downloaded automatically"
    urls = [d.url for d in spec.download] or [spec.homepage]
    lines = [
        f"Dataset '{spec.name}' ({spec.title}) is not available: {root} is missing or empty and {why}.",
        f"Get it from: {', '.join(urls)}",
        f"How: {spec.access}",
        f"Download it and place/extract it so that {root} holds the dataset files "
        f"(layout: parser {spec.parser}; see conf/data/source/{spec.name}.yaml).",
        f"Licence: {spec.licence}. Cite: {spec.citation}",
    ]
    if offline and spec.download:
        lines.append("Or rerun with downloads enabled (offline=False) on a machine with internet access.")
    return "\n".join(lines)


def _is_populated(root: Path) -> bool:
    return root.is_dir() and any(root.iterdir())


def _install(items: Sequence[tuple[DownloadSpec, Path]], root: Path) -> Path:
    """Unpack every file into a staging folder beside ``root``, then rename it into place."""
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        for entry, file in items:
            target = staging / entry.extract_to
            target.mkdir(parents=True, exist_ok=True)
            unpack(
                file,
                target,
                entry.archive,
                strip_components=entry.strip_components,
                name=url_file_name(entry.url),
            )
        os.chmod(staging, 0o755)  # mkdtemp makes it private
        if root.is_dir():
            root.rmdir()  # empty (checked by the caller); a concurrent fill makes this fail loudly
        os.rename(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root


def unpack(
    file: Path, target: Path, archive: str, *, strip_components: int = 0, name: str | None = None
) -> list[Path]:
    """Unpack (or copy as ``name``, for ``archive: none``) one downloaded file into ``target``."""
    if archive == "zip":
        return safe_extract_zip(file, target, strip_components=strip_components)
    if archive == "tar":
        return safe_extract_tar(file, target, strip_components=strip_components)
    if archive == "none":
        dest = Path(target) / (name or file.name)
        shutil.copy2(file, dest)
        return [dest]
    raise ValueError(f"unknown archive kind {archive!r} for {file}")


# --------------------------------------------------------------------------------------------------
# safe extraction


def _member_dest(archive: Path, name: str, target: Path, strip: int) -> Path | None:
    """Where member ``name`` goes under ``target`` (None: stripped away); raises if it could escape."""
    posix = name.replace("\\", "/")
    if "\x00" in name:
        raise UnsafeArchiveError(archive, name, "NUL byte in the name")
    if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix):
        raise UnsafeArchiveError(archive, name, "absolute path")
    parts = [p for p in posix.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(archive, name, "'..' path component")
    parts = parts[strip:]
    if not parts:
        return None
    dest = target.joinpath(*parts)
    _check_inside(archive, name, dest, target)
    return dest


def _check_inside(archive: Path, name: str, path: Path, target: Path) -> None:
    """Refuse a path that, following links already on disk, ends up outside ``target``."""
    if not path.resolve().is_relative_to(target.resolve()):
        raise UnsafeArchiveError(archive, name, "resolves outside the target folder")


def safe_extract_zip(
    archive: Path, target: Path, *, strip_components: int = 0, limits: ArchiveLimits = DEFAULT_LIMITS
) -> list[Path]:
    """Extract a zip into ``target`` after checking every member; returns the files written.

    Links are refused outright: zipfile would write them as small text files, which is never what a
    dataset means, and they are rare enough in zips that failing loudly is the better default.
    """
    archive, target = Path(archive), Path(target).resolve()
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        limits.check(archive, len(infos), sum(i.file_size for i in infos))
        plan = []
        for info in infos:
            dest = _member_dest(archive, info.filename, target, strip_components)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise UnsafeArchiveError(archive, info.filename, "symbolic link")
            if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise UnsafeArchiveError(archive, info.filename, "device or special file")
            if dest is None and not info.is_dir():
                raise UnsafeArchiveError(
                    archive, info.filename, f"has fewer than {strip_components + 1} path components"
                )
            plan.append((info, dest))
        written = []
        for info, dest in plan:
            if dest is None:
                continue
            if info.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
            written.append(dest)
    return written


def safe_extract_tar(
    archive: Path, target: Path, *, strip_components: int = 0, limits: ArchiveLimits = DEFAULT_LIMITS
) -> list[Path]:
    """Extract a (possibly compressed) tar into ``target`` after checking every member.

    Our checks run first so that errors name the member; tarfile's own ``data`` filter (Python
    3.11.4+) then applies as a second line (it also drops setuid bits and odd permissions).
    """
    archive, target = Path(archive), Path(target).resolve()
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tf:
        listing = tf.getmembers()  # reads the headers only (a compressed tar is decompressed once)
        limits.check(archive, len(listing), sum(m.size for m in listing if m.isfile()))
        checked = [(m.name, _tar_member(archive, m, target, strip_components)) for m in listing]
        members = [c for _, c in checked if c is not None]
        _check_link_traversal(archive, [(name, c) for name, c in checked if c is not None])
        if hasattr(tarfile, "data_filter"):
            tf.extractall(target, members=members, filter="data")
        else:  # pragma: no cover - Python < 3.11.4
            tf.extractall(target, members=members)
    return [target / m.name for m in members if m.isfile()]


def _tar_member(archive: Path, member: tarfile.TarInfo, target: Path, strip: int) -> tarfile.TarInfo | None:
    """A checked copy of ``member`` with the leading components stripped (None: stripped away)."""
    dest = _member_dest(archive, member.name, target, strip)
    if member.ischr() or member.isblk() or member.isfifo() or member.isdev():
        raise UnsafeArchiveError(archive, member.name, "device or special file")
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        raise UnsafeArchiveError(archive, member.name, f"unsupported member type {member.type!r}")
    if dest is None:
        if member.isdir():
            return None
        raise UnsafeArchiveError(archive, member.name, f"has fewer than {strip + 1} path components")
    checked = copy.copy(member)
    checked.name = dest.relative_to(target).as_posix()
    if member.issym():
        _check_symlink(archive, member, dest, target)
    elif member.islnk():
        try:
            link_dest = _member_dest(archive, member.linkname, target, strip)
        except UnsafeArchiveError as exc:
            raise UnsafeArchiveError(
                archive, member.name, f"hard link to {exc.member!r}: {exc.reason}"
            ) from exc
        if link_dest is None:
            raise UnsafeArchiveError(
                archive, member.name, f"hard link to a stripped path {member.linkname!r}"
            )
        checked.linkname = link_dest.relative_to(target).as_posix()
    return checked


def _check_symlink(archive: Path, member: tarfile.TarInfo, dest: Path, target: Path) -> None:
    """A symlink must be relative and point inside ``target`` (lexically and through existing links)."""
    link = member.linkname
    if link.startswith("/") or re.match(r"^[A-Za-z]:", link):
        raise UnsafeArchiveError(archive, member.name, f"symbolic link to absolute path {link!r}")
    lexical = Path(os.path.normpath(dest.parent / link))
    if not lexical.is_relative_to(target) or not lexical.resolve().is_relative_to(target.resolve()):
        raise UnsafeArchiveError(
            archive, member.name, f"symbolic link pointing outside the target ({link!r})"
        )


def _check_link_traversal(archive: Path, members: Sequence[tuple[str, tarfile.TarInfo]]) -> None:
    """Refuse paths that walk through one of the archive's own symlinks.

    Each link can be harmless alone and still redirect what follows (``x -> .`` then ``L -> x/..``
    points above the target, and ``L/evil`` would be written there), which checking members one at
    a time against a disk where the links do not exist yet cannot see. ``members``: (original name,
    checked member with stripped names).
    """
    links = {c.name for _, c in members if c.issym()}
    if not links:
        return
    for original, member in members:
        paths = [member.name]
        if member.islnk():
            paths.append(member.linkname)
            if member.linkname in links:
                raise UnsafeArchiveError(archive, original, f"hard link to symbolic link {member.linkname!r}")
        if member.issym():
            paths.append(posixpath.join(posixpath.dirname(member.name), member.linkname))
        for path in paths:
            via = _link_on_path(path, links)
            if via is not None:
                raise UnsafeArchiveError(archive, original, f"path goes through symbolic link {via!r}")


def _link_on_path(path: str, links: set[str]) -> str | None:
    """The first of ``links`` that ``path`` (relative, '/'-separated) passes through, or None."""
    parts = path.split("/")
    current: list[str] = []
    for index, part in enumerate(parts):
        if part in ("", "."):
            continue
        if part == "..":
            if current:
                current.pop()
            continue
        current.append(part)
        prefix = "/".join(current)
        if index < len(parts) - 1 and prefix in links:
            return prefix
    return None


# What makes one source unavailable without stopping a run (``missing_sources: skip``): not on disk,
# no checksum to trust, a failed or changed download, a refused archive.
SOURCE_FAILURES = (
    DatasetUnavailableError,
    UnverifiedDownloadError,
    DownloadFailedError,
    UnsafeArchiveError,
    ArchiveLimitError,
)
