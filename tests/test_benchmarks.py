"""The benchmark tables reach the README from their JSON results (benchmarks/run_all.py)."""

import json
import shutil
from pathlib import Path

from benchmarks import run_all

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def test_gpu_results_render_into_their_readme_blocks(tmp_path):
    readme = tmp_path / "README.md"
    blocks = "".join(f"<!-- bench:{name} -->\nstale\n<!-- /bench:{name} -->\n\n" for name in run_all.BLOCKS["gpu"])
    readme.write_text("# title\n\n" + blocks + "tail\n")
    out = tmp_path / "results"
    out.mkdir()
    shutil.copy(RESULTS / "gpu.json", out / "gpu.json")
    assert run_all.rewrite_readme(readme, out, ["gpu"]) == list(run_all.BLOCKS["gpu"])
    text = readme.read_text()
    payload = json.loads((out / "gpu.json").read_text())
    assert "stale" not in text and text.startswith("# title") and text.endswith("tail\n")
    assert text.count(payload["gpu"]) == 3  # every table names the card it ran on
    for section in ("inference", "train_step", "convs"):
        names = [r["name"].split(" | ")[-1] for r in payload["rows"] if r["section"] == section]
        assert names and all(name in text for name in names)


def test_render_only_leaves_blocks_without_results_alone(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench:inference -->\nkept\n<!-- /bench:inference -->\n")
    assert run_all.main(["--only", "inference", "--render-only", "--out", str(tmp_path), "--readme", str(readme)]) == 0
    assert "kept" in readme.read_text()
