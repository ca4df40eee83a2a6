"""Packing (``reddino-pack``): a prepared folder -> a compact copy that works wherever it is unpacked.

``reddino-prepare`` writes manifests whose ``file`` is the absolute path of a smear under the shared
data root, and units are cut from those smears at load time. A GPU node without that storage gets
instead ``<out>/images/<dataset>/<n>.jpg`` (every referenced smear once, as JPEG at ``quality`` and at
its original pixel size, so the unit boxes stay valid) and ``<out>/manifests/*.parquet`` (same names)
whose ``file`` is relative to ``<out>``; ``read_manifest`` resolves it. Unpack the folder as
``<cache_dir>/prepared`` and point ``REDDINO_CACHE_DIR`` at ``<cache_dir>``.

Pixels are decoded exactly as the loader decodes them (``reddino.data.io.read_rgb``: 16-bit, grey and
RGBA become 8-bit RGB), so the copy holds what training would have seen up to JPEG loss. An RGB JPEG
that is already smaller than its re-encoding is copied byte for byte (``keep_original_if_smaller``):
smaller and lossless. Images that cannot be read are skipped, listed with the reason, and their units
dropped and counted in ``pack_report.md`` / ``pack_report.json`` / ``pack_skipped.csv``.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm.auto import tqdm

from reddino.data.io import BadImageError, read_rgb
from reddino.data.manifest import resolve_files
from reddino.data.prepare import write_parquet_atomic, write_text_atomic
from reddino.runtime.config_checks import check_config, pack_rules
from reddino.runtime.markdown import markdown_table

REPORT_NAME = "pack_report.json"
OWN_FILES = (REPORT_NAME, "pack_report.md", "pack_skipped.csv")


def table_group(name: str) -> str:
    """``union.parquet`` / ``union.images.parquet`` -> ``union``: the name a selection refers to."""
    stem = name.removesuffix(".parquet")
    return stem.removesuffix(".images")


def load_tables(
    prepared: Path, manifests: Sequence[str] | None, datasets: Sequence[str] | None
) -> dict[str, pd.DataFrame]:
    """The selected manifests of ``prepared`` (by file name), ``file`` absolute, rows of ``datasets`` only.

    Tables a dataset filter leaves empty are left out (a per-dataset manifest of an unselected dataset).
    """
    folder = prepared / "manifests"
    names = sorted(p.name for p in folder.glob("*.parquet")) if folder.is_dir() else []
    if not names:
        raise FileNotFoundError(f"{folder}: no manifests; run `make prepare` (reddino-prepare) first")
    groups = sorted({table_group(n) for n in names})
    if manifests is not None:
        unknown = sorted(set(manifests) - set(groups))
        if unknown:
            raise ValueError(f"{folder}: no manifests {unknown}; it has {groups}")
        names = [n for n in names if table_group(n) in set(manifests)]
    tables = {n: pd.read_parquet(folder / n) for n in names}
    if datasets is not None:
        present = set().union(*(set(t["dataset"]) for t in tables.values() if "dataset" in t.columns))
        unknown = sorted(set(datasets) - present)
        if unknown:
            raise ValueError(f"{folder}: no dataset {unknown}; the manifests have {sorted(present)}")
        tables = {
            n: t[t["dataset"].isin(list(datasets))].reset_index(drop=True) if "dataset" in t.columns else t
            for n, t in tables.items()
        }
        tables = {n: t for n, t in tables.items() if len(t)}
    for table in tables.values():
        if "file" in table.columns:
            table["file"] = resolve_files(table["file"], prepared)
    return tables


def plan_destinations(tables: Iterable[pd.DataFrame]) -> dict[str, tuple[str, str]]:
    """Every referenced image once -> (dataset, ``images/<dataset>/<n>.jpg``), numbered in path order."""
    dataset_of: dict[str, str] = {}
    for table in tables:
        if "file" not in table.columns:
            continue
        names = table["dataset"] if "dataset" in table.columns else pd.Series("images", index=table.index)
        for file, dataset in zip(table["file"], names, strict=True):
            dataset_of.setdefault(file, re.sub(r"[^A-Za-z0-9_.-]", "_", str(dataset)))
    plan: dict[str, tuple[str, str]] = {}
    counters: dict[str, int] = {}
    for file in sorted(dataset_of):
        dataset = dataset_of[file]
        n = counters.get(dataset, 0)
        counters[dataset] = n + 1
        plan[file] = (dataset, f"images/{dataset}/{n}.jpg")
    return plan


def pack_image(src: str, dest: str, quality: int, keep_original_if_smaller: bool) -> dict[str, Any]:
    """Write one smear as JPEG at ``dest``; returns its sizes, or the reason it could not be read."""
    try:
        rgb = read_rgb(src)
    except BadImageError as exc:
        return {"file": src, "error": str(exc)}
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality, optimize=True)
    encoded = buffer.getvalue()
    before = os.path.getsize(src)
    keep = keep_original_if_smaller and before <= len(encoded) and _is_rgb_jpeg(src)
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    if keep:
        shutil.copyfile(src, dest)
    else:
        Path(dest).write_bytes(encoded)
    return {"file": src, "bytes_before": before, "bytes_after": os.path.getsize(dest), "kept_original": keep}


def _is_rgb_jpeg(path: str) -> bool:
    """True when the file decodes (as ``read_rgb`` does) to exactly the pixels it would after a copy."""
    with Image.open(path) as im:
        return im.format == "JPEG" and im.mode == "RGB"


def _star_pack(args: tuple[str, str, int, bool]) -> dict[str, Any]:
    return pack_image(*args)


def _prepare_out(prepared: Path, out: Path) -> None:
    """Refuse to overwrite anything that is not a previous pack; clear a previous pack's data."""
    if out.resolve() == prepared.resolve():
        raise ValueError(f"{out}: the packed copy must not replace the prepared folder it is made from")
    if out.exists() and any(out.iterdir()) and not (out / REPORT_NAME).is_file():
        raise ValueError(f"{out}: exists, is not empty and holds no {REPORT_NAME}; choose another `out`")
    for sub in ("images", "manifests"):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def pack(
    prepared: str | Path,
    out: str | Path,
    quality: int = 90,
    manifests: Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
    keep_original_if_smaller: bool = True,
    workers: int | None = None,
    small_file_bytes: int = 1_000_000,
    progress: bool = False,
) -> dict[str, Any]:
    """Pack ``prepared`` into ``out`` (see the module docstring); returns the report it also writes."""
    t0 = time.perf_counter()
    prepared, out = Path(prepared), Path(out)
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    tables = load_tables(prepared, manifests, datasets)
    if not tables:
        raise ValueError(f"{prepared}: nothing to pack (manifests={manifests}, datasets={datasets})")
    _prepare_out(prepared, out)
    plan = plan_destinations(tables.values())
    jobs = [(src, str(out / rel), quality, keep_original_if_smaller) for src, (_, rel) in plan.items()]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    results: list[dict[str, Any]] = []
    with (
        tqdm(total=len(jobs), desc="pack", unit="img", disable=not progress) as bar,
        ProcessPoolExecutor(workers) if workers > 1 else nullcontext() as pool,
    ):
        for result in pool.map(_star_pack, jobs, chunksize=16) if pool else map(_star_pack, jobs):
            results.append(result)
            bar.update()
    failed = {r["file"]: r["error"] for r in results if "error" in r}
    units = []
    for name, table in tables.items():
        units += unit_counts(name, table, set(failed))
        if "file" in table.columns:
            table = table[~table["file"].isin(set(failed))].reset_index(drop=True)
            table["file"] = table["file"].map(lambda f: plan[f][1])
        write_parquet_atomic(table, out / "manifests" / name)
    for path in sorted(prepared.iterdir()):
        if path.is_file() and path.stat().st_size <= small_file_bytes and path.name not in OWN_FILES:
            shutil.copy2(path, out / path.name)
    images = pd.DataFrame(
        [{"dataset": plan[r["file"]][0], **r} for r in results],
        columns=["dataset", "file", "bytes_before", "bytes_after", "kept_original", "error"],
    )
    ok, bad = images[images["error"].isna()], images[images["error"].notna()]
    per_dataset = (
        ok.groupby("dataset")
        .agg(
            images=("file", "size"),
            kept_original=("kept_original", "sum"),
            bytes_before=("bytes_before", "sum"),
            bytes_after=("bytes_after", "sum"),
        )
        .join(bad.groupby("dataset").size().rename("unreadable"), how="outer")
        .fillna(0)
        .astype(int)
        .reset_index()
    )
    skipped = pd.DataFrame(
        {
            "dataset": bad["dataset"],
            "file": bad["file"],
            "reason": bad["error"],
            "units_dropped": bad["file"].map(_units_per_file(tables, set(failed))).fillna(0).astype(int),
        }
    )
    skipped.to_csv(out / "pack_skipped.csv", index=False)
    report = {
        "source": str(prepared.absolute()),
        "out": str(out.absolute()),
        "quality": quality,
        "keep_original_if_smaller": keep_original_if_smaller,
        "manifests": list(tables),
        "images": len(ok),
        "kept_original": int(ok["kept_original"].sum()),
        "unreadable": skipped.to_dict("records"),
        "bytes_before": int(ok["bytes_before"].sum()),
        "bytes_after": int(ok["bytes_after"].sum()),
        "folder_bytes": _folder_bytes(out),
        "per_dataset": per_dataset.to_dict("records"),
        "units": units,
        "workers": workers,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_text_atomic(json.dumps(report, indent=2, default=str), out / REPORT_NAME)
    markdown = report_markdown(report)
    write_text_atomic(markdown, out / "pack_report.md")
    print(markdown)
    return report


def unit_counts(name: str, table: pd.DataFrame, failed: set[str]) -> list[dict[str, Any]]:
    """Units a manifest keeps and drops (their image unreadable), per dataset and unit kind."""
    if not {"file", "unit", "dataset"} <= set(table.columns):
        return []  # an images table, or no units
    dropped = table.assign(dropped=table["file"].isin(failed)).groupby(["dataset", "unit"])["dropped"]
    return [
        {"manifest": name, "dataset": dataset, "unit": unit, "units": int(n - d), "dropped": int(d)}
        for (dataset, unit), n, d in zip(dropped.size().index, dropped.size(), dropped.sum(), strict=True)
    ]


def _units_per_file(tables: dict[str, pd.DataFrame], files: set[str]) -> dict[str, int]:
    """Units (rows of unit manifests, all manifests together) that reference each of ``files``."""
    counts: dict[str, int] = {}
    for table in tables.values():
        if "file" in table.columns and "unit" in table.columns:
            for file, n in table[table["file"].isin(files)].groupby("file").size().items():
                counts[file] = counts.get(file, 0) + int(n)
    return counts


def report_markdown(report: dict[str, Any]) -> str:
    """The pack report for a human: sizes per dataset, units kept/dropped per manifest, unreadable images."""
    mb = 1e6
    lines = [
        "# Packed prepared data",
        "",
        f"- from `{report['source']}` to `{report['out']}`",
        f"- JPEG quality {report['quality']}; originals kept when smaller: "
        f"{report['keep_original_if_smaller']} ({report['kept_original']} images)",
        f"- images packed: {report['images']}; unreadable (skipped): {len(report['unreadable'])}",
        f"- image bytes: {report['bytes_before'] / mb:.1f} MB -> {report['bytes_after'] / mb:.1f} MB; "
        f"whole folder {report['folder_bytes'] / mb:.1f} MB",
        f"- {report['seconds']} s with {report['workers']} worker(s)",
        "",
        "## Images per dataset",
        "",
        markdown_table(pd.DataFrame(report["per_dataset"])),
        "",
        "## Units per manifest",
        "",
        markdown_table(pd.DataFrame(report["units"])) if report["units"] else "no unit manifests",
        "",
        "## Unreadable images (skipped, their units dropped)",
        "",
        markdown_table(pd.DataFrame(report["unreadable"])) if report["unreadable"] else "none",
        "",
    ]
    return "\n".join(lines)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Pack as configured in ``conf/pack.yaml``."""
    check_config(cfg, pack_rules())
    return pack(
        cfg.prepared_dir,
        cfg.out,
        quality=int(cfg.quality),
        manifests=OmegaConf.to_container(cfg.manifests) if cfg.manifests is not None else None,
        datasets=OmegaConf.to_container(cfg.datasets) if cfg.datasets is not None else None,
        keep_original_if_smaller=bool(cfg.keep_original_if_smaller),
        workers=cfg.workers,
        small_file_bytes=int(cfg.small_file_bytes),
        progress=bool(cfg.progress),
    )
