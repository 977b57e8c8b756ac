"""The documents speak to users: dates and commands, not the developers' history."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_user_documents_name_no_development_sessions():
    for doc in ("README.md", "RESULTS.md", "DEVELOPERS.md", *[str(p.relative_to(ROOT)) for p in
                                                              (ROOT / "benchmarks" / "results").glob("*.md")]):
        found = [line for line in (ROOT / doc).read_text().splitlines() if re.search(r"\bsessions?\b", line, re.I)]
        assert not found, f"{doc}: {found[:3]}"
