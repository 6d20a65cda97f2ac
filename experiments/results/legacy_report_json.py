"""Write ``report.json`` for a report made before the report code wrote one (2026-11-23).

    python experiments/results/legacy_report_json.py experiments/results/NAME

Those reports' run directories were not kept, so their resolved configs and summaries are gone; this
turns the report's own "Runs" table into ``report.json`` (``runs``: one record per table row, the
columns as written, numbers parsed) with ``config`` and ``summary`` null and a ``source`` that says
so. Rerunning the sweep and ``python -m launch report`` replaces it with the full file.
"""

from __future__ import annotations

import json
import os
import re
import sys


def _value(text: str):
  text = text.strip().strip("`").rstrip("*")
  plain = text.replace(",", "")
  if re.fullmatch(r"-?\d+(\.\d+)?(e[+-]?\d+)?", plain):
    return float(plain) if any(c in plain for c in ".e") else int(plain)
  return None if text in ("", "—") else text


def runs_table(markdown: str) -> list[dict]:
  lines = markdown.splitlines()
  start = lines.index("## Runs")
  rows = [line for line in lines[start + 1:] if line.startswith("|")]
  header = [c.strip() for c in rows[0].strip("|").split("|")]
  return [dict(zip(header, (_value(c) for c in row.strip("|").split("|")))) for row in rows[2:]]


def main(directory: str) -> None:
  with open(os.path.join(directory, "report.md")) as f:
    markdown = f.read()
  report = {"source": "the Runs table of report.md (2026-11-23); run directories not kept, so no "
                      "config.json or summary.json", "runs": [{**row, "config": None, "summary": None}
                                                            for row in runs_table(markdown)]}
  path = os.path.join(directory, "report.json")
  with open(path + ".tmp", "w") as f:
    json.dump(report, f, indent=1)
  os.replace(path + ".tmp", path)


if __name__ == "__main__":
  main(sys.argv[1])
