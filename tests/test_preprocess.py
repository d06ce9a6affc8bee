"""`mtnlg preprocess`: inputs of every kind, exact round trips, up-to-date runs, atomic output, bad input."""

from __future__ import annotations

import gzip
import json
import os

import pytest

from conftest import run_cli
from mtnlg_cli.data.corpus import DocumentSpec, chunk_documents, expand_paths, read_chunks
from mtnlg_cli.data.indexed_dataset import IndexedDataset
from mtnlg_cli.data.preprocess import preprocess
from mtnlg_cli.data.tokenizer import Tokenizer, train_tokenizer
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.events import Notice
from mtnlg_cli.workspace import init_workspace
from test_tokenizer import paragraphs


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """One tokenizer (vocab 4000, the tiny template's) trained on the sample corpus, shared by these tests."""
    from mtnlg_cli.workspace import _templates

    text = "".join((_templates() / "sample" / name).read_text(encoding="utf-8")
                   for name in ("en_austen_pride.txt", "zh_tang_poems.txt"))
    return str(train_tokenizer([l for l in text.split("\n") if l], tmp_path_factory.mktemp("tok"), 4000).path)


@pytest.fixture
def ws(tmp_path):
    return init_workspace(tmp_path / "ws")


def run(ws, model_file, sources, *overrides, **kwargs):
    config = ws.load_config([f"data.sources={json.dumps(sources)}", *overrides])
    return preprocess(ws, config, model_file=model_file, workers=2, **kwargs)


def decoded_documents(ws, name, model_file) -> list[str]:
    tokenizer = Tokenizer.load(model_file)
    dataset = IndexedDataset(ws.tokenized_dir / name)
    docs = [dataset.document(i).tolist() for i in range(len(dataset))]
    assert all(doc[-1] == tokenizer.eos_id and tokenizer.eos_id not in doc[:-1] for doc in docs)
    return [tokenizer.decode(doc[:-1]) for doc in docs]


def test_quick_start_preprocess_then_up_to_date(tmp_path):
    assert run_cli("init", "demo", cwd=tmp_path).returncode == 0
    demo = tmp_path / "demo"
    first = run_cli("preprocess", cwd=demo)
    assert first.returncode == 0, first.stderr
    assert "Tokenizer: trained" in first.stderr and "documents" in first.stderr
    tokenized = demo.resolve() / "data" / "tokenized"
    assert f"-> {tokenized / 'raw.bin'}, {tokenized / 'raw.idx'}\n" in first.stderr  # the two files, named in full
    manifest = json.loads((demo / "data/tokenized/raw.json").read_text())
    tokenizer = Tokenizer.load(demo / "tokenizer")
    assert manifest["tokenizer_hash"] == tokenizer.hash and tokenizer.vocab_size == 4000
    assert [f["path"].rsplit("/", 1)[-1] for f in manifest["inputs"]] == ["en_austen_pride.txt", "zh_tang_poems.txt"]
    assert all(f["sha256"].startswith("sha256:") and f["bytes"] > 0 for f in manifest["inputs"])
    info = json.loads((demo / "tokenizer/info.json").read_text())
    assert info["special_tokens"]["eos"] == 3 and info["hash"] == tokenizer.hash
    stamps = {p.name: p.stat().st_mtime_ns for p in (demo / "data/tokenized").iterdir()}

    again = run_cli("preprocess", cwd=demo)
    assert again.returncode == 0 and "up to date" in again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (demo / "data/tokenized").iterdir()} == stamps
    assert sorted(stamps) == ["raw.bin", "raw.idx", "raw.json"]  # no temporary files left behind


def test_every_document_of_the_real_text_round_trips(ws, model_file, shared_data):
    results = run(ws, model_file, [{"path": str(shared_data / "*.txt"), "name": "real"}])
    expected = [p for name in ("en_austen_pride_sense.txt", "zh_poems_and_debian_faq.txt")
                for p in paragraphs((shared_data / name).read_text(encoding="utf-8"))]
    assert results[0].documents == len(expected) > 4000
    assert decoded_documents(ws, "real", model_file) == expected


def test_jsonl_gzip_directories_and_globs_in_a_stable_order(ws, model_file, tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "b.txt").write_text("bee one\n\nbee two\n", encoding="utf-8")
    with gzip.open(corpus / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"body": "alpha 甲"}) + "\n\n" + json.dumps({"body": "beta\nline"}) + "\n")
    (corpus / "sub" / "c.jsonl").write_text(json.dumps({"body": "gamma"}) + "\n", encoding="utf-8")
    (corpus / ".hidden.txt").write_text("hidden\n", encoding="utf-8")
    (corpus / "NOTICE.md").write_text("not text data\n", encoding="utf-8")
    assert [p.name for p in expand_paths(str(corpus), tmp_path, "k")] == ["a.jsonl.gz", "b.txt", "c.jsonl"]
    assert [p.name for p in expand_paths(str(corpus / "**" / "*.jsonl*"), tmp_path, "k")] == ["a.jsonl.gz", "c.jsonl"]

    run(ws, model_file, [{"path": str(corpus), "text_key": "body"}])
    assert decoded_documents(ws, "corpus", model_file) == ["alpha 甲", "beta\nline", "bee one", "bee two", "gamma"]


@pytest.mark.parametrize("mode, expected", [("file", ["one\ntwo\n \n\nthree  \n  four"]),
                                            ("paragraph", ["one\ntwo", "three  \n  four"]),
                                            ("line", ["one", "two", "three  ", "  four"])])
def test_document_modes(ws, model_file, tmp_path, mode, expected):
    (tmp_path / "t.txt").write_text("one\r\ntwo\n \n\nthree  \n  four\n\n", encoding="utf-8")
    run(ws, model_file, [{"path": str(tmp_path / "t.txt"), "document": mode}])
    assert decoded_documents(ws, "t", model_file) == expected


def test_chunks_end_at_document_boundaries(tmp_path):
    text = "".join(f"para {i} line a\nline b\n\n\n" if i % 3 else f"para {i}\n \n" for i in range(200))
    (tmp_path / "p.txt").write_text(text, encoding="utf-8")
    with gzip.open(tmp_path / "p.txt.gz", "wt", encoding="utf-8") as f:
        f.write(text)
    spec = DocumentSpec("txt", "paragraph")
    for name in ("p.txt", "p.txt.gz"):
        chunks = list(read_chunks(tmp_path / name, spec, chunk_bytes=50))
        assert len(chunks) > 20
        assert sum(c.raw_bytes for c in chunks) == (tmp_path / name).stat().st_size
        assert [d for c in chunks for d in chunk_documents(c, spec)[0]] == paragraphs(text)


def test_changed_input_is_rebuilt_and_a_touch_is_not(ws, model_file, tmp_path):
    source = tmp_path / "s.txt"
    source.write_text("first\n\nsecond\n", encoding="utf-8")
    assert [r.status for r in run(ws, model_file, [{"path": str(source)}])] == ["built"]
    os.utime(source, ns=(1, 1))
    assert [r.status for r in run(ws, model_file, [{"path": str(source)}])] == ["up to date"]
    source.write_text("first\n\nsecond\n\nthird\n", encoding="utf-8")
    result = run(ws, model_file, [{"path": str(source)}])[0]
    assert (result.status, result.documents) == ("built", 3)
    assert run(ws, model_file, [{"path": str(source)}], force=True)[0].status == "built"
    assert run(ws, model_file, [{"path": str(source), "document": "line"}])[0].status == "built"


def test_a_rewrite_within_one_clock_tick_is_rebuilt(ws, model_file, tmp_path):
    source = tmp_path / "s.txt"
    source.write_text("first\n\nsecond\n", encoding="utf-8")
    assert run(ws, model_file, [{"path": str(source)}])[0].status == "built"
    stat = source.stat()
    source.write_text("FIRST\n\nSECOND\n", encoding="utf-8")  # same size; coarse clocks can keep the mtime
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert run(ws, model_file, [{"path": str(source)}])[0].status == "built"
    assert decoded_documents(ws, "s", model_file) == ["FIRST", "SECOND"]


def test_invalid_utf8_names_file_and_byte_and_keeps_the_old_dataset(ws, model_file, tmp_path):
    source = tmp_path / "s.txt"
    source.write_text("good text\n\nmore\n", encoding="utf-8")
    run(ws, model_file, [{"path": str(source)}])
    before = {p.name: p.read_bytes() for p in ws.tokenized_dir.iterdir()}
    source.write_bytes(b"good text\n\nbad \xff byte\n")
    with pytest.raises(MtnlgError, match=r"s\.txt: invalid UTF-8 at byte 15 \(line 3\); use --errors replace"):
        run(ws, model_file, [{"path": str(source)}])
    assert {p.name: p.read_bytes() for p in ws.tokenized_dir.iterdir()} == before  # untouched, no temp files
    run(ws, model_file, [{"path": str(source)}], "data.errors=replace")
    assert decoded_documents(ws, "s", model_file) == ["good text", "bad \ufffd byte"]


def test_malformed_jsonl_lines_and_missing_keys(ws, model_file, tmp_path):
    source = tmp_path / "j.jsonl"
    source.write_text('{"text": "ok"}\n{"text": broken\n[1, 2]\n{"other": "x"}\n{"text": "fine"}\n', encoding="utf-8")
    with pytest.raises(MtnlgError, match=r"j\.jsonl:2: malformed JSON .*--skip-bad-lines"):
        run(ws, model_file, [{"path": str(source)}])
    result = run(ws, model_file, [{"path": str(source)}], "data.skip_bad_lines=true")[0]
    assert (result.documents, result.bad_lines) == (2, 3)
    assert json.loads((ws.tokenized_dir / "j.json").read_text())["bad_lines_skipped"] == 3
    source.write_text('{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(MtnlgError, match=r"j\.jsonl:1: no 'text' key \(keys: body\)"):
        run(ws, model_file, [{"path": str(source)}])


@pytest.mark.parametrize("mode", ["paragraph", "file"])
def test_a_document_longer_than_the_bound_is_split_at_spaces_or_characters(ws, model_file, tmp_path, mode):
    english = " ".join(f"word{i}" for i in range(3000))  # 26 KB without a line break
    chinese = "春眠不觉晓处处闻啼鸟" * 500  # 15 KB without a space
    (tmp_path / "long").mkdir()
    (tmp_path / "long" / "a.txt").write_text(english, encoding="utf-8")
    (tmp_path / "long" / "b.txt").write_text(chinese, encoding="utf-8")
    events = []
    run(ws, model_file, [{"path": str(tmp_path / "long"), "name": "long", "document": mode}],
        "data.max_document_bytes=4096", report=events.append)
    docs = decoded_documents(ws, "long", model_file)
    assert max(len(d.encode("utf-8")) for d in docs) <= 4096 and len(docs) >= 26_000 // 4096 + 15_000 // 4096
    assert "".join(docs) == english + chinese  # parts of a document, nothing lost or added
    notices = [e.message for e in events if isinstance(e, Notice) and "max_document_bytes" in e.message]
    assert notices == ["long: 2 documents longer than data.max_document_bytes (4,096 bytes) were split into "
                       "parts"], notices


def test_a_jsonl_line_longer_than_the_bound_is_refused_or_skipped(ws, model_file, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"text": text}) for text in ("short", "x" * 10_000, "also short")) + "\n")
    with pytest.raises(MtnlgError, match=rf"^{path}:2: a line longer than data.max_document_bytes \(4,096 bytes\); "
                                         "raise data.max_document_bytes, or set data.skip_bad_lines"):
        run(ws, model_file, [{"path": str(path)}], "data.max_document_bytes=4096")
    [result] = run(ws, model_file, [{"path": str(path), "name": "c"}], "data.max_document_bytes=4096",
                   "data.skip_bad_lines=true")
    assert result.bad_lines == 1 and decoded_documents(ws, "c", model_file) == ["short", "also short"]


@pytest.mark.parametrize("case, message", [
    ("missing", r"data\.sources\.0\.path: no such file or directory"),
    ("empty file", r"e\.txt is empty"),
    ("empty dir", r"holds no \.txt, \.jsonl"),
    ("no match", r"no files match"),
    ("blank text", r"holds no documents"),
])
def test_bad_inputs_are_one_line_errors(ws, model_file, tmp_path, case, message):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "notes.md").write_text("x")
    (tmp_path / "e.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n \n\n")
    path = {"missing": tmp_path / "nope.txt", "empty file": tmp_path / "e.txt", "empty dir": tmp_path / "dir",
            "no match": tmp_path / "*.jsonl", "blank text": tmp_path / "blank.txt"}[case]
    with pytest.raises(MtnlgError, match=message) as info:
        run(ws, model_file, [{"path": str(path)}])
    assert "\n" not in str(info.value)
    assert not any(ws.tokenized_dir.iterdir())


def test_tokenizer_model_file_and_vocabulary_checks(ws, model_file, tmp_path):
    (tmp_path / "s.txt").write_text("some text\n", encoding="utf-8")
    run(ws, model_file, [{"path": str(tmp_path / "s.txt")}])
    assert Tokenizer.load(ws.tokenizer_dir).hash == Tokenizer.load(model_file).hash
    with pytest.raises(MtnlgError, match=r"4000 pieces but model\.vocab_size=5000"):
        run(ws, model_file, [{"path": str(tmp_path / "s.txt")}], "model.vocab_size=5000")
    other = train_tokenizer(["another corpus entirely"] * 20 + ["xyz"], tmp_path / "other", 300)
    with pytest.raises(MtnlgError, match="already has a different tokenizer.*--force"):
        run(ws, str(other.path), [{"path": str(tmp_path / "s.txt")}], "model.vocab_size=300")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(MtnlgError, match="is not a SentencePiece model"):
        run(ws, str(tmp_path / "bad.model"), [{"path": str(tmp_path / "s.txt")}])


def test_cli_paths_flags_and_errors(tmp_path, model_file):
    init_workspace(tmp_path / "w")
    (tmp_path / "in.jsonl").write_bytes(b'{"text": "caf\xc3\xa9"}\n{"text": "x\xff"}\nnot json\n')
    args = ("preprocess", str(tmp_path / "in.jsonl"), "--tokenizer-model", model_file, "--workers", "1")
    failed = run_cli(*args, cwd=tmp_path / "w")
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert failed.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'in.jsonl'}: invalid UTF-8 at byte 29 (line 2); "
        "use --errors replace to replace bad bytes and continue")
    assert failed.stderr.count("error:") == 1
    ok = run_cli(*args, "--errors", "replace", "--skip-bad-lines", cwd=tmp_path / "w")
    assert ok.returncode == 0, ok.stderr
    assert "2 documents" in ok.stderr and "1 malformed lines skipped" in ok.stderr and "data.sources" in ok.stderr
    assert IndexedDataset(tmp_path / "w/data/tokenized/in").document_lengths.tolist()[0] > 1
