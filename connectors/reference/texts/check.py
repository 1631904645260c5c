"""Validate rag.json: ids, references, and that every answer occurs in its own document and no other.

Answers are compared case-insensitively with whitespace normalised, and again the way replies are
scored (``texts.contains_span``: whole words, most punctuation dropped), so no answer can score
in another document.

Run: python3 connectors/reference/texts/check.py   (exits 1 naming the first problem)
"""
import json
import sys
from pathlib import Path

from kvstore.connectors.reference.texts import contains_span, normalise

PATH = Path(__file__).with_name("rag.json")


def norm(s: str) -> str:
    return " ".join(s.split()).casefold()


def fail(msg: str) -> None:
    print(f"FAIL: {msg}")
    sys.exit(1)


def main() -> None:
    data = json.loads(PATH.read_text(encoding="utf-8"))
    docs, questions = data["documents"], data["questions"]
    texts: dict[str, str] = {}
    scored: dict[str, str] = {}
    for d in docs:
        for key in ("id", "title", "source", "license", "text"):
            if not str(d.get(key, "")).strip():
                fail(f"document {d.get('id')!r} has no {key!r}")
        if d["id"] in texts:
            fail(f"duplicate document id {d['id']!r}")
        texts[d["id"]] = norm(d["text"])
        scored[d["id"]] = d["text"]
    seen: set[str] = set()
    per_doc = {i: 0 for i in texts}
    for q in questions:
        qid = q.get("id")
        if qid in seen:
            fail(f"duplicate question id {qid!r}")
        seen.add(qid)
        if q.get("doc") not in texts:
            fail(f"{qid}: unknown document {q.get('doc')!r}")
        answers = [norm(a) for a in q.get("answers", [])]
        if not answers or not q.get("question", "").strip():
            fail(f"{qid}: empty question or answers")
        if not any(a in texts[q["doc"]] for a in answers) or not any(
                contains_span(scored[q["doc"]], a) for a in q["answers"]):
            fail(f"{qid}: no answer occurs in its document {q['doc']!r}")
        loose = [normalise(a) for a in q["answers"]]
        if min(len(a) for a in loose) < 2:
            fail(f"{qid}: an answer is shorter than 2 characters once normalised for scoring")
        for other in texts:
            if other == q["doc"]:
                continue
            for a, b in zip(answers, loose):
                if a in texts[other] or contains_span(scored[other], b):
                    fail(f"{qid}: answer {a!r} also occurs in document {other!r}")
        for a in answers:
            if a in norm(q["question"]):
                fail(f"{qid}: answer {a!r} occurs in the question")
        per_doc[q["doc"]] += 1
    print(f"documents: {len(docs)}  questions: {len(questions)}")
    for d in docs:
        print(f"  {d['id']:<26} {len(d['text'].split()):>4} words  {per_doc[d['id']]} questions")
    print("OK")


if __name__ == "__main__":
    main()
