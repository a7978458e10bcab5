"""jaxaccel.bench.tables: benchmark results as markdown."""
from jaxaccel.bench import tables

def test_report_markdown():
    table = {"title": "t", "columns": ["a", "b"], "rows": [["x|y", "1"]]}
    text = tables.markdown_result({"table": table, "notes": ["n1"]})
    assert text.splitlines()[:4] == ["### t", "", "| a | b |", "|---|---|"]
    assert "x\\|y" in text and text.endswith("- n1")
