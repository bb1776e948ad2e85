"""The README's result tables against the committed summaries they name (scripts/check_readme.py)."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("check_readme", ROOT / "scripts" / "check_readme.py")
check_readme = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_readme)


def test_every_readme_table_number_is_in_its_summaries():
    assert check_readme.check(ROOT / "README.md", ROOT) == []
    assert "<!-- numbers:" in (ROOT / "README.md").read_text()  # the check checks something


def write(tmp_path, table: str, values: dict) -> Path:
    (tmp_path / "s.json").write_text(json.dumps(values))
    readme = tmp_path / "README.md"
    readme.write_text(f"text\n\n<!-- numbers: s.json -->\n\n| model | ppl | gap | share | MACs |\n|---|---|---|---|---|\n"
                      f"{table}\n\nmore text 123.4\n")
    return readme


def test_a_wrong_or_twice_rounded_number_is_caught(tmp_path):
    values = {"ppl": 87.1549, "gap": -1.63, "share": 0.4987, "macs": 5.0912e12, "cost": 0.71549, "n": [600]}
    good = "| dense 2-layer (600 steps) `hard_example_ratio=0.5` | 87.15 | -1.6% | 49.9% | 5.09e12 |"
    assert check_readme.check(write(tmp_path, good, values), tmp_path) == []
    for bad, text in ((good.replace("87.15", "87.16"), "87.16"), (good.replace("-1.6%", "+1.6%"), "+1.6%"),
                      (good.replace("5.09e12", "5.10e12"), "5.10e12"), (good + " 0.716 |", "0.716")):
        problems = check_readme.check(write(tmp_path, bad, values), tmp_path)
        assert len(problems) == 1 and text in problems[0], (bad, problems)
