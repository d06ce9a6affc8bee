"""The SentencePiece tokenizer: exact round trips in any language, special tokens, training errors, sampling."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtnlg_cli.data.corpus import DocumentSpec, training_sentences
from mtnlg_cli.data.tokenizer import ROLE_TOKENS, Tokenizer, train_tokenizer
from mtnlg_cli.errors import MtnlgError

EN, ZH = "en_austen_pride_sense.txt", "zh_poems_and_debian_faq.txt"


def paragraphs(text: str) -> list[str]:
    return [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]


@pytest.fixture(scope="module")
def tokenizer(shared_data, tmp_path_factory) -> Tokenizer:
    """Trained on a slice of each language, so that the rest of the text is unseen."""
    english = (shared_data / EN).read_text(encoding="utf-8")[:150_000]
    chinese = (shared_data / ZH).read_text(encoding="utf-8")[:20_000]
    lines = [line for line in (english + chinese).split("\n") if line]
    return train_tokenizer(lines, tmp_path_factory.mktemp("tok"), vocab_size=3000)


def test_every_paragraph_of_the_real_text_round_trips_exactly(tokenizer, shared_data):
    docs = [p for name in (EN, ZH) for p in paragraphs((shared_data / name).read_text(encoding="utf-8"))]
    docs.append((shared_data / ZH).read_text(encoding="utf-8"))  # a whole file, newlines and all
    assert len(docs) > 4000
    encoded = tokenizer.encode_batch(docs)
    mismatched = [doc for doc, ids in zip(docs, encoded) if tokenizer.decode(ids) != doc]
    assert mismatched == []
    assert tokenizer.unk_id not in {t for ids in encoded for t in ids}  # byte fallback, never <unk>


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_any_unicode_string_round_trips(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_tokens_have_fixed_ids_and_newline_is_one_token(tokenizer):
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2, 3)
    assert sorted(tokenizer.role_ids) == sorted(ROLE_TOKENS)
    assert len(set(tokenizer.role_ids.values()) | {0, 1, 2, 3}) == 4 + len(ROLE_TOKENS)
    newline = tokenizer.token_id("\n")
    assert tokenizer.encode("a\nb").count(newline) == 1
    assert tokenizer.encode("\n\n\n").count(newline) == 3
    info = tokenizer.info()
    assert info["vocab_size"] == 3000 and info["hash"].startswith("sha256:")
    assert info["special_tokens"]["eos"] == 3


def test_vocabulary_larger_than_the_corpus_supports_is_one_clear_error(tmp_path):
    lines = ["the quick brown fox jumps over the lazy dog"] * 50
    with pytest.raises(MtnlgError, match=r"model.vocab_size=20000 is larger than this corpus supports \(at most \d+"):
        train_tokenizer(lines, tmp_path, vocab_size=20000)
    assert not (tmp_path / "tokenizer.model").exists()


def test_vocabulary_smaller_than_the_characters_is_one_clear_error(tmp_path, shared_data):
    lines = (shared_data / ZH).read_text(encoding="utf-8").split("\n")[:400]
    with pytest.raises(MtnlgError, match=r"model.vocab_size=300 is smaller than the \d+ characters"):
        train_tokenizer(lines, tmp_path, vocab_size=300)


def test_training_sample_is_bounded_random_and_seeded(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"line {i}\n" for i in range(5000)) + "x" * 2500 + "\n", encoding="utf-8")
    files = [(corpus, DocumentSpec("txt", "line"))]
    first = training_sentences(files, 100, seed=1, max_bytes=10**9)
    assert len(first) == 100 and len(set(first)) == 100
    assert first == training_sentences(files, 100, seed=1, max_bytes=10**9)
    assert first != training_sentences(files, 100, seed=2, max_bytes=10**9)
    later = [s for s in first if s.startswith("line ") and int(s.split()[1]) >= 2500]
    assert 25 <= len(later) <= 75  # a uniform sample, not the first lines
    everything = training_sentences(files, 10**6, seed=1, max_bytes=10**9)
    assert max(map(len, everything)) == 1000 and len(everything) == 5000 + 3  # long lines cut into pieces


def test_training_sample_is_bounded_in_bytes_however_long_the_lines(tmp_path):
    corpus = tmp_path / "c.txt"
    lines = [f"{i} " + "é" * (i % 400) for i in range(4000)]  # up to 800 bytes a line
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    files = [(corpus, DocumentSpec("txt", "line"))]
    assert training_sentences(files, 10**6, seed=1, max_bytes=10**9) == lines  # it fits: whole, in corpus order
    sample = training_sentences(files, 10**6, seed=1, max_bytes=100_000)
    assert 100_000 - 800 < sum(len(s.encode("utf-8")) for s in sample) <= 100_000
    assert sample == [line for line in lines if line in set(sample)]  # lines of the corpus, in its order
    numbers = [int(s.split()[0]) for s in sample]
    assert min(numbers) < 400 and max(numbers) > 3600  # drawn from the whole corpus, not its start


def test_unigram_model_round_trips_too(tmp_path, shared_data):
    text = ((shared_data / EN).read_text(encoding="utf-8")[:60_000]
            + (shared_data / ZH).read_text(encoding="utf-8")[:1500])
    unigram = train_tokenizer([l for l in text.split("\n") if l], tmp_path, vocab_size=1500, model_type="unigram")
    assert unigram.sp.get_piece_size() == 1500 and unigram.eos_id == 3
    docs = paragraphs(text)
    assert [unigram.decode(ids) for ids in unigram.encode_batch(docs)] == docs
