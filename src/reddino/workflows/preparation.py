"""One preparation run (``reddino-prepare``): catalog sources -> parsed images -> units -> manifests + report.

For every source in ``cfg.sources`` (Hydra group ``data/source``): fetch it (offline: it must already
be under the data root), parse its layout, cut patches and cells (``reddino.data.prepare``), write
``manifests/<name>.parquet``; then drop cross-source duplicates from ``manifests/union.parquet`` and
write ``report.md`` / ``report.json`` / ``skipped.csv`` / ``duplicates.csv``. Rerunning reuses
finished work.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from reddino.data.dedup import find_duplicates
from reddino.data.prepare import (
    MANIFEST_COLUMNS,
    CellSettings,
    PatchSettings,
    coverage_warnings,
    materialise_units,
    prepare_parsed,
    segmentation_summary,
    write_parquet_atomic,
    write_text_atomic,
)
from reddino.data.segment import LazySegmenter
from reddino.data.sources.catalog import SourceSpec, resolve_root
from reddino.data.sources.download import SOURCE_FAILURES, DatasetUnavailableError, fetch_source
from reddino.data.sources.parsers import parse_source
from reddino.data.sources.records import ParsedSource
from reddino.runtime.config_checks import check_config, prepare_rules
from reddino.runtime.markdown import markdown_table

log = logging.getLogger("reddino.prepare")


def reason_kind(reason: str) -> str:
    """A skip reason without its file name and numbers, so the report can count alike reasons."""
    text = reason.split(": ", 1)[1] if reason.startswith("/") and ": " in reason else reason
    text = re.split(r"[(:]", text, maxsplit=1)[0]
    return re.sub(r"\d+(\.\d+)?", "N", text).strip()


def subsample(parsed: ParsedSource, max_images: int | None, seed: int) -> ParsedSource:
    """A seeded random subset of a dataset's images (quick trials, tests); None keeps everything."""
    if max_images is None or len(parsed.images) <= max_images:
        return parsed
    images = parsed.images.sample(n=max_images, random_state=seed)
    objects = parsed.objects[parsed.objects["file"].isin(set(images["file"]))]
    return ParsedSource(images.reset_index(drop=True), objects.reset_index(drop=True), parsed.skipped)


def _settings(cfg: DictConfig) -> tuple[PatchSettings, CellSettings]:
    return (
        PatchSettings.from_config(OmegaConf.to_container(cfg.patches, resolve=True), "patch" in cfg.units),
        CellSettings.from_config(OmegaConf.to_container(cfg.cells, resolve=True), "cell" in cfg.units),
    )


def prepare_source(
    spec: SourceSpec, cfg: DictConfig, out: Path, segment: Callable[[np.ndarray], pd.DataFrame]
) -> dict[str, Any]:
    """Parse and cut one dataset; writes its manifest and returns its report entry and tables."""
    data_root = Path(cfg.paths.data_root)
    root = fetch_source(spec, data_root, offline=cfg.offline, allow_unverified=cfg.allow_unverified)
    t0 = time.perf_counter()
    try:
        parsed = parse_source(spec.name, root, spec.layout, spec.subject, spec.source)
    except ValueError as exc:  # an empty folder or a glob matching nothing: nothing to prepare here
        raise DatasetUnavailableError(spec, root, f"{spec.name}: {exc}") from exc
    parsed = subsample(parsed, cfg.max_images, cfg.seed)
    parse_s = time.perf_counter() - t0
    patches, cells = _settings(cfg)
    settings = {
        "units": list(cfg.units),
        "patches": OmegaConf.to_container(cfg.patches, resolve=True),
        "cells": OmegaConf.to_container(cfg.cells, resolve=True),
        "segmentation": OmegaConf.to_container(cfg.segmentation, resolve=True),
        "hash_size": cfg.dedup.hash_size,
        "pixel_size_um": spec.pixel_size_um,
        "layout": spec.layout,
        "version": 3,  # bump when the manifest layout changes: old work chunks are then recomputed
    }
    t0 = time.perf_counter()
    with tqdm(total=len(parsed.images), desc=spec.name, unit="img", disable=not cfg.progress) as bar:
        result, chunks = prepare_parsed(
            spec.name,
            parsed,
            out / "work" / spec.name,
            patches,
            cells,
            spec.pixel_size_um,
            cfg.dedup.hash_size,
            cfg.chunk_size,
            segment,
            settings,
            progress=bar.update,
        )
    cut_s = time.perf_counter() - t0
    write_parquet_atomic(result.units, out / "manifests" / f"{spec.name}.parquet")
    write_parquet_atomic(result.images, out / "manifests" / f"{spec.name}.images.parquet")
    return {
        "result": result,
        "timing": {"parse_s": parse_s, "cut_s": cut_s, "chunks": chunks},
    }


def summarise(units: pd.DataFrame, images: pd.DataFrame, duplicates: pd.DataFrame) -> pd.DataFrame:
    """Per dataset and source id: images, patches, cells (labelled), images dropped as duplicates."""
    keys = ["dataset", "source"]
    table = images.groupby(keys).size().rename("images").to_frame()
    kinds = units.assign(
        patches=units["unit"].eq("patch"),
        cells=units["unit"].eq("cell"),
        labelled_cells=units["unit"].eq("cell") & units["label"].notna(),
    )
    table = table.join(kinds.groupby(keys)[["patches", "cells", "labelled_cells"]].sum(), how="outer")
    dup = (
        images[images["file"].isin(set(duplicates["file"]))].groupby(keys).size().rename("duplicates_dropped")
    )
    return table.join(dup, how="left").fillna(0).astype(int).reset_index()


def report_markdown(report: dict[str, Any], table: pd.DataFrame, reasons: pd.DataFrame) -> str:
    lines = ["# Data preparation report", ""]
    lines += [
        f"- output: `{report['output_dir']}`",
        f"- segmentation backend: {report['segmenter'] or 'not used'}",
    ]
    for name in report["unavailable"]:
        lines.append(f"- **not prepared**: {name}: {report['unavailable'][name]}")
    lines += ["", "## Units", "", markdown_table(table), ""]
    lines += ["## Skipped items by reason", "", markdown_table(reasons) if len(reasons) else "none", ""]
    lines += [f"## Duplicates dropped from the union: {report['duplicates']}", ""]
    if report["segmentation"]:
        lines += [
            "## Segmented images (medians over images)",
            "",
            markdown_table(pd.DataFrame(report["segmentation"])),
        ]
        lines += [f"- **warning**: {w}" for w in report["segmentation_warnings"]] + [""]
    lines += [
        "## Throughput",
        "",
        markdown_table(pd.DataFrame([{"dataset": k, **v} for k, v in report["throughput"].items()])),
        "",
    ]
    return "\n".join(lines)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Prepare every configured source; returns the report (also written to ``report.json``)."""
    check_config(cfg, prepare_rules())
    if cfg.paths.data_root is None:
        raise ValueError("paths.data_root is unset: export REDDINO_DATA_ROOT=<folder holding the datasets>")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(OmegaConf.to_yaml(cfg, resolve=True), out / "config.yaml")
    segment = LazySegmenter(OmegaConf.to_container(cfg.segmentation, resolve=True))
    order = list(cfg.sources)
    units, images, skipped = [], [], []
    throughput: dict[str, dict[str, float]] = {}
    unavailable: dict[str, str] = {}
    for name in order:
        spec = SourceSpec.from_mapping(OmegaConf.to_container(cfg.sources[name], resolve=True))
        seg_before = (segment.seconds, segment.cells)
        try:
            entry = prepare_source(spec, cfg, out, segment)
        except SOURCE_FAILURES as exc:  # missing, unverified, failed download, refused archive
            if cfg.missing_sources == "error":
                raise
            log.error("skipping %s: %s", name, exc)
            unavailable[name] = f"{type(exc).__name__}: {exc}"
            continue
        result, timing = entry["result"], entry["timing"]
        units.append(result.units)
        images.append(result.images)
        skipped.append(result.skipped)
        n_img = len(result.images)
        seg_s, seg_cells = segment.seconds, segment.cells
        entry_seg = {"segmented_cells": seg_cells - seg_before[1], "segment_s": seg_s - seg_before[0]}
        throughput[name] = {
            "images": n_img,
            "parse_s": timing["parse_s"],
            "cut_s": timing["cut_s"],
            "images_per_s": n_img / timing["cut_s"] if timing["cut_s"] > 0 else float("nan"),
            **entry_seg,
            "cells_per_s_segmented": (
                entry_seg["segmented_cells"] / entry_seg["segment_s"]
                if entry_seg["segment_s"] > 0
                else float("nan")
            ),
            "chunks_reused": timing["chunks"]["reused"],
            "chunks_redone": timing["chunks"]["redone"],
        }
        root = resolve_root(spec, Path(cfg.paths.data_root))
        log.info("%s: %d images, %d units from %s", name, n_img, len(result.units), root)
    if not images:
        raise ValueError(f"no source could be prepared: {unavailable}")
    all_units = pd.concat(units, ignore_index=True)[list(MANIFEST_COLUMNS)]
    all_images = pd.concat(images, ignore_index=True)
    all_skipped = pd.concat(skipped, ignore_index=True)
    prepared = [n for n in order if n not in unavailable]
    duplicates = find_duplicates(all_images, cfg.dedup.max_distance, prepared)
    union = all_units[~all_units["file"].isin(set(duplicates["file"]))].reset_index(drop=True)
    write_parquet_atomic(union, out / "manifests" / "union.parquet")
    if cfg.materialise:
        crops = materialise_units(union, out / "units", cfg.materialise_cache_size)
        write_parquet_atomic(crops, out / "manifests" / "union.materialised.parquet")
    duplicates.to_csv(out / "duplicates.csv", index=False)
    all_skipped.to_csv(out / "skipped.csv", index=False)
    table = summarise(all_units, all_images, duplicates)
    reasons = (
        all_skipped.assign(reason=all_skipped["reason"].map(reason_kind))
        .groupby(["dataset", "reason"])
        .size()
        .rename("count")
        .reset_index()
    )
    segmentation = segmentation_summary(all_images)
    warnings = coverage_warnings(segmentation)
    for warning in warnings:
        log.warning(warning)
    report = {
        "output_dir": str(out),
        "segmenter": segment.name,
        "segmentation": segmentation.to_dict("records"),
        "segmentation_warnings": warnings,
        "unavailable": unavailable,
        "units": table.to_dict("records"),
        "skipped_by_reason": reasons.to_dict("records"),
        "duplicates": len(duplicates),
        "union_units": len(union),
        "throughput": throughput,
    }
    write_text_atomic(json.dumps(report, indent=2, default=str), out / "report.json")
    markdown = report_markdown(report, table, reasons)
    write_text_atomic(markdown, out / "report.md")
    print(markdown)
    return report
