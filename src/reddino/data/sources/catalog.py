"""The catalog of public RBC / blood-smear sources: one ``conf/data/source/<name>.yaml`` per dataset.

Each entry says where a dataset comes from (citation, licence, URLs or how to get it by hand), what it
contains, where it lives under the data root, and how its on-disk layout is read (``layout``, handed
to ``reddino.data.sources.parsers``). Entries are validated strictly when loaded, so a typo in a YAML
fails at once with the file and key named instead of hours later inside a preparation run.

The data root is a single setting, the environment variable ``REDDINO_DATA_ROOT``; each source lives
in ``<data root>/<root>``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from omegaconf import OmegaConf

PARSER_NAMES = frozenset({"folder_per_class", "centre_points", "yolo", "voc", "csv_table", "flat"})
SUBJECT_KINDS = frozenset({"image", "parent", "regex", "column", "constant"})
SOURCE_KINDS = frozenset({"constant", "image_size"})
ROLES = frozenset({"eval", "pretrain"})
UNITS = frozenset({"cell", "patch"})
ARCHIVE_KINDS = frozenset({"zip", "tar", "none"})
URL_SCHEMES = ("https://", "http://", "ftp://", "doi:")  # what pooch can fetch

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "title": str,
    "citation": str,
    "licence": str,
    "homepage": str,
    "download": list,
    "access": str,
    "modality": str,
    "stain": str,
    "magnification": (str, type(None)),
    "pixel_size_um": (int, float, type(None)),
    "labels": str,
    "role": list,
    "root": str,
    "units": list,
    "verified_layout": bool,
    "layout": dict,
    "subject": dict,
    "source": dict,
}
_OPTIONAL: dict[str, type | tuple[type, ...]] = {"notes": str}
_DOWNLOAD_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "url": str,
    "sha256": (str, type(None)),
    "archive": str,
    "extract_to": str,
}
_DOWNLOAD_OPTIONAL: dict[str, type | tuple[type, ...]] = {"strip_components": int}


class CatalogError(ValueError):
    """A catalog entry that does not follow the schema; the message names the file and the key."""


@dataclass(frozen=True)
class DownloadSpec:
    """One file to fetch for a source, and how to unpack it into the source's root.

    ``strip_components`` drops leading folders of every archive member (GitHub archives wrap the
    repository in a ``<repo>-<branch>/`` folder whose name depends on the branch).
    """

    url: str
    sha256: str | None
    archive: str
    extract_to: str = "."
    strip_components: int = 0


@dataclass(frozen=True)
class SourceSpec:
    """One public dataset: provenance, content description, location under the data root, layout."""

    name: str
    title: str
    citation: str
    licence: str
    homepage: str
    download: tuple[DownloadSpec, ...]
    access: str
    modality: str
    stain: str
    magnification: str | None
    pixel_size_um: float | None
    labels: str
    role: tuple[str, ...]
    root: str
    units: tuple[str, ...]
    verified_layout: bool
    layout: dict[str, Any]
    subject: dict[str, Any]
    source: dict[str, Any]
    notes: str = ""

    @property
    def parser(self) -> str:
        """The layout parser's name (``layout["parser"]``)."""
        return str(self.layout["parser"])

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], origin: str = "<mapping>") -> SourceSpec:
        """Validate a plain mapping (one parsed YAML) and build the spec.

        ``origin`` (usually the YAML path) prefixes every error so the broken file is obvious. Unknown
        keys are errors too: a misspelt optional key would otherwise be silently ignored.
        """
        if not isinstance(data, Mapping):
            raise CatalogError(f"{origin}: expected a mapping at the top level, got {type(data).__name__}")
        _check_keys(data, _REQUIRED, _OPTIONAL, origin)
        name = data["name"]
        if not re.fullmatch(r"[a-z0-9_]+", name):
            raise CatalogError(f"{origin}: key 'name': {name!r} must be lower-case letters, digits and _")
        return cls(
            name=name,
            title=data["title"],
            citation=data["citation"],
            licence=data["licence"],
            homepage=data["homepage"],
            download=tuple(
                _download(d, f"{origin}: key 'download[{i}]'") for i, d in enumerate(data["download"])
            ),
            access=data["access"],
            modality=data["modality"],
            stain=data["stain"],
            magnification=data["magnification"],
            pixel_size_um=_pixel_size(data["pixel_size_um"], origin),
            labels=data["labels"],
            role=_choices(data["role"], ROLES, "role", origin),
            root=_relative_path(data["root"], f"{origin}: key 'root'"),
            units=_choices(data["units"], UNITS, "units", origin),
            verified_layout=data["verified_layout"],
            layout=_layout(data["layout"], origin),
            subject=_kind_spec(data["subject"], SUBJECT_KINDS, "subject", origin),
            source=_source(data["source"], origin),
            notes=data.get("notes", ""),
        )


# --------------------------------------------------------------------------------------------------
# validation helpers


def _type_name(expected: type | tuple[type, ...]) -> str:
    types = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def _check_keys(
    data: Mapping[str, Any],
    required: Mapping[str, type | tuple[type, ...]],
    optional: Mapping[str, type | tuple[type, ...]],
    origin: str,
) -> None:
    """Every required key present with its type, optional keys typed, nothing else."""
    missing = [key for key in required if key not in data]
    if missing:
        raise CatalogError(
            f"{origin}: missing key '{missing[0]}'" + (f" (and {missing[1:]})" if missing[1:] else "")
        )
    unknown = sorted(set(map(str, data)) - set(required) - set(optional))
    if unknown:
        raise CatalogError(f"{origin}: unknown key(s) {unknown}; allowed: {sorted({*required, *optional})}")
    for key, expected in {**required, **optional}.items():
        if key not in data:
            continue
        value = data[key]
        # bool is an int subclass: 'true' must not pass as a count or a pixel size.
        wrong_bool = isinstance(value, bool) and bool not in _as_tuple(expected)
        if wrong_bool or not isinstance(value, expected):
            raise CatalogError(
                f"{origin}: key '{key}' must be {_type_name(expected)}, got {type(value).__name__}"
            )


def _as_tuple(expected: type | tuple[type, ...]) -> tuple[type, ...]:
    return expected if isinstance(expected, tuple) else (expected,)


def _choices(values: list[Any], allowed: frozenset[str], key: str, origin: str) -> tuple[str, ...]:
    """A non-empty list drawn from ``allowed`` (order kept, duplicates refused)."""
    if not values:
        raise CatalogError(f"{origin}: key '{key}' must not be empty; allowed: {sorted(allowed)}")
    bad = [v for v in values if v not in allowed]
    if bad or len(set(values)) != len(values):
        raise CatalogError(f"{origin}: key '{key}' has {values}; allowed (once each): {sorted(allowed)}")
    return tuple(values)


def _relative_path(value: str, where: str) -> str:
    """A '/'-separated path that stays inside the folder it is relative to."""
    path = PurePosixPath(value)
    if not value or path.is_absolute() or ".." in path.parts or "\\" in value:
        raise CatalogError(f"{where}: {value!r} must be a relative path without '..'")
    return value


def _pixel_size(value: int | float | None, origin: str) -> float | None:
    if value is None:
        return None
    if not math.isfinite(value) or value <= 0:
        raise CatalogError(f"{origin}: key 'pixel_size_um' must be a positive number or null, got {value}")
    return float(value)


def _download(entry: Any, where: str) -> DownloadSpec:
    if not isinstance(entry, Mapping):
        raise CatalogError(f"{where}: expected a mapping with url/sha256/archive/extract_to")
    _check_keys(entry, _DOWNLOAD_REQUIRED, _DOWNLOAD_OPTIONAL, where)
    url, sha256, archive = entry["url"], entry["sha256"], entry["archive"]
    if not url.startswith(URL_SCHEMES):
        raise CatalogError(f"{where}: key 'url' {url!r} must start with one of {list(URL_SCHEMES)}")
    if sha256 is not None and not _SHA256.match(sha256.lower()):
        raise CatalogError(f"{where}: key 'sha256' must be 64 hex digits or null, got {sha256!r}")
    if archive not in ARCHIVE_KINDS:
        raise CatalogError(f"{where}: key 'archive' must be one of {sorted(ARCHIVE_KINDS)}, got {archive!r}")
    strip = entry.get("strip_components", 0)
    if strip < 0 or (strip and archive == "none"):
        raise CatalogError(f"{where}: key 'strip_components' must be >= 0 and only set for archives")
    return DownloadSpec(
        url=url,
        sha256=sha256.lower() if sha256 else None,
        archive=archive,
        extract_to=_relative_path(entry["extract_to"], f"{where}: key 'extract_to'"),
        strip_components=strip,
    )


def _layout(layout: dict[str, Any], origin: str) -> dict[str, Any]:
    parser = layout.get("parser")
    if parser not in PARSER_NAMES:
        raise CatalogError(
            f"{origin}: key 'layout.parser' must be one of {sorted(PARSER_NAMES)}, got {parser!r}"
        )
    return dict(layout)


def _kind_spec(spec: dict[str, Any], kinds: frozenset[str], key: str, origin: str) -> dict[str, Any]:
    kind = spec.get("from")
    if kind not in kinds:
        raise CatalogError(f"{origin}: key '{key}.from' must be one of {sorted(kinds)}, got {kind!r}")
    if kind == "regex" and not spec.get("pattern"):
        raise CatalogError(f"{origin}: key '{key}.pattern' is required with from: regex")
    if kind == "regex":
        try:
            re.compile(spec["pattern"])
        except re.error as exc:
            raise CatalogError(f"{origin}: key '{key}.pattern' is not a valid regex: {exc}") from exc
    if kind == "constant" and key == "subject" and spec.get("value") in (None, ""):
        raise CatalogError(f"{origin}: key 'subject.value' is required with from: constant")
    return dict(spec)


def _source(spec: dict[str, Any], origin: str) -> dict[str, Any]:
    spec = _kind_spec(spec, SOURCE_KINDS, "source", origin)
    if spec["from"] == "image_size":
        sizes = spec.get("sizes")
        if not isinstance(sizes, dict) or not sizes:
            raise CatalogError(f"{origin}: key 'source.sizes' must map 'WxH' to a sub-source id")
        bad = [k for k in sizes if not re.fullmatch(r"\d+x\d+", str(k))]
        if bad:
            raise CatalogError(f"{origin}: key 'source.sizes' has keys {bad} not of the form 'WxH'")
    return spec


# --------------------------------------------------------------------------------------------------
# loading, locating, tabulating


def load_source(path: Path) -> SourceSpec:
    """One YAML -> SourceSpec; its ``name`` must equal the file stem (the Hydra option name)."""
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as exc:  # OmegaConf/YAML raise a variety of parse errors
        raise CatalogError(f"{path}: cannot parse YAML: {exc}") from exc
    spec = SourceSpec.from_mapping(data, origin=str(path))  # type: ignore[arg-type]
    if spec.name != path.stem:
        raise CatalogError(f"{path}: key 'name' is {spec.name!r} but must equal the file stem {path.stem!r}")
    return spec


def resolve_root(spec: SourceSpec, data_root: Path) -> Path:
    """Where a source lives: ``<data_root>/<spec.root>`` (the root is validated to stay inside)."""
    return Path(data_root) / spec.root
