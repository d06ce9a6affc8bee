"""Any language out of the box: the default vocabulary is chosen from the corpus, the README's commands train and
generate Chinese, mixed English and Chinese, and Greek; cloze works on text without spaces; bits per byte of Chinese
is what the token log-likelihoods give; streamed text never shows a broken character."""

from __future__ import annotations

import codecs
import json
import math
import os
import random
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mtnlg_cli.config import AUTO_VOCAB_SIZE, load_config
from mtnlg_cli.errors import ConfigError, MtnlgError

HAN = re.compile(r"[\u4e00-\u9fff]")
GREEK = re.compile(r"[\u0370-\u03ff\u1f00-\u1fff]")
# The README's commands with the default config, trained for a moment (two small steps) instead of 300 steps.
BRIEFLY = [f"--set={key}" for key in ("train.train_iters=2", "train.micro_batch_size=4", "train.global_batch_size=4",
                                      "train.eval_iters=1", "train.peak_tflops=1")]
GREEK_WORDS = ("και το η ο της του να είναι με για από στο στη θάλασσα ήλιος σπίτι νερό ουρανός φίλος δρόμος πόλη "
               "χωριό βιβλίο γράμμα καλός μεγάλος μικρός άνθρωπος παιδί μέρα νύχτα χρόνος ζωή αγάπη ελπίδα ψυχή "
               "φως γη βουνό δέντρο λουλούδι πουλί τραγούδι μουσική γλώσσα ιστορία").split()


def han_corpus(shared_data: Path) -> str:
    """The shared Chinese text and, four times each, 3,000 CJK ideographs it lacks: a corpus whose characters need
    more than the default 4,000 pieces, as any sizeable Chinese corpus's do."""
    text = (shared_data / "zh_poems_and_debian_faq.txt").read_text(encoding="utf-8")
    present = set(text)
    rare = [chr(c) for c in range(0x4E00, 0xA000) if chr(c) not in present][:3000]
    lines = ["".join(rare[(i + j) % len(rare)] for j in range(12)) + "。" for i in range(0, 4 * len(rare), 12)]
    return text + "\n\n" + "\n".join(lines) + "\n"


def greek_corpus() -> str:
    """Greek sentences of real words, and every letter of the Greek block's lower case (U+03B1-U+03C9)."""
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(GREEK_WORDS) for _ in range(rng.randint(5, 15))).capitalize() + "."
                 for _ in range(400)]
    alphabet = " ".join(chr(c) for c in range(0x3B1, 0x3CA))
    return "\n\n".join(" ".join(sentences[i:i + 4]) for i in range(0, len(sentences), 4)) + "\n\n" + alphabet + "\n"


def mtnlg(*args: str):
    from typer.testing import CliRunner

    from mtnlg_cli.cli import app

    return CliRunner().invoke(app, list(args), env={"COLUMNS": "250"})


def readme_commands(root: Path, corpus: dict[str, str], prompt: str) -> dict:
    """`mtnlg init demo && cd demo && mtnlg preprocess && mtnlg train && mtnlg generate PROMPT` with `corpus` alone
    in data/raw; each command's result, and `info --json` before and after preprocess."""
    results = {"init": mtnlg("init", str(root))}
    for sample in (root / "data" / "raw").iterdir():
        sample.unlink()
    for name, text in corpus.items():
        (root / "data" / "raw" / name).write_text(text, encoding="utf-8")
    here = Path.cwd()
    os.chdir(root)
    try:
        results["info_before"] = mtnlg("info", "--json")
        results["preprocess"] = mtnlg("preprocess")
        results["info_after"] = mtnlg("info", "--json")
        results["train"] = mtnlg("train", *BRIEFLY)
        results["generate"] = mtnlg("generate", prompt, "-n", "40", "--seed", "1")
    finally:
        os.chdir(here)
    for name, result in results.items():
        assert result.exit_code == 0, f"{name}: {result.output}"
    return results


def vocabulary_notice(results: dict) -> str:
    [line] = [line for line in results["preprocess"].output.splitlines() if "model.vocab_size is auto" in line]
    return line


@pytest.fixture(scope="module")
def chinese(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("zh") / "demo"
    return root, readme_commands(root, {"zh.txt": han_corpus(shared_data)}, "春眠不觉晓，")


def test_readme_commands_train_and_generate_chinese_with_a_vocabulary_chosen_from_the_corpus(chinese):
    root, results = chinese
    before, after = (json.loads(results[key].output) for key in ("info_before", "info_after"))
    assert before["config"]["model"]["vocab_size"] == "auto" and not before["tokenizer"]["present"]
    size = after["tokenizer"]["vocab_size"]
    assert size > AUTO_VOCAB_SIZE and size % 128 == 0 and after["config"]["model"]["vocab_size"] == size
    needed = int(re.search(r"characters need ([\d,]+)", vocabulary_notice(results))[1].replace(",", ""))
    assert f"gets {size:,} pieces, not {AUTO_VOCAB_SIZE:,}" in vocabulary_notice(results) and needed < size
    assert after["model"]["parameters"] > before["model"]["parameters"]  # the larger embedding, once it is known
    state = json.loads((root / "checkpoints" / "latest" / "state.json").read_text())
    assert state["model_config"]["vocab_size"] == size and state["config"]["model"]["vocab_size"] == size
    text = results["generate"].output
    assert len(HAN.findall(text)) >= 10 and "\ufffd" not in text


def test_memory_check_before_training_sizes_an_auto_vocabulary_as_the_tokenizer_made_it(chinese, monkeypatch):
    from mtnlg_cli.data.tokenizer import Tokenizer
    from mtnlg_cli.training import memory
    from mtnlg_cli.training.trainer import train
    from mtnlg_cli.workspace import Workspace

    class Checked(Exception):
        pass

    checked = []

    def check_memory(config, *args):
        checked.append(config.model.vocab_size)
        raise Checked

    monkeypatch.setattr(memory, "check_memory", check_memory)
    workspace = Workspace(chinese[0])
    with pytest.raises(Checked):
        train(workspace, workspace.load_config())
    assert workspace.load_config().model.vocab_size == "auto"
    assert checked == [Tokenizer.load(workspace.tokenizer_dir).vocab_size] and checked[0] > AUTO_VOCAB_SIZE


def test_explicit_vocab_size_too_small_or_too_large_stays_an_error(tmp_path, shared_data):
    for corpus, size, message in ((han_corpus(shared_data), 4000, r"model.vocab_size=4000 is smaller than the "
                                   r"[\d,]+ characters and special tokens this corpus needs"),
                                  (greek_corpus(), 4000, r"model.vocab_size=4000 is larger than this corpus "
                                   r"supports \(at most \d+\)")):
        root = tmp_path / f"ws{size}{len(corpus)}"
        assert mtnlg("init", str(root), "--set", f"model.vocab_size={size}").exit_code == 0
        for sample in (root / "data" / "raw").iterdir():
            sample.unlink()
        (root / "data" / "raw" / "corpus.txt").write_text(corpus, encoding="utf-8")
        result = mtnlg("preprocess", "-w", str(root))
        assert isinstance(result.exception, MtnlgError) and re.search(message, str(result.exception)), result.output


def test_readme_commands_on_mixed_english_and_chinese(tmp_path, shared_data):
    english = (shared_data / "en_austen_pride_sense.txt").read_text(encoding="utf-8")[:60_000]
    results = readme_commands(tmp_path / "demo", {"en.txt": english, "zh.txt": han_corpus(shared_data)},
                              "It is a truth universally acknowledged")
    size = json.loads(results["info_after"].output)["tokenizer"]["vocab_size"]
    assert f"gets {size:,} pieces" in vocabulary_notice(results) and size > AUTO_VOCAB_SIZE
    from mtnlg_cli.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tmp_path / "demo" / "tokenizer")
    for sample in ("It is a truth universally acknowledged, 春眠不觉晓。", english[5000:7000]):
        assert tokenizer.decode(tokenizer.encode(sample)) == sample
    text = results["generate"].output.strip()
    assert text and "\ufffd" not in text and re.search(r"[A-Za-z\u4e00-\u9fff]", text)


def test_readme_commands_on_greek(tmp_path):
    results = readme_commands(tmp_path / "demo", {"el.txt": greek_corpus()}, "Η θάλασσα")
    size = json.loads(results["info_after"].output)["tokenizer"]["vocab_size"]
    assert f"gets {size:,} pieces, not {AUTO_VOCAB_SIZE:,}: it supports at most {size:,}" in vocabulary_notice(
        results)
    text = results["generate"].output  # a model this young soon picks the end of a document
    assert GREEK.search(text) and "\ufffd" not in text


def test_vocab_size_is_an_integer_or_auto():
    assert load_config({}).model.vocab_size == "auto"
    assert load_config({}).model.padded_vocab_size == 4096  # sizes are estimated with AUTO_VOCAB_SIZE until known
    resolved = load_config({}).with_tokenizer_vocab(7000)
    assert resolved.model.vocab_size == 7000 and resolved.model.padded_vocab_size == 7040
    explicit = load_config({"model": {"vocab_size": 500}})
    assert explicit.with_tokenizer_vocab(7000) is explicit and explicit.with_tokenizer_vocab(None) is explicit
    for value, message in (("many", "model.vocab_size='many' must be an integer or auto"),
                           (0, "model.vocab_size=0 must be positive"), (True, "must be an integer or auto")):
        with pytest.raises(ConfigError, match=message):
            load_config({"model": {"vocab_size": value}})


# ---------------------------------------------------------------------------------------------------------------
# Cloze without spaces, and bits per byte of Chinese, on the model the README's commands trained.


def test_cloze_set_built_from_chinese_text_is_token_aligned_and_scored(chinese, shared_data, tmp_path):
    from mtnlg_cli.data.tokenizer import Tokenizer
    from mtnlg_cli.evaluation import scoring as ev

    root, _ = chinese
    tokenizer = Tokenizer.load(root / "tokenizer")
    text = (shared_data / "zh_poems_and_debian_faq.txt").read_text(encoding="utf-8")
    source = tmp_path / "faq.txt"  # paragraphs of the Debian FAQ in Chinese
    source.write_text(text[text.index("Debian GNU/Linux 常见问题"):][:10_000], encoding="utf-8")
    items = ev.build_cloze_items("\n\n".join(ev.read_texts(source)), tokenizer, min_words=20)
    assert len([item for item in items if HAN.search(item.target)]) > 30
    for item in items:
        if not HAN.search(item.target):
            continue  # a paragraph that ends in a Latin word: its target is that word, as in English
        whole = tokenizer.encode(item.context + item.target)
        context_ids, target_ids = ev.encode_pair(tokenizer, item.context, item.target, tokenizer.eos_id)
        assert context_ids + target_ids == whole  # the cut is one the tokenizer makes anyway
        last_word = (item.context + item.target).split()[-1]
        assert sum(map(str.isalnum, item.target)) >= min(ev.TARGET_CHARS, sum(map(str.isalnum, last_word)))
    han_targets = [item.target for item in items if HAN.search(item.target)]
    assert sum(len(target) == ev.TARGET_CHARS for target in han_targets) > len(han_targets) / 2  # the shortest

    result = mtnlg("eval", "-w", str(root), "--task", "cloze", "--from", str(source), "-o", str(tmp_path / "c.json"))
    assert result.exit_code == 0, result.output
    [scores] = json.loads((tmp_path / "c.json").read_text())["results"].values()
    assert scores["items"] == len(items) and 0 <= scores["acc"] <= 1 and scores["perplexity"] > 1
    wider = mtnlg("eval", "-w", str(root), "--task", "cloze", "--from", str(source), "--target-chars", "4",
                  "-o", str(tmp_path / "c4.json"))
    assert wider.exit_code == 0, wider.output
    [wide] = json.loads((tmp_path / "c4.json").read_text())["results"].values()
    assert wide["items"] == len(items) and wide["perplexity"] > scores["perplexity"]  # more to predict per item

    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text('{"text": "兰叶春葳蕤，桂华秋皎洁"}\n{"text": "洁"}\n', encoding="utf-8")
    with pytest.raises(MtnlgError, match="items.jsonl:2: a cloze text needs some context before the characters"):
        ev.read_cloze_items(jsonl, tokenizer)


def test_bits_per_byte_of_chinese_is_the_token_nll_over_utf8_bytes(chinese, shared_data, tmp_path):
    from mtnlg_cli.checkpoint import load_for_inference
    from mtnlg_cli.evaluation import scoring as ev
    from mtnlg_cli.workspace import Workspace

    root, _ = chinese
    poems = [p for p in (shared_data / "zh_poems_and_debian_faq.txt").read_text(encoding="utf-8").split("%\n")
             if p.strip()][:6]
    data = tmp_path / "poems.txt"
    data.write_text("\n\n".join(p.strip() for p in poems) + "\n", encoding="utf-8")
    result = mtnlg("eval", "-w", str(root), "--data", str(data), "-o", str(tmp_path / "ppl.json"))
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "ppl.json").read_text())["results"][str(data)]

    model, tokenizer, checkpoint = load_for_inference(Workspace(root), device="cpu")
    documents = ev.read_texts(data)  # the poems (the last with the file's final newline)
    assert len(documents) == len(poems)
    nll = tokens = 0
    for document in documents:
        ids = tokenizer.encode(document)
        assert len(ids) <= checkpoint.config_int("model", "seq_length")  # one window: the sum is the whole score
        sequence = torch.tensor([[tokenizer.eos_id, *ids]])
        with torch.no_grad():
            logits = model(sequence[:, :-1])[0].double()
        nll += float(F.cross_entropy(logits, sequence[0, 1:], reduction="sum"))
        tokens += len(ids)
    num_bytes = sum(len(document.encode("utf-8")) for document in documents)
    assert num_bytes > 2.5 * sum(map(len, documents))  # most characters are Han, three bytes each
    assert (metrics["tokens"], metrics["bytes"]) == (tokens, num_bytes)
    assert metrics["bits_per_byte"] == pytest.approx(nll / math.log(2) / num_bytes, rel=1e-4)
    assert metrics["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Bytes and streamed text.


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory, shared_data):
    """A tokenizer so small that most Han characters fall back to bytes."""
    from mtnlg_cli.data.tokenizer import train_tokenizer

    english = (shared_data / "en_austen_pride_sense.txt").read_text(encoding="utf-8")[:20_000].splitlines()
    chinese = (shared_data / "zh_poems_and_debian_faq.txt").read_text(encoding="utf-8")[:300].splitlines()
    return train_tokenizer([line for line in english + chinese if line], tmp_path_factory.mktemp("tok"), 600)


# SentencePiece shows each byte that forms no character as U+FFFD; Python's "replace" one U+FFFD per bad sequence.
codecs.register_error("one-per-byte", lambda error: ("\ufffd" * (error.end - error.start), error.end))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_decode_bytes_is_what_sentencepiece_decodes(small_tokenizer, data):
    tokenizer = small_tokenizer
    kinds = {"byte": [i for i in range(tokenizer.vocab_size) if tokenizer.sp.is_byte(i)],
             "special": [tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id,
                         *tokenizer.role_ids.values(), tokenizer.token_id("\n")],
             "text": [i for i in range(tokenizer.vocab_size) if not tokenizer.sp.is_byte(i)]}
    ids = data.draw(st.lists(st.sampled_from(sorted(kinds)).flatmap(lambda kind: st.sampled_from(kinds[kind])),
                             max_size=10))
    shown = tokenizer.decode_bytes(ids).decode("utf-8", "one-per-byte")
    # SentencePiece ends a run of byte pieces at a control token, which has no bytes: there the two differ
    controls = "".join("b" if tokenizer.sp.is_byte(i) else "c" if tokenizer.sp.is_control(i) else "t" for i in ids)
    if not re.search("bc+b", controls):
        assert shown == tokenizer.decode(ids)
    assert tokenizer.decode_bytes(ids[:-1]) == tokenizer.decode_bytes(ids)[:len(tokenizer.decode_bytes(ids[:-1]))]


@pytest.fixture(scope="module")
def hugging_face_tokenizers(small_tokenizer, shared_data, tmp_path_factory):
    """The pretrained-tokenizer backend with the two decoders language models use: a GPT-2-style byte-level BPE
    trained with the `tokenizers` library, and the SentencePiece tokenizer above as a tokenizer.json (pieces with
    byte fallback, as Llama 2's)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from mtnlg_cli.convert.hf_tokenizer import tokenizer_json
    from mtnlg_cli.data.tokenizer import Tokenizer

    byte_level = Backend(models.BPE())
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level.decoder = decoders.ByteLevel()
    byte_level.train_from_iterator(
        [(shared_data / "en_austen_pride_sense.txt").read_text(encoding="utf-8")[:20_000],
         (shared_data / "zh_poems_and_debian_faq.txt").read_text(encoding="utf-8")[:5_000]],
        trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"], show_progress=False,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folders = {"byte_level": tmp_path_factory.mktemp("byte_level"),
               "sentencepiece_style": tmp_path_factory.mktemp("sentencepiece_style")}
    byte_level.save(str(folders["byte_level"] / "tokenizer.json"))
    (folders["sentencepiece_style"] / "tokenizer.json").write_text(
        json.dumps(tokenizer_json(small_tokenizer.path), ensure_ascii=False), encoding="utf-8")
    for folder, eos in ((folders["byte_level"], "<|endoftext|>"), (folders["sentencepiece_style"], "</s>")):
        (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}))
    return {kind: Tokenizer.load(folder) for kind, folder in folders.items()}


@pytest.mark.parametrize("kind", ["byte_level", "sentencepiece_style"])
def test_decode_bytes_of_a_pretrained_tokenizer_is_what_its_decoder_gives(hugging_face_tokenizers, kind):
    tokenizer = hugging_face_tokenizers[kind]
    assert tokenizer.backend == "huggingface"
    rng = random.Random(0)
    for _ in range(3000):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(0, 8))]
        data = tokenizer.decode_bytes(ids)
        assert tokenizer.decode_bytes(ids[:-1]) == data[:len(tokenizer.decode_bytes(ids[:-1]))]
        if kind == "byte_level":  # the library decodes the bytes as Python's "replace" does
            assert data.decode("utf-8", "replace") == tokenizer.decode(ids)
        elif "\ufffd" not in data.decode("utf-8", "replace"):  # byte fallback: a bad run is U+FFFD per token
            assert data.decode("utf-8") == tokenizer.decode(ids)


def test_stream_of_a_byte_level_tokenizer_waits_for_whole_characters(hugging_face_tokenizers, shared_data):
    from mtnlg_cli.inference.engine import TextStream

    tokenizer = hugging_face_tokenizers["byte_level"]
    text = (shared_data / "zh_poems_and_debian_faq.txt").read_text(encoding="utf-8")[6_000:6_300]
    ids = tokenizer.encode(text)
    cut = [i for i in ids if tokenizer.decode([i]).count("\ufffd")]  # tokens that hold part of a character
    assert len(cut) > 20
    stream = TextStream(tokenizer, [])
    pieces = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == text and all("\ufffd" not in piece for piece in pieces) and "" in pieces


def stream(tokenizer, pieces: list[str], errors: str = "drop", stop=()) -> list[str]:
    """What TextStream hands out for each of the tokens `pieces` (then for the end of the row)."""
    from mtnlg_cli.inference.engine import TextStream

    text = TextStream(tokenizer, tokenizer.encode("Once upon a time"), stop, errors)
    return [text.push(tokenizer.token_id(piece)) for piece in pieces] + [text.finish()]


def byte_pieces(text: str) -> list[str]:
    return [f"<0x{b:02X}>" for b in text.encode("utf-8")]


def test_stream_holds_back_a_character_until_its_last_byte(small_tokenizer):
    tokenizer = small_tokenizer
    pieces = ["\u2581the", *byte_pieces("龘"), *byte_pieces("😀"), "\u2581the", *byte_pieces("é")]
    assert all(tokenizer.token_id(p) != tokenizer.unk_id for p in pieces)
    out = stream(tokenizer, pieces)
    assert out == [" the", "", "", "龘", "", "", "", "😀", " the", "", "é", ""]
    assert stream(tokenizer, pieces, "replace") == out  # nothing invalid: nothing replaced


def test_stream_drops_invalid_bytes_or_replaces_them_when_asked(small_tokenizer):
    tokenizer = small_tokenizer
    cut = byte_pieces("龘")[:2]  # a character that never gets its last byte
    pieces = [*cut, "\u2581the", "<0xFF>", *byte_pieces("世"), "<0x80>", *cut]
    dropped = stream(tokenizer, pieces)
    assert "".join(dropped) == " the世" and all("\ufffd" not in piece for piece in dropped)
    assert dropped[2] == " the" and dropped[6] == "世"
    replaced = stream(tokenizer, pieces, "replace")
    assert "".join(replaced) == "\ufffd the\ufffd世\ufffd\ufffd"
    assert replaced[-1] == "\ufffd"  # the cut character at the end of the row
    # a stop string is found across characters that came byte by byte
    assert "".join(stream(tokenizer, [*byte_pieces("春眠不觉晓"), "\u2581the"], stop=["觉"])) == "春眠不"


def test_generator_drops_or_replaces_bytes_the_model_emits_that_form_no_character(small_tokenizer):
    from mtnlg_cli.inference.engine import Generator, SamplingSettings
    from mtnlg_cli.model.architecture import Architecture
    from mtnlg_cli.model.gpt import GPT

    tokenizer = small_tokenizer
    model = GPT(Architecture(vocab_size=640, max_position_embeddings=32, num_layers=1, hidden_size=16, num_heads=2,
                             ffn_hidden_size=32)).eval()
    lead_byte = tokenizer.token_id("<0xE4>")  # begins a three-byte character; two in a row form none
    with torch.no_grad():  # every position's output is the lead byte: the final norm gives a constant hidden state
        model.wte.weight[lead_byte] = torch.eye(16)[0]
        model.ln_f.weight.zero_()
        model.ln_f.bias.copy_(10 * torch.eye(16)[0])
    generator = Generator(model, tokenizer)
    pieces = []
    [dropped] = generator.generate(["世界"], SamplingSettings(max_new_tokens=6, temperature=0),
                                   on_text=lambda row, piece: pieces.append(piece), stop_token_ids=())
    assert dropped.tokens == [lead_byte] * 6 and dropped.text == "" and pieces == []
    [replaced] = generator.generate(["世界"], SamplingSettings(max_new_tokens=6, temperature=0, errors="replace"),
                                    stop_token_ids=())
    assert replaced.text == "\ufffd" * 6
    with pytest.raises(MtnlgError, match="errors='keep' must be one of: drop, replace"):
        SamplingSettings(errors="keep").validate()
