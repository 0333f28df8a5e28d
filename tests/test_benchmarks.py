"""The benchmark tables reach docs/benchmarks.md from their JSON results (benchmarks/run_all.py)."""

import json
import shutil
from pathlib import Path

from benchmarks import run_all

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def test_gpu_results_render_into_their_page_blocks(tmp_path):
    readme = tmp_path / "benchmarks.md"
    blocks = "".join(f"<!-- bench:{name} -->\nstale\n<!-- /bench:{name} -->\n\n" for name in run_all.BLOCKS["gpu"])
    readme.write_text("# title\n\n" + blocks + "tail\n")
    out = tmp_path / "results"
    out.mkdir()
    shutil.copy(RESULTS / "gpu.json", out / "gpu.json")
    assert run_all.rewrite_tables(readme, out, ["gpu"]) == list(run_all.BLOCKS["gpu"])
    text = readme.read_text()
    payload = json.loads((out / "gpu.json").read_text())
    assert "stale" not in text and text.startswith("# title") and text.endswith("tail\n")
    assert text.count(payload["gpu"]) == 3  # every table names the card it ran on
    for section in ("inference", "train_step", "convs"):
        names = [r["name"].split(" | ")[-1] for r in payload["rows"] if r["section"] == section]
        assert names and all(name in text for name in names)


def test_render_only_leaves_blocks_without_results_alone(tmp_path):
    readme = tmp_path / "benchmarks.md"
    readme.write_text("<!-- bench:inference -->\nkept\n<!-- /bench:inference -->\n")
    assert run_all.main(["--only", "inference", "--render-only", "--out", str(tmp_path), "--page", str(readme)]) == 0
    assert "kept" in readme.read_text()


def test_every_committed_result_is_rendered_with_its_machine_and_commit():
    """docs/benchmarks.md's tables are what run_all renders from benchmarks/results/, each dated."""
    page = RESULTS.parents[1] / "docs" / "benchmarks.md"
    text = page.read_text()
    for block, (result, render) in run_all.RENDER.items():
        payload = json.loads((RESULTS / f"{result}.json").read_text())
        start, end = f"<!-- bench:{block} -->", f"<!-- /bench:{block} -->"
        assert start in text and end in text, block
        rendered = text.split(start, 1)[1].split(end, 1)[0]
        assert render(payload) in rendered, f"{block}: the table on the page is not its JSON's"
        assert "commit" in rendered.splitlines()[1] and payload["machine"]["cpu_model"] in rendered, block


def test_a_result_that_records_its_commit_is_dated_by_it():
    payload = json.loads((RESULTS / "inference.json").read_text())
    payload["machine"].update(jaxcascade="9.9.9", commit="abc1234")
    assert "jaxcascade 9.9.9 at commit abc1234" in run_all.machine_line(payload, "jaxcascade 0.1.0, commit 0000000")
