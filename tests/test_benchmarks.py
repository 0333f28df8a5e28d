"""The benchmark tables reach docs/benchmarks.md from their JSON results (benchmarks/run_all.py)."""

import json
import shutil
from pathlib import Path

import pytest

from benchmarks import run_all

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def test_gpu_results_render_into_their_page_blocks(tmp_path):
    readme = tmp_path / "benchmarks.md"
    blocks = "".join(f"<!-- bench:{name} -->\nstale\n<!-- /bench:{name} -->\n\n" for name in run_all.BLOCKS["gpu"])
    readme.write_text("# title\n\n" + blocks + "tail\n")
    out = tmp_path / "results"
    out.mkdir()
    shutil.copy(RESULTS / "archive" / "gpu_h200_21d0795.json", out / "gpu.json")  # an earlier H200 run
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


@pytest.mark.parametrize("page, results", [("benchmarks.md", RESULTS), ("benchmarks-avx2.md", RESULTS / "avx2")])
def test_every_committed_result_is_rendered_with_its_machine_and_commit(page, results):
    """docs/benchmarks.md's tables are what run_all renders from benchmarks/results/, each dated, and the
    emulated AVX2 page's from benchmarks/results/avx2; a table without results for this version says so
    instead of showing older figures."""
    text = (RESULTS.parents[1] / "docs" / page).read_text()
    blocks = [block for block in run_all.RENDER if page == "benchmarks.md" or f"<!-- bench:{block} -->" in text]
    assert len(blocks) >= 6, page
    for block in blocks:
        result, render = run_all.RENDER[block]
        start, end = f"<!-- bench:{block} -->", f"<!-- /bench:{block} -->"
        assert start in text and end in text, block
        rendered = text.split(start, 1)[1].split(end, 1)[0]
        if not (results / f"{result}.json").exists():
            assert rendered.strip() == "*Not measured for this version.*", block
            continue
        payload = json.loads((results / f"{result}.json").read_text())
        assert render(payload) in rendered, f"{block}: the table on the page is not its JSON's"
        assert "commit" in rendered.splitlines()[1] and payload["machine"]["cpu_model"] in rendered, block
        if results.name == "avx2":  # the emulation is named in the table's own line
            assert "AVX2, emulated on an AVX-512 CPU" in rendered.splitlines()[1], block


def test_a_result_that_records_its_commit_is_dated_by_it():
    payload = json.loads((RESULTS / "inference.json").read_text())
    payload["machine"].update(jaxcascade="9.9.9", commit="abc1234")
    assert "jaxcascade 9.9.9 at commit abc1234" in run_all.machine_line(payload, "jaxcascade 0.1.0, commit 0000000")


def _has_torch_rows(payload: dict) -> bool:
    text = json.dumps(payload.get("rows", []))
    return "torch" in text


def test_every_cpu_baseline_ran_with_jaxcascades_advantages():
    """A committed CPU result with PyTorch rows records a baseline process given jaxcascade's malloc settings,
    flush-to-zero and as many threads as the machine's cores, and its table says so."""
    from jaxcascade import runtime

    checked = 0
    for path in sorted([*RESULTS.glob("*.json"), *RESULTS.glob("avx2/*.json")]):
        payload = json.loads(path.read_text())
        if "gpu" in payload or not _has_torch_rows(payload):
            continue
        baseline = payload.get("baseline")
        assert baseline, f"{path.name}: PyTorch rows without the settings their process ran with"
        assert baseline["glibc_tunables"] == runtime.GLIBC_TUNABLES and baseline["own_process"], path.name
        assert baseline["flush_to_zero"] and baseline["threads"] == payload["machine"]["cpus"], path.name
        assert "malloc settings (GLIBC_TUNABLES), flush-to-zero" in run_all.machine_line(payload), path.name
        checked += 1
    assert checked >= 4  # convs, train_step, inference, study_1mm, nicms


def test_a_baseline_process_gets_the_allocator_settings_before_it_starts(tmp_path):
    """The environment run_baseline starts processes with reaches glibc itself: its tunables are applied."""
    import subprocess
    import sys

    from benchmarks.common import baseline_environment

    listing = subprocess.run(["/lib64/ld-linux-x86-64.so.2", "--list-tunables"], env=baseline_environment(),
                             capture_output=True, text=True)
    assert listing.returncode == 0, listing.stderr  # glibc's loader on x86-64 Linux, where the claim is made
    applied = dict(line.split(": ")[0:2] for line in listing.stdout.splitlines() if line.startswith("glibc.malloc."))
    assert applied["glibc.malloc.arena_max"].split()[0] == "0x1"
    assert int(applied["glibc.malloc.mmap_threshold"].split()[0], 16) == 1 << 30
    child = subprocess.run([sys.executable, "-c", "import os; print(os.environ['GLIBC_TUNABLES'])"],
                           env=baseline_environment(), capture_output=True, text=True)
    from jaxcascade import runtime

    assert child.stdout.strip() == runtime.GLIBC_TUNABLES
