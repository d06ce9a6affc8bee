"""A pretrained model's own tokenizer (tokenizer.json and its config files) and chat template, against transformers.

The tokenizers are built here: a byte-level BPE (as GPT-2, Llama 3 and Qwen have) trained with the `tokenizers`
library on part of the shared text, and a SentencePiece-style BPE (prefix space, byte fallback, a `<s>` that the
post-processor puts first, as Llama 2 and Mistral have) from mtnlg's own SentencePiece model.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from mtnlg_cli.data.tokenizer import Tokenizer
from mtnlg_cli.errors import MtnlgError

EN, ZH = "en_austen_pride_sense.txt", "zh_poems_and_debian_faq.txt"
# ChatML with what real templates use: the bos variable, a namespace, loop variables, a refusal, trimmed blocks
CHAT_TEMPLATE = """{{ bos_token }}{% set ns = namespace(system=false) %}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('Unknown role: ' + message['role']) }}
    {% endif %}
    {% if message['role'] == 'system' %}{% set ns.system = true %}{% endif %}
    {% if loop.first and not ns.system %}<|im_start|>system
You are helpful.<|im_end|>
{% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] | trim }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
CONVERSATIONS = [
    [{"role": "user", "content": "Hello, how are you?"}],
    [{"role": "system", "content": "Answer in Chinese."}, {"role": "user", "content": "What is a poem?"},
     {"role": "assistant", "content": "  床前明月光，疑是地上霜。 "},
     {"role": "user", "content": "More, please.\n"}],
]


def paragraphs(shared_data: Path) -> list[str]:
    return [p.strip("\n") for name in (EN, ZH)
            for p in re.split(r"\n\s*\n", (shared_data / name).read_text(encoding="utf-8")) if p.strip()]


def byte_level_bpe(shared_data: Path, vocab_size: int = 2000):
    """A GPT-2-style byte-level BPE trained on a slice of each language, with ChatML's tokens."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Backend(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    english = (shared_data / EN).read_text(encoding="utf-8")[:150_000]
    chinese = (shared_data / ZH).read_text(encoding="utf-8")[:30_000]
    tokenizer.train_from_iterator([english, chinese], trainer)
    return tokenizer


def save_hf_tokenizer(backend, folder: Path, chat_template=None, **special_tokens) -> Path:
    """The folder `AutoTokenizer` reloads, as transformers saves it."""
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(tokenizer_object=backend, **special_tokens)
    if chat_template:
        wrapped.chat_template = chat_template
    wrapped.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def byte_level(shared_data, tmp_path_factory) -> Path:
    return save_hf_tokenizer(byte_level_bpe(shared_data), tmp_path_factory.mktemp("byte_level"), CHAT_TEMPLATE,
                             bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")


@pytest.fixture(scope="module")
def sentencepiece_style(shared_data, tmp_path_factory) -> Path:
    """mtnlg's SentencePiece BPE as a tokenizer.json (prefix "▁", byte fallback), with Llama's `<s>` first."""
    from mtnlg_cli.convert.hf_tokenizer import tokenizer_json
    from mtnlg_cli.data.tokenizer import train_tokenizer

    english = (shared_data / EN).read_text(encoding="utf-8")[:100_000]
    chinese = (shared_data / ZH).read_text(encoding="utf-8")[:20_000]
    trained = train_tokenizer([line for line in (english + chinese).split("\n") if line],
                              tmp_path_factory.mktemp("sp"), vocab_size=3000)
    folder = tmp_path_factory.mktemp("sentencepiece_style")
    spec = tokenizer_json(trained.path)
    first, second = {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}
    spec["post_processor"] = {"type": "TemplateProcessing",
                              "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, first],
                              "pair": [first, second],
                              "special_tokens": {"<s>": {"id": "<s>", "ids": [trained.bos_id], "tokens": ["<s>"]}}}
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<pad>", "clean_up_tokenization_spaces": False}))
    return folder


@pytest.mark.parametrize("kind", ["byte_level", "sentencepiece_style"])
def test_ids_equal_autotokenizers_on_every_paragraph_and_decode_back(kind, request, shared_data):
    from transformers import AutoTokenizer

    folder = request.getfixturevalue(kind)
    ours, theirs = Tokenizer.load(folder), AutoTokenizer.from_pretrained(folder)
    assert ours.backend == "huggingface" and ours.vocab_size == len(theirs)
    docs = paragraphs(shared_data)
    assert len(docs) > 4000
    encoded = ours.encode_batch(docs)
    assert encoded == ours.encode_batch(docs, num_threads=2)
    assert [theirs(doc, add_special_tokens=False)["input_ids"] for doc in docs] == encoded
    assert [theirs(doc)["input_ids"] for doc in docs[:300]] == [ours.prompt_ids(doc) for doc in docs[:300]]
    assert [doc for doc, ids in zip(docs, encoded) if ours.decode(ids) != doc] == []
    expected_prefix = (theirs.bos_token_id,) if kind == "sentencepiece_style" else ()
    assert ours.prefix_ids == expected_prefix and ours.eos_ids == (theirs.eos_token_id,)
    documents = ours.encode_batch(docs[:3], add_eos=True)
    assert documents == [[*expected_prefix, *ids, theirs.eos_token_id] for ids in encoded[:3]]


def test_special_tokens_come_from_the_model_config_files(byte_level, tmp_path):
    from transformers import AutoTokenizer

    # GPT-2 as released: a tokenizer_config without special tokens; config.json names them by id
    gpt2 = tmp_path / "gpt2"
    shutil.copytree(byte_level, gpt2)
    (gpt2 / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1024}))
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "bos_token_id": 0, "eos_token_id": 0}))
    (gpt2 / "chat_template.jinja").unlink()
    tokenizer = Tokenizer.load(gpt2)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.eos_ids, tokenizer.pad_id) == (0, 0, (0,), 0)
    assert tokenizer.chat_template is None

    # Llama 3's layout: several tokens end generation; a pad token the vocabulary lacks is added, as transformers
    # adds it; the template in tokenizer_config.json
    llama3 = tmp_path / "llama3"
    shutil.copytree(byte_level, llama3)
    (llama3 / "chat_template.jinja").unlink()
    config = json.loads((llama3 / "tokenizer_config.json").read_text())
    (llama3 / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE,
                                                               "pad_token": "<|pad|>"}))
    end_of_turn = Tokenizer.load(byte_level).token_id("<|im_end|>")
    (llama3 / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, end_of_turn]}))
    tokenizer, theirs = Tokenizer.load(llama3), AutoTokenizer.from_pretrained(llama3)
    assert tokenizer.eos_ids == (0, end_of_turn) and tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.vocab_size == len(theirs) == 2001 and tokenizer.pad_id == theirs.pad_token_id == 2000
    info = tokenizer.info()
    assert info["special_tokens"]["eos_ids"] == [0, end_of_turn] and info["chat_template"] is True

    (llama3 / "generation_config.json").write_text(json.dumps({"eos_token_id": 5000}))
    with pytest.raises(MtnlgError, match="eos token id 5000 is not in the vocabulary of 2001 tokens"):
        Tokenizer.load(llama3)
    (llama3 / "tokenizer.json").write_text("{\"version\": ")
    with pytest.raises(MtnlgError, match="tokenizer.json is not a Hugging Face tokenizer"):
        Tokenizer.load(llama3)


def test_generation_stops_at_any_of_the_models_eos_tokens(byte_level, tmp_path):
    from mtnlg_cli.config import SamplingSettings
    from mtnlg_cli.inference.engine import Generator
    from mtnlg_cli.model.architecture import Architecture
    from mtnlg_cli.model.gpt import GPT

    folder = tmp_path / "tok"
    shutil.copytree(byte_level, folder)
    tokenizer = Tokenizer.load(folder)
    end_of_turn = tokenizer.token_id("<|im_end|>")
    torch.manual_seed(0)
    model = GPT(Architecture(vocab_size=tokenizer.vocab_size, max_position_embeddings=64, num_layers=1,
                          hidden_size=32, num_heads=2, ffn_hidden_size=64)).eval()
    with torch.no_grad():  # the model always picks <|im_end|> next
        away = torch.nn.functional.normalize(torch.randn(32), dim=0)
        model.ln_f.bias.copy_(20 * away)
        model.wte.weight[end_of_turn] = 5 * away
    settings = SamplingSettings(max_new_tokens=4, temperature=0.0)
    [alone] = Generator(model, tokenizer).generate(["Hello"], settings)
    assert alone.finish_reason == "length" and alone.tokens == [end_of_turn] * 4
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, end_of_turn]}))
    [stopped] = Generator(model, Tokenizer.load(folder)).generate(["Hello"], settings)
    assert stopped.finish_reason == "eos" and stopped.tokens == []


def test_chat_prompt_ids_equal_apply_chat_template(byte_level):
    from transformers import AutoTokenizer

    from mtnlg_cli.inference.chat import chat_format, render_chat, reply_stop_ids

    ours, theirs = Tokenizer.load(byte_level), AutoTokenizer.from_pretrained(byte_level)
    assert chat_format(ours) == "template" and reply_stop_ids(ours) == [0]
    for messages in CONVERSATIONS:
        expected = theirs.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
        assert render_chat(ours, messages) == expected
        assert render_chat(ours, messages, add_generation_prompt=False) == theirs.apply_chat_template(
            messages)["input_ids"]
    with pytest.raises(MtnlgError, match="chat template refused the conversation: Unknown role: wizard"):
        render_chat(ours, [{"role": "wizard", "content": "x"}])


def test_templates_run_sandboxed():
    from mtnlg_cli.inference.chat_template import render_template

    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(MtnlgError, match="refused the conversation"):
        render_template(escape, [{"role": "user", "content": "x"}])
    with pytest.raises(MtnlgError, match="may not set the attribute '_x'"):
        render_template("{% set ns = namespace(_x=1) %}", [])


def test_a_model_without_a_template_chats_in_a_plain_transcript(byte_level, tmp_path):
    from mtnlg_cli.inference.chat import chat_format, render_chat, reply_stop_strings

    folder = tmp_path / "base"
    shutil.copytree(byte_level, folder)
    (folder / "chat_template.jinja").unlink()
    tokenizer = Tokenizer.load(folder)
    assert chat_format(tokenizer) == "plain" and reply_stop_strings(tokenizer) == ["\nUser:"]
    ids = render_chat(tokenizer, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert tokenizer.decode(ids) == "Be brief.\n\nUser: Hi\nAssistant:"
