"""Read an offline W&B run back from its ``run-<id>.wandb`` transaction log (what ``wandb sync`` uploads).

The file is a LevelDB-style log (W&B's documented on-disk format): a 7-byte header ``:W&B`` + magic
0xBEE1 + version, then 32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type
FULL/FIRST/MIDDLE/LAST); every reassembled record is a serialised ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[bytes]:
    data = Path(path).read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path} is not a W&B transaction log")
    out, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # block trailer too small for a header: padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            out.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            out.append(pending + chunk)
        elif kind == 0 and length == 0:
            break
    return out


@dataclass
class OfflineRun:
    run_id: str = ""
    group: str = ""
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    history_keys: set = field(default_factory=set)
    media: list = field(default_factory=list)


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_run(run_dir: Path) -> OfflineRun:
    """``run_dir`` is one ``wandb/offline-run-*`` folder."""
    (log,) = Path(run_dir).glob("run-*.wandb")
    run = OfflineRun()
    for raw in records(log):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.group = record.run.run_id, record.run.run_group
            for item in record.run.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            run.history_keys.update(_key(item) for item in record.history.item)
    run.media = sorted(
        p.relative_to(run_dir / "files").as_posix() for p in (run_dir / "files" / "media").rglob("*.*")
    )
    return run
