"""Fuzzing the files mtnlg reads: JSONL corpora, .idx/.bin datasets, checkpoints (model.safetensors, state.json)
and tokenizer.model. Whatever the bytes, the outcome is a result or one `error: ...` line with exit code 2: never a
traceback, never a hang.

Most examples call the core or `mtnlg_cli.cli.main` in this process (a subprocess costs seconds of torch import);
`test_real_cli_on_damaged_files` runs the real CLI on one damaged file of each kind.
"""

from __future__ import annotations

import json
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from conftest import copy_workspace, run_cli
from mtnlg_cli.cli import main
from mtnlg_cli.data.corpus import DocumentSpec, chunk_documents, read_chunks
from mtnlg_cli.data.indexed_dataset import HEADER, IndexedDataset
from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.workspace import Workspace, init_workspace

TINY = ["data.sources.0.path=data/raw/en_austen_pride.txt", "model.vocab_size=1024", "model.num_layers=2",
        "model.hidden_size=32", "model.num_heads=2", "model.seq_length=32", "model.max_position_embeddings=64",
        "train.micro_batch_size=4", "train.global_batch_size=4", "train.train_iters=2", "train.save_interval=2",
        "train.eval_interval=1000", "train.eval_iters=1", "train.log_interval=1", "train.peak_tflops=1",
        "generate.max_new_tokens=4"]
DATASET = "en_austen_pride"
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class Hang(BaseException):
    """Raised by `time_limit`; a BaseException so that no `except Exception` in the code under test eats it."""


@contextmanager
def time_limit(seconds: float):
    """Turns a hang into a failure: generous, since a hang is forever and a busy machine is only slow."""
    def expire(signum, frame):
        raise Hang(f"still running after {seconds}s: a hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def assert_one_line(exc: MtnlgError) -> None:
    message = str(exc)
    assert message and "\n" not in message and "Traceback" not in message, message


def cli(capsys, monkeypatch, *args: str, seconds: float = 60) -> tuple[int, str]:
    """(exit code, stderr) of `mtnlg ARGS` run in this process; a failure must be one `error:` line, code 2."""
    monkeypatch.setattr("sys.argv", ["mtnlg", *args])
    code = 0
    with time_limit(seconds):
        try:
            main()
        except SystemExit as exit_info:
            code = exit_info.code or 0
    err = capsys.readouterr().err
    if code:
        assert code == 2, err
        assert_ends_in_one_error_line(err)
    return code, err


def assert_ends_in_one_error_line(err: str) -> None:
    """What a failed command leaves on stderr: perhaps a progress display, then one `error: ...` line."""
    assert "Traceback" not in err and err.endswith("\n"), err
    assert err.splitlines()[-1].startswith("error: ") and err.count("error: ") == 1, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Workspace:
    """A tiny workspace with its tokenizer, dataset and a checkpoint of step 2, made once."""

    from mtnlg_cli.training.trainer import train

    workspace = init_workspace(tmp_path_factory.mktemp("fuzz") / "ws", overrides=TINY)
    train(workspace, workspace.load_config())
    return workspace


@pytest.fixture
def ws(trained, tmp_path) -> Workspace:
    return copy_workspace(trained.root, tmp_path / "ws")


@contextmanager
def replaced(path: Path, data: bytes):
    """`path` holds `data` for the duration, then its own bytes again."""
    original = path.read_bytes()
    path.write_bytes(data)
    try:
        yield
    finally:
        path.write_bytes(original)


def mutations(original: bytes) -> st.SearchStrategy[bytes]:
    """Bytes like `original`, damaged: truncated, extended, with bytes overwritten, or wholly random."""
    def overwrite(data: bytes, edits: list[tuple[int, int]]) -> bytes:
        out = bytearray(data)
        for position, value in edits:
            out[position % len(out)] = value
        return bytes(out)

    return st.one_of(
        st.integers(0, len(original) - 1).map(lambda n: original[:n]),
        st.binary(min_size=1, max_size=64).map(lambda tail: original + tail),
        st.lists(st.tuples(st.integers(0, len(original) - 1), st.integers(0, 255)), min_size=1,
                 max_size=8).map(lambda edits: overwrite(original, edits)),
        st.binary(max_size=256),
    )


# ---------------------------------------------------------------------------------------------------------------
# JSONL corpora.

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                       max_size=3), max_leaves=6)
jsonl_lines = st.one_of(
    st.builds(lambda text, extra: json.dumps({**extra, "text": text}, ensure_ascii=False), st.text(max_size=40),
              st.dictionaries(st.text(max_size=4), json_values, max_size=2)),  # a document (or a blank one)
    json_values.map(json.dumps),  # JSON, mostly not an object with a text
    st.text(max_size=30),  # mostly not JSON
    st.integers(1, 3000).map(lambda depth: "[" * depth + "]" * depth),  # nested deeper than the parser recurses
    st.integers(4000, 5000).map(lambda digits: '{"text": "x", "n": ' + "7" * digits + "}"),  # int too long
    st.sampled_from([r'{"text": "a\ud800b"}', r'{"text": "\udfff"}', r'{"text": "\ud83d\ude00 ok"}']),  # surrogates
).map(lambda line: line.encode("utf-8", errors="surrogatepass"))
jsonl_files = st.lists(jsonl_lines | st.binary(max_size=20), max_size=12).map(lambda lines: b"\n".join(lines))


@settings(FUZZ, max_examples=300)
@given(data=jsonl_files, errors=st.sampled_from(["strict", "replace"]), skip_bad_lines=st.booleans(),
       chunk_bytes=st.integers(1, 300))
def test_random_jsonl_becomes_documents_or_one_error_line(trained, tmp_path, data, errors, skip_bad_lines,
                                                          chunk_bytes):
    from mtnlg_cli.data.preprocess import encode_chunk
    from mtnlg_cli.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(trained.tokenizer_dir)
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(data)
    spec = DocumentSpec("jsonl", errors=errors, skip_bad_lines=skip_bad_lines)
    try:
        with time_limit(30):
            documents = [d for chunk in read_chunks(path, spec, chunk_bytes) for d in chunk_documents(chunk, spec)[0]]
            encoded = [encode_chunk(chunk, spec, tokenizer, np.dtype(np.uint16))
                       for chunk in read_chunks(path, spec, chunk_bytes)]
    except MtnlgError as exc:
        assert_one_line(exc)
        assert not (skip_bad_lines and errors == "replace"), f"nothing is an error in this mode: {exc}"
        return
    # chunk boundaries change nothing; every document is text that round-trips through the tokenizer
    whole = [d for chunk in read_chunks(path, spec) for d in chunk_documents(chunk, spec)[0]]
    assert documents == whole
    assert sum(len(lengths) for _, lengths, _ in encoded) == len(documents)
    for document in documents:
        assert document.strip() and tokenizer.decode(tokenizer.encode(document)) == document


def is_document(line: bytes) -> bool:
    """Whether a JSONL line is an object whose "text" is non-blank Unicode text."""
    try:
        record = json.loads(line)
        text = record["text"]
        return isinstance(text, str) and bool(text.strip()) and bool(text.encode("utf-8"))
    except (ValueError, RecursionError, TypeError, KeyError):
        return False


@settings(FUZZ, max_examples=16)
@given(data=jsonl_files, lenient=st.booleans())
@example(data='{"text": "It is a truth"}\n{"id": 1, "text": "universally acknowledged \u00e9"}\n'.encode(),
         lenient=False)
def test_cli_preprocess_of_random_jsonl_is_a_dataset_or_one_error_line(ws, capsys, monkeypatch, data, lenient):
    path = ws.root / "fuzz.jsonl"
    path.write_bytes(data)
    code, err = cli(capsys, monkeypatch, "preprocess", str(path), "-w", str(ws.root), "-j", "1",
                    *(["--skip-bad-lines", "--errors", "replace"] if lenient else []))
    event(f"{'lenient' if lenient else 'strict'}: exit {code}")
    lines = [line for line in data.split(b"\n") if line.strip()]
    if lines and (any if lenient else all)(map(is_document, lines)):
        assert code == 0, err
    if code == 0:
        dataset = IndexedDataset(ws.tokenized_dir / "fuzz")
        assert len(dataset) > 0 and dataset.token_count > 0


# ---------------------------------------------------------------------------------------------------------------
# Datasets: .idx and .bin.

MAGIC = b"MMIDIDX\x00\x00"


@st.composite
def index_files(draw) -> bytes:
    """A Megatron index whose header and arrays say anything: counts that lie, negative lengths, wild pointers."""
    sequences, documents = draw(st.integers(0, 6)), draw(st.integers(0, 8))
    anything = st.integers(-2**31, 2**31 - 1)
    lengths = draw(st.lists(st.integers(-2, 40) | anything, min_size=sequences, max_size=sequences))
    pointers = draw(st.lists(st.integers(-4, 300) | st.integers(-2**63, 2**63 - 1), min_size=sequences,
                             max_size=sequences))
    document_indices = draw(st.lists(st.integers(-2, 8) | st.integers(-2**63, 2**63 - 1), min_size=documents,
                                     max_size=documents))
    declared = draw(st.tuples(st.just(sequences) | st.integers(0, 2**64 - 1),
                              st.just(documents) | st.integers(0, 2**64 - 1)))
    code = draw(st.sampled_from([8, 8, 8, 1, 4, 5, 6, 0, 9]))
    return (HEADER.pack(MAGIC, 1, code, *declared) + np.array(lengths, np.int32).tobytes()
            + np.array(pointers, np.int64).tobytes() + np.array(document_indices, np.int64).tobytes())


def read_everything(dataset: IndexedDataset) -> None:
    """Reads every document; each must be exactly as long as the index says (numpy would clip silently)."""
    assert (dataset.document_lengths >= 0).all()
    for i in range(len(dataset)):
        assert len(dataset.document(i)) == dataset.document_lengths[i]


@settings(FUZZ, max_examples=300)
@given(index=index_files() | st.binary(max_size=120), bin_data=st.binary(max_size=400))
def test_any_index_and_bin_open_consistently_or_are_refused(tmp_path, index, bin_data):
    prefix = tmp_path / "fuzz"
    Path(f"{prefix}.idx").write_bytes(index)
    Path(f"{prefix}.bin").write_bytes(bin_data)
    try:
        with time_limit(30):
            read_everything(IndexedDataset(prefix))
    except MtnlgError as exc:
        assert_one_line(exc)


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_damaged_dataset_files_train_and_evaluate_or_are_refused(trained, data):
    """The workspace's own .idx or .bin, damaged, read as training and validation samples and as eval documents."""
    from mtnlg_cli.data.samples import open_split, split_documents

    which = data.draw(st.sampled_from([".idx", ".bin"]))
    path = trained.tokenized_dir / f"{DATASET}{which}"
    original = path.read_bytes()
    random_tokens = st.integers(0, 2**32 - 1).map(  # a .bin of the right size holding any ids at all
        lambda seed: np.random.default_rng(seed).integers(0, 2**16, len(original) // 2, np.uint16).tobytes())
    damaged = data.draw(mutations(original) | (index_files() if which == ".idx" else random_tokens))
    config = trained.load_config()
    with replaced(path, damaged):
        try:
            with time_limit(30):
                for split in ("train", "valid"):
                    samples = open_split(trained, config, split)
                    batch = samples.batch(range(0, 64, 3))
                    assert batch.shape == (22, config.model.seq_length + 1)
                    assert (0 <= batch).all() and (batch < config.model.vocab_size).all()
                for document in split_documents(trained, config, "valid"):
                    assert ((0 <= document) & (document < config.model.vocab_size)).all()
        except MtnlgError as exc:
            assert_one_line(exc)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints and the tokenizer.

json_documents = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


@st.composite
def damaged_states(draw, original: bytes) -> bytes:
    """The checkpoint's state.json with keys removed or given other JSON values, or not JSON at all."""
    state = json.loads(original)
    for key in draw(st.lists(st.sampled_from(sorted(state)), min_size=1, max_size=3, unique=True)):
        if draw(st.booleans()):
            del state[key]
        else:
            state[key] = draw(json_documents)
    config = state.get("model_config")
    if isinstance(config, dict) and config and draw(st.booleans()):  # the model's shape, the likeliest to hurt
        config[draw(st.sampled_from(sorted(config)))] = draw(json_documents | st.integers(-3, 5000))
    return json.dumps(state).encode()


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_damaged_checkpoint_files_load_or_are_refused(trained, data):
    from mtnlg_cli.checkpoint import latest_checkpoint, load_for_inference

    folder = latest_checkpoint(trained.checkpoints_dir)
    name = data.draw(st.sampled_from(["model.safetensors", "state.json", "tokenizer"]))
    path = trained.tokenizer_dir / "tokenizer.model" if name == "tokenizer" else folder / name
    original = path.read_bytes()
    damaged = data.draw(st.one_of(damaged_states(original), damaged_states(original), mutations(original))
                        if name == "state.json" else mutations(original))
    with replaced(path, damaged):
        try:
            with time_limit(30):
                model, tokenizer, _ = load_for_inference(trained)
                ids = tokenizer.encode("It is a truth")
                assert model(__import__("torch").tensor([ids])).shape[:2] == (1, len(ids))
        except MtnlgError as exc:
            assert_one_line(exc)


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_training_resumes_from_a_damaged_state_json_or_refuses(ws, data):

    from mtnlg_cli.checkpoint import latest_checkpoint
    from mtnlg_cli.training.trainer import train

    path = latest_checkpoint(ws.checkpoints_dir) / "state.json"
    with replaced(path, data.draw(damaged_states(path.read_bytes()))):
        try:
            with time_limit(60):
                result = train(ws, ws.load_config(["train.train_iters=3", "train.save_interval=1000"]),)
            assert result.final_step == 3
            assert result.run_dir.parent == ws.runs_dir
            event("resumed")
        except MtnlgError as exc:
            assert_one_line(exc)
            event(f"refused: {str(exc)[:60]}")
        finally:
            for saved in ws.checkpoints_dir.glob("step_0000003"):
                shutil.rmtree(saved)


# ---------------------------------------------------------------------------------------------------------------
# The commands, on damaged files.

DAMAGEABLE = {  # file -> the commands that read it
    "model.safetensors": ["generate", "eval", "info"],
    "state.json": ["generate", "eval", "info"],
    "tokenizer.model": ["generate", "eval", "info", "preprocess"],
    f"{DATASET}.idx": ["eval", "info"],
    f"{DATASET}.bin": ["eval", "info"],
}
COMMANDS = {"generate": ["generate", "It is a truth"], "eval": ["eval", "--split", "valid"], "info": ["info"],
            "preprocess": ["preprocess"]}


def damageable_path(ws: Workspace, name: str) -> Path:
    from mtnlg_cli.checkpoint import latest_checkpoint

    if name == "tokenizer.model":
        return ws.tokenizer_dir / name
    if name.startswith(DATASET):
        return ws.tokenized_dir / name
    return latest_checkpoint(ws.checkpoints_dir) / name


@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_commands_on_a_damaged_file_succeed_or_print_one_error_line(trained, capsys, monkeypatch, data):
    name = data.draw(st.sampled_from(sorted(DAMAGEABLE)))
    command = data.draw(st.sampled_from(DAMAGEABLE[name]))
    path = damageable_path(trained, name)
    original = path.read_bytes()
    damaged = data.draw(damaged_states(original) | mutations(original) if name == "state.json"
                        else mutations(original))
    with replaced(path, damaged):
        code, err = cli(capsys, monkeypatch, *COMMANDS[command], "-w", str(trained.root))
    event(f"{command} {name}: exit {code}")


@pytest.mark.parametrize("name, command", [("model.safetensors", "generate"), ("tokenizer.model", "eval"),
                                           (f"{DATASET}.idx", "train"), ("state.json", "info"),
                                           ("corpus.jsonl", "preprocess")])
def test_real_cli_on_a_damaged_file(ws, name, command):
    """The installed entry point in a subprocess: one `error:` line (or success for info), within a time limit."""
    args = {**COMMANDS, "train": ["train", "--set", "train.train_iters=3"]}[command]
    if name == "corpus.jsonl":
        (ws.root / name).write_text('{"text": "fine"}\n{"text": "\\ud800"}\n' + "[" * 5000 + "\n")
        args = ["preprocess", name]
    else:
        path = damageable_path(ws, name)
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2] + bytes(reversed(data[len(data) // 2:])))
    result = run_cli(*args, "-w", str(ws.root), timeout=120)
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    if command == "info":
        assert result.returncode == 0 and "state.json" in result.stdout.replace("\n", ""), result.stdout
    else:
        assert result.returncode == 2, result.stderr
        assert_ends_in_one_error_line(result.stderr)
