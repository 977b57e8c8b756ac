"""The documents speak to users: dates and commands, not the developers' history; RESULTS.md is what its sources say."""

import re
from pathlib import Path

from benchmarks import report

ROOT = Path(__file__).resolve().parents[1]
USER_DOCS = ["README.md", "RESULTS.md", "DEVELOPERS.md",
             *[str(p.relative_to(ROOT)) for p in sorted((ROOT / "docs").glob("*.md"))],
             *[str(p.relative_to(ROOT)) for p in sorted((ROOT / "benchmarks" / "results").glob("*.md"))]]


def test_user_documents_name_no_development_sessions():
    for doc in USER_DOCS:
        found = [line for line in (ROOT / doc).read_text().splitlines() if re.search(r"\bsessions?\b", line, re.I)]
        assert not found, f"{doc}: {found[:3]}"


def test_user_documents_cite_nothing_outside_the_repository():
    # the survey opd started from and the design notes are not in the repository: name the survey's section instead
    for doc in USER_DOCS:
        found = [line for line in (ROOT / doc).read_text().splitlines() if re.search(r"MISSION|\.\./shared", line)]
        assert not found, f"{doc}: {found[:3]}"


def test_results_md_is_what_report_writes_from_the_sections():
    assert (ROOT / "RESULTS.md").read_text() == report.render_results(), "run `python benchmarks/report.py`"
    readme = (ROOT / "README.md").read_text()
    assert readme == report.render_readme(readme), "README's results at a glance: run `python benchmarks/report.py`"


def test_every_verdict_number_is_in_its_results_and_every_reading_opens_with_a_short_one():
    for verdict in report.VERDICTS:
        assert not report.untraced(verdict), f"opd bench {verdict.name}: {report.untraced(verdict)} not in its results"
        notes = report.RESULTS / f"{verdict.name}_notes.md"
        short = report.in_short(notes)
        assert short, f"{notes.name} opens with no {report.IN_SHORT} paragraph"
        assert len(short.splitlines()) <= report.IN_SHORT_MAX_LINES, f"{notes.name}: In short is too long"
