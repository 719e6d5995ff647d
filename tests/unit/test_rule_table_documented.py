"""The README's rule table is the planner's: every row, with its kind, and nothing else."""

from __future__ import annotations

import re
from pathlib import Path

from services.planner.rules import RULES

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_lists_every_rule_with_its_kind():
    rows = dict(re.findall(r"^\| `([^`]+)` \| (in-place|rotation|control-plane) \|", README.read_text(), re.M))
    assert rows == {r.field: r.kind for r in RULES}
