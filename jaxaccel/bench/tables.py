"""Benchmark results as markdown: one table (`markdown_table`), a result with its notes, the
machine header and a whole report (JSON goes through `jaxaccel.io`, in `cli.bench`).
Imports nothing of jaxaccel.
"""
from __future__ import annotations

from typing import Any, Iterable


def markdown_table(table: dict[str, Any]) -> str:
    """A `{"title", "columns", "rows"}` table as GitHub markdown, title as a heading."""
    cols = table["columns"]
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = [f"### {table['title']}", "", "| " + " | ".join(map(esc, cols)) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(map(esc, row)) + " |" for row in table["rows"]]
    return "\n".join(lines)


def markdown_result(result: dict[str, Any]) -> str:
    """One benchmark's table followed by its notes."""
    text = markdown_table(result["table"])
    notes = result.get("notes") or []
    if notes:
        text += "\n\n" + "\n".join(f"- {n}" for n in notes)
    return text


def markdown_header(machine: dict[str, Any], command: str) -> str:
    load = machine.get("load_average")
    load_text = " / ".join(f"{x:.2f}" for x in load) if load else "n/a"
    return "\n".join([
        f"- machine: {machine.get('cpu')} "
        f"(vector features: {machine.get('vector_features') or 'none reported'}"
        + (f"; int8 kernel built for {machine['kernel_isa']}" if machine.get("kernel_isa") else "") + "), "
        f"{machine.get('cores')} cores"
        + (f", {machine['memory_gib']} GiB" if "memory_gib" in machine else "")
        + f"; backend {machine.get('backend')} ({machine.get('devices')} devices, "
        f"{machine.get('device_kind')})",
        f"- load average (1/5/15 min) at the start: {load_text}",
        f"- jax {machine.get('jax')}, jaxlib {machine.get('jaxlib')}, Python {machine.get('python')}",
        f"- command: `{command}`",
    ])


def markdown_report(results: Iterable[dict[str, Any]], machine: dict[str, Any], command: str) -> str:
    parts = [markdown_header(machine, command)] + [markdown_result(r) for r in results]
    return "\n\n".join(parts) + "\n"
