"""The source catalog: all 18 YAMLs load and validate; the 3 local datasets' layouts match the disk."""

from __future__ import annotations

import inspect
import os
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from reddino.data.sources.catalog import (
    PARSER_NAMES,
    CatalogError,
    SourceSpec,
    load_source,
    resolve_root,
)

SOURCE_DIR = Path(__file__).resolve().parents[2] / "conf" / "data" / "source"
LOCAL = {"chula_rbc12", "txl_pbc", "bccd"}  # present under /work/shared/datasets, layouts checked there


@pytest.fixture(scope="module")
def catalog() -> dict[str, SourceSpec]:
    specs = [load_source(path) for path in sorted(SOURCE_DIR.glob("*.yaml"))]
    return {spec.name: spec for spec in specs}


def _raw(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(SOURCE_DIR / f"{name}.yaml"))


def _write(tmp_path: Path, data: dict, stem: str = "chula_rbc12") -> Path:
    path = tmp_path / f"{stem}.yaml"
    OmegaConf.save(OmegaConf.create(data), path)
    return path


def test_eighteen_sources_load_with_names_equal_to_file_stems(catalog):
    assert len(catalog) == 18
    assert sorted(catalog) == sorted(p.stem for p in SOURCE_DIR.glob("*.yaml"))
    assert all(spec.name == name for name, spec in catalog.items())
    assert len({s.root for s in catalog.values()}) == 18


def test_every_parser_is_known_and_its_options_bind(catalog):
    from reddino.data.sources.parsers import PARSERS

    assert set(PARSERS) == PARSER_NAMES
    for spec in catalog.values():
        options = {k: v for k, v in spec.layout.items() if k != "parser"}
        inspect.signature(PARSERS[spec.parser]).bind(Path("."), **options)  # raises on a typo


def test_only_the_local_datasets_claim_a_verified_layout(catalog):
    assert {n for n, s in catalog.items() if s.verified_layout} == LOCAL


def test_paper_test_sets_are_eval_sources(catalog):
    assert {n for n, s in catalog.items() if "eval" in s.role} == {"elsafty", "chula_rbc12", "dse"}


def test_txl_pbc_sources_come_from_image_size(catalog):
    source = catalog["txl_pbc"].source
    assert source["from"] == "image_size"
    assert source["sizes"] == {
        "640x480": "bccd",
        "416x416": "bcd",
        "360x363": "pbc",
        "366x369": "pbc",
        "575x575": "raabin",
    }


@pytest.mark.parametrize(
    ("name", "relative_path", "subject"),
    [
        ("elsafty", "Teardrop/Slide 12 (1,93,472,116,497).png", "12"),
        ("nih_malaria", "cell_images/Parasitized/C100P61ThinF_IMG_20150918_144104_cell_162.png", "C100"),
        ("nih_malaria", "cell_images/Uninfected/C1_thinF_IMG_20150604_104722_cell_9.png", "C1"),
        ("mp_idb", "Vivax/img/1703121298-0001-G_R.jpg", "1703121298"),
    ],
)
def test_subject_patterns_match_their_documented_file_names(catalog, name, relative_path, subject):
    match = re.search(catalog[name].subject["pattern"], relative_path)
    assert match is not None and match.group(1) == subject


def test_downloads_are_unique_and_checksums_well_formed(catalog):
    urls = [d.url for s in catalog.values() for d in s.download]
    assert len(urls) == len(set(urls))
    for spec in catalog.values():
        assert spec.access.strip() and spec.citation.strip() and spec.licence.strip()
        for entry in spec.download:
            assert entry.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", entry.sha256)


def test_missing_key_error_names_file_and_key(tmp_path):
    data = _raw("chula_rbc12")
    del data["licence"]
    _write(tmp_path, data)
    with pytest.raises(CatalogError, match=r"chula_rbc12\.yaml: missing key 'licence'"):
        load_source(tmp_path / "chula_rbc12.yaml")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"layout": {"parser": "coco"}}, r"'layout\.parser' must be one of"),
        ({"role": ["train"]}, r"key 'role'"),
        ({"units": []}, r"key 'units' must not be empty"),
        ({"licence": 3}, r"key 'licence' must be str"),
        ({"verified_layout": "yes"}, r"key 'verified_layout' must be bool"),
        ({"pixel_size_um": True}, r"key 'pixel_size_um'"),
        ({"root": "../elsewhere"}, r"key 'root'"),
        ({"licnce": "MIT"}, r"unknown key\(s\) \['licnce'\]"),
        ({"subject": {"from": "regex"}}, r"'subject\.pattern' is required"),
        ({"source": {"from": "image_size", "sizes": {"big": "x"}}}, r"not of the form 'WxH'"),
        (
            {"download": [{"url": "https://x/y.zip", "sha256": "abc", "archive": "zip", "extract_to": "."}]},
            r"download\[0\]'.*sha256",
        ),
        (
            {"download": [{"url": "file:///y.zip", "sha256": None, "archive": "zip", "extract_to": "."}]},
            r"key 'url'",
        ),
        (
            {"download": [{"url": "https://x/y.rar", "sha256": None, "archive": "rar", "extract_to": "."}]},
            r"key 'archive'",
        ),
    ],
)
def test_invalid_entries_are_refused_with_file_and_key(tmp_path, change, message):
    data = {**_raw("chula_rbc12"), **change}
    path = _write(tmp_path, data)
    with pytest.raises(CatalogError, match=re.escape(str(path)) + ".*" + message):
        load_source(path)


def test_name_must_equal_file_stem(tmp_path):
    path = _write(tmp_path, _raw("chula_rbc12"), stem="chula")
    with pytest.raises(CatalogError, match=r"chula\.yaml: key 'name' is 'chula_rbc12'"):
        load_source(path)


def test_unparsable_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(CatalogError, match=r"broken\.yaml: cannot parse YAML"):
        load_source(path)


def test_resolve_root(catalog, tmp_path):
    assert resolve_root(catalog["chula_rbc12"], tmp_path) == tmp_path / "chula-rbc-12"


# --------------------------------------------------------------------------------------------------
# the three datasets present locally (skipped when REDDINO_DATA_ROOT is not set)


def _data_root() -> Path:
    value = os.environ.get("REDDINO_DATA_ROOT")
    if not value or not Path(value).is_dir():
        pytest.skip("REDDINO_DATA_ROOT is not set to an existing folder")
    return Path(value)


@pytest.mark.real_data
def test_local_roots_exist_under_the_data_root(catalog):
    root = _data_root()
    for name in sorted(LOCAL):
        assert resolve_root(catalog[name], root).is_dir(), name


@pytest.mark.real_data
@pytest.mark.parametrize(
    ("name", "key", "count"),
    [
        ("chula_rbc12", "images", 738),
        ("txl_pbc", "images", 1440),
        ("bccd", "annotations", 364),
    ],
)
def test_local_layout_globs_match_the_real_folders(catalog, name, key, count):
    spec = catalog[name]
    folder = resolve_root(spec, _data_root())
    assert len([p for p in folder.glob(spec.layout[key]) if p.is_file()]) == count
    if name == "chula_rbc12":  # 623 of the 738 smears have a label file
        labels = [folder / spec.layout["labels"].format(stem=p.stem) for p in folder.glob("Dataset/*.jpg")]
        assert sum(p.is_file() for p in labels) == 623
    if name == "bccd":
        assert (folder / spec.layout["images_dir"]).is_dir() and (folder / spec.layout["splits_dir"]).is_dir()
