"""Reading a corpus: files, directories and globs expanded in a stable order, cut into chunks, split into documents.

The main process only reads bytes and cuts them into chunks at document boundaries (cheap, C-speed searches);
worker processes decode the chunks and split them into documents. Chunks are bounded in size, and so are
documents: one longer than `data.max_document_bytes` (a file with no line break, a `document: file` source of a
huge file) is split into parts of at most that size at a line break, else a space, else a character boundary,
and each part is a document. A JSONL line cannot be split; one longer than the bound is an error (or skipped, with
`data.skip_bad_lines`). So memory stays flat however large the corpus and its documents are.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import heapq
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Literal, Optional

from mtnlg_cli.config import DataConfig
from mtnlg_cli.errors import MtnlgError

CORPUS_SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")
CHUNK_BYTES = 1 << 18  # small enough to keep both workers busy to the end of a file
_PARAGRAPH_BREAK = re.compile(rb"\n[ \t\r]*\n")
_PARAGRAPH_SPLIT = re.compile(r"\n(?:[ \t\r]*\n)+")
_LINE_BREAK = re.compile(rb"\n")


@dataclass(frozen=True)
class DocumentSpec:
    """How the files of one source become documents."""

    format: Literal["txt", "jsonl"]
    document: Literal["file", "paragraph", "line"] = "paragraph"  # for txt
    text_key: str = "text"  # for jsonl
    errors: Literal["strict", "replace"] = "strict"  # invalid UTF-8
    skip_bad_lines: bool = False  # malformed JSONL
    max_document_bytes: int = DataConfig.max_document_bytes  # encoding takes ~60 bytes of memory per byte


@dataclass(frozen=True)
class Chunk:
    """Whole documents' worth of (decompressed) bytes of one file, and where they start in it."""

    path: str
    offset: int  # byte offset in the (decompressed) file
    line: int  # 1-based line number of the first byte
    data: bytes
    raw_bytes: int  # bytes of the file on disk this chunk accounts for (compressed size for .gz)
    split_document: bool = False  # the chunk ends in a document longer than the bound, which goes on in the next
    skipped_lines: int = 0  # JSONL lines longer than the bound, skipped before this chunk


def file_format(path: Path) -> Literal["txt", "jsonl"]:
    name = path.name.lower().removesuffix(".gz")
    return "jsonl" if name.endswith((".jsonl", ".json")) else "txt"


def expand_paths(pattern: str, root: Path, key: str) -> list[Path]:
    """The corpus files a config path names: a file, a directory (searched recursively) or a glob.

    `key` names the config entry in error messages. Directories contribute their .txt/.jsonl files (optionally
    gzip-compressed), hidden files excluded; the result is sorted, so the order is the same on every run.
    """
    path = Path(pattern).expanduser()
    path = path if path.is_absolute() else root / path
    if glob.has_magic(str(path)):
        matches = [Path(p) for p in sorted(glob.glob(str(path), recursive=True))]
        if not matches:
            raise MtnlgError(f"{key}: no files match {pattern}")
    elif path.exists():
        matches = [path]
    else:
        raise MtnlgError(f"{key}: no such file or directory: {path}")
    files: list[Path] = []
    for match in matches:
        if match.is_dir():
            found = sorted(p for p in match.rglob("*") if p.is_file() and p.name.lower().endswith(CORPUS_SUFFIXES)
                           and not any(part.startswith(".") for part in p.relative_to(match).parts))
            if not found:
                raise MtnlgError(f"{key}: directory {match} holds no {', '.join(CORPUS_SUFFIXES)} files")
            files.extend(found)
        elif match.is_file():
            files.append(match)
    for file in files:
        if file.stat().st_size == 0:
            raise MtnlgError(f"{key}: {file} is empty; remove it or add text")
    if not files:
        raise MtnlgError(f"{key}: {pattern} names no files")
    return files


# ---------------------------------------------------------------------------------------------------------------
# Main process: bytes to chunks.


def _open(path: Path) -> tuple[BinaryIO, BinaryIO]:
    """(raw file, stream of its text bytes); gzip is recognised by its magic number, not its name."""
    raw = open(path, "rb")
    if raw.read(2) == b"\x1f\x8b":
        raw.seek(0)
        return raw, gzip.GzipFile(fileobj=raw, mode="rb")
    raw.seek(0)
    return raw, raw


def _last_boundary(data: bytes, spec: DocumentSpec) -> int:
    """The end of the last whole document in `data`, or -1 when it holds none."""
    if spec.format == "txt" and spec.document == "paragraph":
        tail = max(0, len(data) - (1 << 16))
        for start in (tail, 0) if tail else (0,):
            last = None
            for last in _PARAGRAPH_BREAK.finditer(data, start):
                pass
            if last is not None:
                return last.end()
        return -1
    end = data.rfind(b"\n")
    return end + 1 if end >= 0 else -1


def _safe_cut(data: bytes, limit: int) -> int:
    """Where to split a document longer than `limit` bytes: the last line break in the second half of its first
    `limit` bytes, else the last space or tab there, else the last character boundary before `limit`."""
    for separator in (b"\n", b" ", b"\t"):
        found = data.rfind(separator, limit // 2, limit)
        if found >= 0:
            return found + 1
    cut = limit
    while cut > 0 and data[cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte: not the start of a character
        cut -= 1
    return cut or limit


def _overlong_document(data: bytes, end: int, spec: DocumentSpec) -> Optional[tuple[int, int]]:
    """(start, stop) of the first document in `data[:end]` (whole documents) longer than the bound, else None."""
    limit = spec.max_document_bytes
    if end <= limit:
        return None
    start = 0
    for separator in (_PARAGRAPH_BREAK if spec.format == "txt" and spec.document == "paragraph"
                      else _LINE_BREAK).finditer(data, 0, end):
        if separator.start() - start > limit:
            return start, separator.start()
        start = separator.end()
    return (start, end) if end - start > limit else None


def read_chunks(path: Path, spec: DocumentSpec, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Chunk]:
    """The file's bytes in chunks of about `chunk_bytes`, each ending at a document boundary, or inside a document
    longer than `spec.max_document_bytes` where it is split (see the module docstring)."""
    raw, stream = _open(path)
    limit = spec.max_document_bytes
    whole_file = spec.format == "txt" and spec.document == "file"
    offset, line, accounted, skipped = 0, 1, 0, 0

    def chunk(data: bytes, split: bool = False) -> Chunk:
        nonlocal offset, line, accounted, skipped
        position = raw.tell()
        made = Chunk(str(path), offset, line, data, position - accounted, split, skipped)
        accounted, skipped = position, 0
        offset += len(data)
        line += data.count(b"\n")
        return made

    def skip_line(length: int) -> None:
        """Counts an overlong JSONL line of which `length` bytes (and its line break, if read) are dropped."""
        nonlocal offset, skipped
        if not spec.skip_bad_lines:
            raise MtnlgError(f"{path}:{line}: a line longer than data.max_document_bytes ({limit:,} bytes); "
                             "raise data.max_document_bytes, or set data.skip_bad_lines to skip such lines")
        offset += length
        skipped += 1

    with raw, stream:
        carry, skipping = b"", False
        try:
            while True:
                block = stream.read(chunk_bytes)
                data = carry + block
                if skipping:  # the rest of an overlong JSONL line
                    newline = data.find(b"\n")
                    offset += len(data) if newline < 0 else newline + 1
                    line += newline >= 0
                    data, skipping = (b"", True) if newline < 0 else (data[newline + 1:], False)
                end = -1 if whole_file else _last_boundary(data, spec)
                while end > 0:  # whole documents, but maybe one that is too long
                    overlong = _overlong_document(data, end, spec)
                    if overlong is None:
                        yield chunk(data[:end])
                        data = data[end:]
                        break
                    start, stop = overlong
                    if start:
                        yield chunk(data[:start])
                        data, end, stop = data[start:], end - start, stop - start
                    if spec.format == "jsonl":
                        skip_line(stop + 1)
                        line += 1
                        data, end = data[stop + 1:], end - stop - 1
                        continue
                    while stop > limit:
                        cut = _safe_cut(data, limit)
                        yield chunk(data[:cut], split=True)
                        data, end, stop = data[cut:], end - cut, stop - cut
                while len(data) > limit:  # an unfinished document, already too long
                    if spec.format == "jsonl":
                        skip_line(len(data))
                        data, skipping = b"", True
                        break
                    cut = _safe_cut(data, limit)
                    yield chunk(data[:cut], split=True)
                    data = data[cut:]
                if not block:
                    if data or skipped:
                        yield chunk(data)
                    return
                carry = data
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise MtnlgError(f"cannot read {path}: {exc}") from None


# ---------------------------------------------------------------------------------------------------------------
# Workers (and tokenizer training): chunks to documents.


def decode(chunk: Chunk, errors: str) -> str:
    data = chunk.data
    if chunk.offset == 0 and data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        text = data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as exc:
        position = chunk.offset + exc.start + (len(chunk.data) - len(data))
        line = chunk.line + chunk.data[:position - chunk.offset].count(b"\n")
        raise MtnlgError(f"{chunk.path}: invalid UTF-8 at byte {position} (line {line}); "
                         "use --errors replace to replace bad bytes and continue") from None
    return text.replace("\r\n", "\n") if "\r" in text else text


def chunk_documents(chunk: Chunk, spec: DocumentSpec) -> tuple[list[str], int]:
    """The non-blank documents of a chunk, and how many malformed or overlong JSONL lines were skipped."""
    text = decode(chunk, spec.errors)
    if spec.format == "jsonl":
        docs, bad = _jsonl_documents(text, chunk, spec)
        return docs, bad + chunk.skipped_lines
    if spec.document == "file":
        parts = [text.strip("\n")]
    elif spec.document == "paragraph":
        parts = [p.strip("\n") for p in _PARAGRAPH_SPLIT.split(text)]
    else:
        parts = text.split("\n")
    return [p for p in parts if p and not p.isspace()], 0


def _jsonl_documents(text: str, chunk: Chunk, spec: DocumentSpec) -> tuple[list[str], int]:
    docs, bad = [], 0
    for number, line in enumerate(text.split("\n"), start=chunk.line):
        if not line or line.isspace():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            problem = f"malformed JSON ({exc.msg} at column {exc.colno})"
        except (ValueError, RecursionError) as exc:  # an integer of over 4,300 digits; nesting too deep to parse
            problem = f"JSON that Python cannot read ({str(exc).split(';')[0]})"
        else:
            value = record.get(spec.text_key) if isinstance(record, dict) else None
            if isinstance(value, str) and "\\u" in line:  # only a \u escape can make a lone surrogate
                value = _unicode_or_none(value, spec.errors)
            if isinstance(value, str):
                if value and not value.isspace():
                    docs.append(value)
                continue
            if not isinstance(record, dict):
                problem = "not a JSON object"
            elif spec.text_key not in record:
                keys = ", ".join(list(record)[:8])
                problem = f"no {spec.text_key!r} key (keys: {keys}); set the source's text_key"
            elif isinstance(record[spec.text_key], str):
                problem = (f"{spec.text_key!r} holds a lone surrogate escape (\\ud800-\\udfff), which is not text; "
                           "use --errors replace to replace it")
            else:
                problem = f"{spec.text_key!r} is not a string"
        if not spec.skip_bad_lines:
            raise MtnlgError(f"{chunk.path}:{number}: {problem}; use --skip-bad-lines to skip such lines")
        bad += 1
    return docs, bad


def _unicode_or_none(value: str, errors: str) -> Optional[str]:
    """`value` if it is Unicode text; if it holds a lone surrogate, None, or with errors="replace" the text with
    U+FFFD in the surrogate's place (as invalid UTF-8 bytes are replaced)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace") if errors == "replace" else None
    return value


def training_sentences(files: list[tuple[Path, DocumentSpec]], max_sentences: int, seed: int, *,
                       max_bytes: int) -> list[str]:
    """A uniform random sample of the corpus's lines for the tokenizer, in corpus order: at most `max_sentences`
    of them and at most `max_bytes` bytes of UTF-8 text, so that memory stays bounded however long the lines
    are. A corpus within both bounds is taken whole.

    Lines are cut into pieces of at most 1,000 characters: SentencePiece silently drops sentences longer than
    its `max_sentence_length` (4,192 bytes).
    """
    rng = random.Random(seed)
    # each piece gets a random key and the pieces with the smallest keys that fit are kept: a max-heap on the key
    kept: list[tuple[float, int, str, int]] = []  # (-key, position in the corpus, piece, its bytes)
    kept_bytes = position = 0
    for path, spec in files:
        for chunk in read_chunks(path, spec):
            for doc in chunk_documents(chunk, spec)[0]:
                for line in doc.split("\n"):
                    for start in range(0, len(line), 1000):
                        piece = line[start:start + 1000]
                        if piece.isspace():
                            continue
                        position += 1
                        key, size = rng.random(), len(piece.encode("utf-8"))
                        full = len(kept) >= max_sentences or kept_bytes + size > max_bytes
                        if full and (not kept or key >= -kept[0][0]):
                            continue  # it would be the first to go
                        heapq.heappush(kept, (-key, position, piece, size))
                        kept_bytes += size
                        while len(kept) > max_sentences or kept_bytes > max_bytes:
                            kept_bytes -= heapq.heappop(kept)[3]
    return [piece for _, _, piece, _ in sorted(kept, key=lambda entry: entry[1])]
