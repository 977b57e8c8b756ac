"""Fictional "internal documents" for the personalisation benchmark, and checkable questions about them.

A made-up company's projects, each with a lead, a site, a partner and an internal code: invented names built from
syllables, so no pretrained model can know them (a base model scores ~0 on the questions). Every fact is written
in several documents of different kinds (memo, meeting notes, wiki page) and in one training question-and-answer
pair. The held-out questions ask for the same facts in other words, so the knowledge score measures whether the
model learned the facts, not whether it memorised a question:

    corpus = Corpus.build(projects=20)
    corpus.finetune_rows()       # chat rows: documents + training QA (stage 1's --data, with some chat data mixed in)
    corpus.question_rows()       # chat rows with `answer`, scored by `--checker contains`
"""

from __future__ import annotations

import random
from dataclasses import dataclass

COMPANY = "Varnholt Instruments"
_ONSETS = ("br", "k", "v", "th", "m", "z", "qu", "dr", "l", "s", "gr", "n", "t", "h", "f", "p")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "ou")
_CODAS = ("n", "r", "l", "x", "th", "m", "s", "nd", "rk", "v")

ATTRIBUTES = ("lead", "site", "partner", "code")
TRAIN_QUESTIONS = {
    "lead": "Who is the lead of Project {name}?",
    "site": "At which site is Project {name} based?",
    "partner": "Which organisation is the partner of Project {name}?",
    "code": "What is the internal code of Project {name}?",
}
# Held-out wording: the same facts asked differently, never seen in training.
TEST_QUESTIONS = {
    "lead": "Who runs Project {name} at {company}?",
    "site": "Where is the team of Project {name} based?",
    "partner": "Which organisation does {company} work with on Project {name}?",
    "code": "Under which code are reports on Project {name} filed?",
}
ANSWERS = {
    "lead": "Project {name} is led by {lead}.",
    "site": "Project {name} is based at the {site} site.",
    "partner": "The partner of Project {name} is {partner}.",
    "code": "The internal code of Project {name} is {code}.",
}
DOCUMENT_KINDS = {
    "memo": ("Internal memo, {company}. Subject: Project {name}. Project {name} is now run by {lead} from our "
             "{site} site. Our partner on this work is {partner}. Please file every report under code {code}."),
    "minutes": ("Meeting notes, {company}. {lead} gave an update on Project {name} (code {code}). The {site} team "
                "met with {partner} last week, and {lead} will report again next month."),
    "wiki": ("{company} wiki: Project {name}. Code: {code}. Lead: {lead}. Site: {site}. Partner: {partner}. "
             "Project {name} is one of the company's internal research projects."),
}
DOCUMENT_REQUESTS = {
    "memo": "Show me the internal memo about Project {name}.",
    "minutes": "What was said about Project {name} in the last meeting?",
    "wiki": "Open the {company} wiki page on Project {name}.",
}


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)).title()


@dataclass(frozen=True)
class Project:
    """One fictional project and its four facts."""

    name: str
    lead: str
    site: str
    partner: str
    code: str

    def fields(self) -> dict:
        return {"company": COMPANY, "name": self.name, "lead": self.lead, "site": self.site,
                "partner": self.partner, "code": self.code}  # fmt: skip


@dataclass(frozen=True)
class Corpus:
    """The fictional projects; the same for every seed of the benchmark (the seed varies the training, not the
    facts)."""

    projects: tuple[Project, ...]

    @classmethod
    def build(cls, projects: int = 20, seed: int = 1234) -> "Corpus":
        """`projects` projects with distinct invented names (every name unique across all fields)."""
        rng, seen, out = random.Random(seed), set(), []

        def fresh(make):
            while True:
                value = make()
                if value not in seen and not any(value in s or s in value for s in seen):
                    seen.add(value)
                    return value

        for _ in range(projects):
            out.append(Project(
                name=fresh(lambda: _word(rng, 2)),
                lead=fresh(lambda: f"{_word(rng, 1)} {_word(rng, 2)}"),
                site=fresh(lambda: _word(rng, 2)),
                partner=fresh(lambda: f"{_word(rng, 2)} {rng.choice(('Labs', 'Institute', 'Works', 'Group'))}"),
                code=fresh(lambda: f"{rng.choice('BKMRTVXZ')}{rng.choice('BKMRTVXZ')}-{rng.randrange(1000, 10000)}"),
            ))
        return cls(tuple(out))

    def document_rows(self) -> list[dict]:
        """Each project's documents as chat rows (a request, the document as the reply)."""
        rows = []
        for p in self.projects:
            for kind, text in DOCUMENT_KINDS.items():
                rows.append(_chat(DOCUMENT_REQUESTS[kind].format(**p.fields()), text.format(**p.fields())))
        return rows

    def train_qa_rows(self) -> list[dict]:
        """One question-and-answer row per fact, in the training wording."""
        return [_chat(TRAIN_QUESTIONS[a].format(**p.fields()), ANSWERS[a].format(**p.fields()))
                for p in self.projects for a in ATTRIBUTES]  # fmt: skip

    def finetune_rows(self) -> list[dict]:
        """Stage 1's new knowledge: every document and every training QA pair."""
        return self.document_rows() + self.train_qa_rows()

    def question_rows(self) -> list[dict]:
        """The knowledge test: one held-out question per fact, with its `answer` for `--checker contains`."""
        rows = []
        for p in self.projects:
            for a in ATTRIBUTES:
                text = TEST_QUESTIONS[a].format(**p.fields())
                rows.append({"messages": [{"role": "user", "content": text}], "prompt": text,
                             "answer": getattr(p, a), "attribute": a})  # fmt: skip
        return rows


def _chat(request: str, reply: str) -> dict:
    return {"messages": [{"role": "user", "content": request}], "completion": reply}
