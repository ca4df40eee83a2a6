"""``make ablations`` and ``make figures`` end to end at toy sizes: an ablation multirun in which one job
fails, its summary, and every notebook executed against the finished job (so none can silently rot)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from reddino.ablations import ERROR_FILE
from reddino.ablations.summary import FIGURE_PNG, SUMMARY_MD, main
from reddino.viz.execute import execute_notebook

pytestmark = pytest.mark.slow

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
EXPECTED = {  # notebook -> the files it must save
    "fig2_ablations.ipynb": ["fig2_ablations.png"],
    "fig3_pca_patches.ipynb": ["fig3_pca_patches.png", "fig3_pca_patches_random_init.png"],
    "fig4_umap.ipynb": ["fig4_umap.png"],
    "table_results.ipynb": ["table_results.png", "table_results.md"],
}
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, synthetic_cache: Path) -> Path:
    """Two jobs of the embedded grid at debug sizes; the second asks for an unknown unit kind and fails."""
    sweep = tmp_path_factory.mktemp("ablations") / "multirun"
    command = [
        sys.executable,
        "-m",
        "reddino.ablations.job",
        "--multirun",
        "experiment=ablations",
        "debug=fast",
        "ablation=baseline",
        "data.pretrain_units.unit=cell,bogus",
        "report.figures.enabled=false",  # the run's own review figures: not what this test is about
        f"hydra.sweep.dir={sweep}",
    ]
    env = {**os.environ, **ONE_THREAD, "REDDINO_CACHE_DIR": str(synthetic_cache)}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0, "a failed job must fail the multirun (after the others ran)"
    assert (sweep / "0" / "results.json").is_file(), proc.stderr[-3000:]
    return sweep


def test_a_failed_job_is_recorded_and_the_rest_summarised(sweep, capsys):
    assert "data.pretrain_units.unit='bogus': must be one of" in (sweep / "1" / ERROR_FILE).read_text()
    assert not (sweep / "1" / "results.json").exists()
    assert main([str(sweep)]) == 1
    md = (sweep / SUMMARY_MD).read_text()
    assert "| 0 | baseline | baseline | 0 | 4 |" in md  # debug=fast: 2 epochs x 2 steps
    assert "1 failed job(s)" in md and "must be one of" in md
    assert (sweep / FIGURE_PNG).is_file()
    assert "FAILED" in capsys.readouterr().out


def test_every_notebook_is_tested():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(EXPECTED)


@pytest.mark.parametrize("notebook", sorted(EXPECTED))
def test_notebook_runs_and_saves_its_figures(sweep, tmp_path, notebook):
    figures = tmp_path / "figures"
    env = {
        **os.environ,
        **ONE_THREAD,
        "REDDINO_RUN_DIR": str(sweep / "0"),
        "REDDINO_ABLATIONS_DIR": str(sweep),
        "REDDINO_FIGURES_DIR": str(figures),
    }
    execute_notebook(NOTEBOOKS / notebook, env, timeout=600)
    for name in EXPECTED[notebook]:
        path = figures / name
        assert path.is_file(), name
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000, name
        else:
            assert "| teacher |" in path.read_text() and "| random init |" in path.read_text()
