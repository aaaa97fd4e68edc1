"""Every notebook runs top to bottom (real embedded model, CPU), and what it produces is checked: each
notebook prints one ``COMPRESS_RESULT <json>`` line from its last cell."""

import json
import math
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.integration

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 3


def _run(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                   if o.output_type == "stream")
    lines = [ln for ln in text.splitlines() if ln.startswith("COMPRESS_RESULT ")]
    assert len(lines) == 1, "the notebook's last cell prints one COMPRESS_RESULT line"
    return json.loads(lines[0].split(" ", 1)[1])


def test_quickstart(tmp_path):
    res = _run(NOTEBOOKS[0], tmp_path)
    assert set(res) == {"dense", "magnitude 50%", "wanda 2:4"}
    assert all(math.isfinite(r["ppl"]) and r["ppl"] > 1 for r in res.values())
    assert res["dense"]["ppl"] < res["wanda 2:4"]["ppl"] < res["magnitude 50%"]["ppl"]
    assert res["dense"]["sparsity"] == 0.0
    assert res["magnitude 50%"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert res["wanda 2:4"]["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_compare_recipes(tmp_path):
    rows = {r["recipe"]: r for r in _run(NOTEBOOKS[1], tmp_path)}
    assert set(rows) == {"dense", "magnitude_40", "magnitude_50", "wanda_40", "wanda_50"}
    assert all(r["status"] == "ok" and math.isfinite(r["ppl"]) for r in rows.values())
    for m in ("magnitude", "wanda"):  # more sparsity costs more
        assert rows["dense"]["ppl"] < rows[f"{m}_40"]["ppl"] < rows[f"{m}_50"]["ppl"]
        assert rows[f"{m}_50"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert rows["wanda_50"]["ppl"] < rows["magnitude_50"]["ppl"]


def test_layer_sensitivity(tmp_path):
    res = _run(NOTEBOOKS[2], tmp_path)
    table = res["table"]
    assert res["blocks"] == 30 and [r["block"] for r in table] == list(range(30))  # a row per block
    assert all(0 < r["mean_rel_error"] < 1 and 0 <= r["owl_outlier_pct"] <= 100 for r in table)
    assert sum(r["suggested_sparsity"] for r in table) / 30 == pytest.approx(0.5, abs=1e-9)
    assert len({round(r["suggested_sparsity"], 6) for r in table}) > 1  # non-uniform
