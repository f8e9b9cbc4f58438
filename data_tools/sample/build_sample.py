"""Rebuild the sample corpus in this folder from the running Python's own files (offline).

    python -m data_tools.sample.build_sample

Sources (all under the Python Software Foundation License, see README.md here):
- code.jsonl.zst: the .py files of some standard-library packages, one record per file,
  {"repo": package, "path": relative path, "text": source}; grouping by "repo" gives
  one "repository" document per package, as ProLong does for code.
- docs.jsonl.gz: the language reference topics of pydoc_data, {"id": topic, "text": ...}.
- chat.jsonl: conversations built from those topics, {"messages": [{"role", "content"}]}.
The files are deterministic for a given Python version (the shipped ones: Python 3.11.7).
"""
from __future__ import annotations

import gzip
import json
import os
import sysconfig

SAMPLE_DIR = os.path.dirname(os.path.abspath(__file__))
CODE_PACKAGES = ("json", "email", "http", "urllib", "logging", "concurrent", "wsgiref",
                 "xmlrpc", "html", "dbm", "collections", "zoneinfo", "tomllib", "importlib",
                 "unittest", "sqlite3", "ctypes", "xml")


def code_records(stdlib: str):
    for package in CODE_PACKAGES:
        root = os.path.join(stdlib, package)
        for folder, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith(("test", "__pycache__")))
            for name in sorted(names):
                if not name.endswith(".py"):
                    continue
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    text = f.read()
                if text.strip():  # empty __init__.py files carry nothing
                    yield {"repo": package, "path": os.path.relpath(path, stdlib), "text": text}


def doc_records():
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield {"id": name, "text": topics[name]}


def chat_records():
    """One to three turns per topic: the topic asked about, then a summary request."""
    from pydoc_data.topics import topics

    for i, name in enumerate(sorted(topics)):
        text = topics[name].strip()
        messages = []
        if i % 3 == 0:
            messages.append({"role": "system", "content": "You answer questions about Python."})
        messages.append({"role": "user", "content": f"What does the Python reference say "
                                                    f"about '{name}'?"})
        messages.append({"role": "assistant", "content": text[: 600 + 97 * (i % 23) * 10]})
        if i % 2 == 0:
            first_sentence = text.split(". ")[0].strip() + "."
            messages.append({"role": "user", "content": "Summarize that in one sentence."})
            messages.append({"role": "assistant", "content": first_sentence})
        yield {"messages": messages}


def write_jsonl(path: str, records) -> None:
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    if path.endswith(".zst"):
        import zstandard

        data = zstandard.ZstdCompressor(level=19).compress(lines)
    elif path.endswith(".gz"):
        data = gzip.compress(lines, compresslevel=9, mtime=0)
    else:
        data = lines
    with open(path, "wb") as f:
        f.write(data)


def main() -> None:
    stdlib = sysconfig.get_paths()["stdlib"]
    write_jsonl(os.path.join(SAMPLE_DIR, "code.jsonl.zst"), code_records(stdlib))
    write_jsonl(os.path.join(SAMPLE_DIR, "docs.jsonl.gz"), doc_records())
    write_jsonl(os.path.join(SAMPLE_DIR, "chat.jsonl"), chat_records())


if __name__ == "__main__":
    main()
