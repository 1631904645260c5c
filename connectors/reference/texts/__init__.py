"""Real English text shipped with the package: documents with a question set (RAG) and a chat
script, for the demo and the CacheBlend quality bench.

Why shipped and not generated: a model's behaviour on real prose is the thing measured (the
answers, the agreement of greedy outputs), and a fresh machine has no network to fetch a data
set. The documents are verbatim excerpts of freely redistributable texts, each with its source
and license (``LICENSES.md`` beside this file); each question's answer occurs in exactly one
document (``check.py`` verifies it), so retrieving the wrong document cannot score.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

HERE = Path(__file__).parent


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    source: str
    license: str
    text: str


@dataclass(frozen=True)
class Question:
    id: str
    doc: str                 # the id of the one document that states the answer
    question: str
    answers: tuple[str, ...]  # acceptable answer spans

    def answered_by(self, reply: str) -> bool:
        """Whether ``reply`` contains one of the answer spans as whole words (case, spacing and
        most punctuation ignored): the usual exact-match-of-span scoring for short extractive
        answers. Whole words, so "2001" is not found in "12001", nor "ABC" in "Fabcd"."""
        return any(contains_span(reply, a) for a in self.answers)


@dataclass(frozen=True)
class ChatScript:
    system: str
    users: tuple[tuple[str, ...], ...]  # per user, the messages of each turn


def normalise(text: str) -> str:
    """Lower case, single spaces, punctuation other than "." and "%" dropped (a "." ending a
    sentence too, so "Paris." reads as "paris")."""
    text = re.sub(r"[^\w\s.%]", " ", text.lower())
    text = re.sub(r"\.(?!\w)", " ", text)
    return " ".join(text.split())


def contains_span(text: str, span: str) -> bool:
    """``span`` in ``text`` as whole words, both normalised."""
    want = normalise(span)
    return bool(want) and re.search(rf"(?<![\w.%]){re.escape(want)}(?![\w%])", normalise(text)) is not None


@cache
def rag_corpus() -> tuple[tuple[Document, ...], tuple[Question, ...]]:
    data = json.loads((HERE / "rag.json").read_text(encoding="utf-8"))
    docs = tuple(Document(d["id"], d["title"], d["source"], d["license"], d["text"]) for d in data["documents"])
    questions = tuple(Question(q["id"], q["doc"], q["question"], tuple(q["answers"])) for q in data["questions"])
    return docs, questions


@cache
def chat_script() -> ChatScript:
    data = json.loads((HERE / "chat.json").read_text(encoding="utf-8"))
    return ChatScript(data["system"], tuple(tuple(turns) for turns in data["users"]))
