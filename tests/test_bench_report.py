"""docs/benchmarks.md is rewritten by `make bench` without erasing what engineers wrote there."""
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("run_all", REPO / "bench" / "run_all.py")
run_all = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_all)

OLD = """# Benchmarks

Run 2026-11-27 01:02 UTC by `make bench`.

- CPU: old

## ingest

```
old ingest table
```

(12 s)

**Quiet machine**: ingest notes that must survive.

```
a hand-pasted table
```

## rules

```
old rules table
```

(3 s; run 2026-11-27 01:03 UTC)
"""


def test_a_partial_rerun_replaces_its_own_run_block_and_keeps_everything_else():
    new = run_all.merge_report(OLD, None, {"ingest": "```\nnew ingest table\n```\n\n(9 s; run X)\n"})
    assert "old ingest table" not in new and "new ingest table" in new
    assert "ingest notes that must survive" in new and "a hand-pasted table" in new
    assert new.index("new ingest table") < new.index("ingest notes that must survive")
    assert "old rules table" in new and "- CPU: old" in new  # other sections and the preamble untouched
    assert run_all.merge_report(new, None, {"ingest": "```\nnew ingest table\n```\n\n(9 s; run X)\n"}) == new


def test_a_full_run_rewrites_the_preamble_and_adds_new_sections():
    new = run_all.merge_report(OLD, "# Benchmarks\n\nRun now.\n\n- CPU: new\n",
                               {"rules": "```\nnew rules\n```\n\n(1 s; run Y)\n", "scaleout": "```\ns\n```\n\n(2 s; run Y)\n"})
    assert "- CPU: new" in new and "- CPU: old" not in new
    assert "old rules table" not in new and "new rules" in new
    preamble, sections = run_all.split_report(new)
    assert list(sections) == ["ingest", "rules", "scaleout"]
    assert "ingest notes that must survive" in sections["ingest"]


def test_the_committed_report_splits_into_its_sections():
    _, sections = run_all.split_report((REPO / "docs" / "benchmarks.md").read_text())
    assert {"ingest", "latency", "registration"} <= set(sections)
