"""The README's Python API snippet runs as written in an empty folder (a fresh store, the packaged MiniLM)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_api_snippet() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Python API section should hold one python block"
    return blocks[0]


def test_readme_python_snippet_runs_in_a_fresh_folder(tmp_path):
    code = python_api_snippet()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", "import torch; torch.set_num_threads(1)\n" + code],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith("(") and ", 384)" in lines[0]  # train features [N, 384]
    run_id, f1 = lines[1].split()
    assert (tmp_path / "store" / "heads" / run_id / "model.safetensors").is_file() and 0 <= float(f1) <= 1
    assert lines[2] in ("positive", "negative", "neutral")
    info = json.loads((tmp_path / "store" / "datasets" / "demo" / "dataset.json").read_text())
    assert (tmp_path / "store" / "datasets" / "demo" / info["manifest_file"]).is_file()
