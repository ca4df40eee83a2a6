"""``python -m reddino.viz.execute notebooks/*.ipynb`` (``make figures``): run each figure notebook top to
bottom in a fresh kernel, from the repository root, so the notebooks cannot silently rot.

Outputs are not written back: the notebooks stay stripped in git and the figures they save (PNG, into
``REDDINO_FIGURES_DIR``) are the product. A failing notebook is reported with its error and the others
still run; the exit status says whether all passed.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from reddino.viz.runs import REPO_ROOT


def execute_notebook(path: str | Path, env: Mapping[str, str], timeout: int) -> None:
    """Execute ``path`` in a python3 kernel (this interpreter's ipykernel) with ``env``, cwd = repo root."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(str(path), as_version=4)
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(REPO_ROOT)}}
    )
    client.execute(env=dict(env))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m reddino.viz.execute", description=__doc__.splitlines()[0]
    )
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per cell")
    args = parser.parse_args(argv)
    failed = []
    for nb in args.notebooks:
        start = time.perf_counter()
        try:
            execute_notebook(nb, os.environ, args.timeout)
        except Exception as exc:  # report every notebook, not only the first failure
            failed.append(nb)
            tail = [line for line in str(exc).splitlines() if line.strip()][-3:]
            print(f"FAILED {nb}: {type(exc).__name__}", *tail, sep="\n    ")
            continue
        print(f"ok     {nb} ({time.perf_counter() - start:.0f} s)")
    if failed:
        print(f"{len(failed)} of {len(args.notebooks)} notebooks failed: {', '.join(map(str, failed))}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
