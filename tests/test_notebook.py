"""The Colab notebook runs end to end on the CPU in its smoke mode (demo config, embedded photos, the
vdvae_tiny fixture as the "official" checkpoint), so that it cannot rot."""

import shutil
from pathlib import Path

import nbformat
from conftest import REFERENCE, reference_dir
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def test_colab_notebook_runs_in_smoke_mode(tmp_path, subprocess_env, monkeypatch):
    reference_dir("vdvae_tiny")
    repo = tmp_path / "vdvae-sr-jax"  # a copy, so the notebook's outputs stay out of the repository
    for name in ("vdvae_sr_jax", "configs", "convert"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "shared").symlink_to(REFERENCE.parent)
    for key, value in subprocess_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("VDVAE_SR_NOTEBOOK_SMOKE", "1")
    notebook = nbformat.read(ROOT / "notebooks" / "colab_tpu.ipynb", as_version=4)
    NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(repo)}}).execute()

    def text(cell):
        return "".join(o.get("text", "") + str(o.get("data", "")) for o in cell.get("outputs", []))

    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert "CpuDevice" in text(code[1])
    assert (repo / "checkpoints" / "hr").is_dir() and (repo / "runs" / "sr" / "metrics.jsonl").is_file()
    assert "| bicubic | 2 |" in text(code[4]) and "| VDVAE-SR t=0.5 sample | 2 |" in text(code[4])
    assert "upscaled/chelsea_x4.png (228, 152)" in text(code[5])
