"""Scoring a language model: perplexity, bits per byte, cloze and multiple-choice tasks.

Everything reduces to one operation, `score_spans`: the summed log-probability of the last tokens of a token
sequence given the tokens before them, and whether each of those tokens is the model's greedy choice. The tasks
are measured the way EleutherAI's lm-evaluation-harness measures them, so numbers agree with the harness (and
with `mtnlg_cli.evaluation.lm_eval_adapter`):

- Perplexity: each document is scored on its own, after the token that starts it in training (the tokenizer's
  `document_start_id`: a beginning-of-sequence token, else the previous document's end), with windows of
  `context` tokens that start every `stride` tokens; each window scores only the tokens the previous one did not
  reach, so every token is scored once, with at least `context - stride` tokens of context. Bits per byte is the
  total negative log-likelihood in bits over the UTF-8 bytes of the text, which does not depend on the tokenizer.
- Cloze (LAMBADA): the context is the text up to the last space, the target the space and the last word.
  Text that ends in a script written without spaces (Chinese, Japanese, Thai, ...) has no such word: there the
  target is the shortest end of the text that holds at least `target_chars` letters or digits (fewer when the
  last word has fewer) and starts at a token boundary (where the tokenizer splits the whole text anyway), so
  context and target tokens are the text's own. Accuracy counts items whose target tokens are all greedy; perplexity is exp(-mean log p(target)).
- Multiple choice: each choice is scored as `delimiter + choice` after the context; `acc` takes the most likely
  choice, `acc_norm` the most likely per character of the choice.

Several processes (torch.distributed initialised) split the batches, not the items: every batch is the one a
single process would run, and the per-item results are summed across processes before any total is taken, so
the result is bit-for-bit the single-process one. A model split across processes (`inference.parallel.ParallelGPT`,
on rank 0 of such a run) is driven by rank 0 alone: it scores every batch, its last pipeline stage computing the
scores (`token_scores`) so that only they travel, not the logits.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from mtnlg_cli.errors import MtnlgError
from mtnlg_cli.reading import json_object_lines, read_text

ProgressFn = Callable[[int, int], None]  # (batches done, batches in total) on this process


@dataclass
class Span:
    """A token sequence whose tokens from `score_from` on are scored, each given all tokens before it."""

    tokens: list[int]
    score_from: int


@dataclass
class SpanScores:
    logprob: torch.Tensor  # float64 [spans]: summed log-probability (nats) of each span's scored tokens
    greedy: torch.Tensor  # bool [spans]: every scored token was the model's most likely next token


# ---------------------------------------------------------------------------------------------------------------
# The scoring core.


def _process_group() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def score_spans(model: torch.nn.Module, spans: Sequence[Span], batch_size: int = 8,
                progress: Optional[ProgressFn] = None) -> SpanScores:
    """Scores every span; batches go round-robin to the processes of torch.distributed when it is initialised."""
    if batch_size < 1:
        raise MtnlgError(f"batch size {batch_size} must be positive")
    for span in spans:
        if not 1 <= span.score_from < len(span.tokens):
            raise ValueError(f"span of {len(span.tokens)} tokens cannot score from {span.score_from}")
    split = hasattr(model, "token_scores")  # a model split across processes scores the targets itself
    device = model.device if split else next(model.parameters()).device
    rank, world = (0, 1) if split else _process_group()
    # Longest first: similar lengths share a batch (little padding) and a memory problem shows up at once.
    order = sorted(range(len(spans)), key=lambda i: -len(spans[i].tokens))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    mine = batches[rank::world]
    results = torch.zeros(2, len(spans), dtype=torch.float64)  # rows: logprob, greedy
    for done, batch in enumerate(mine, 1):
        length = len(spans[batch[0]].tokens) - 1
        inputs = torch.zeros(len(batch), length, dtype=torch.long)
        targets = torch.zeros(len(batch), length, dtype=torch.long)
        scored = torch.zeros(len(batch), length, dtype=torch.bool)
        for row, index in enumerate(batch):
            tokens = torch.tensor(spans[index].tokens, dtype=torch.long)
            n = len(tokens) - 1  # right padding: causal attention keeps it from changing the real positions
            inputs[row, :n], targets[row, :n] = tokens[:-1], tokens[1:]
            scored[row, spans[index].score_from - 1:n] = True
        inputs, targets, scored = inputs.to(device), targets.to(device), scored.to(device)
        if split:
            target_logprobs, is_greedy = model.token_scores(inputs, targets)
        else:
            target_logprobs, is_greedy = target_scores(model(inputs), targets)
        results[0, batch] = (target_logprobs.double() * scored).sum(dim=1).cpu()
        results[1, batch] = (is_greedy | ~scored).all(dim=1).double().cpu()
        if progress is not None:
            progress(done, len(mine))
    if world > 1:
        import torch.distributed as dist

        reduced = results.to(device) if dist.get_backend() == "nccl" else results
        dist.all_reduce(reduced)  # each span was scored on exactly one process; the others hold zeros
        results = reduced.cpu()
    return SpanScores(results[0], results[1].bool())


def target_scores(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-probability (float32) of each target under `logits` (batch, length, vocab), and whether it is the
    most likely token."""
    logits = logits.float()
    # log-softmax at the targets only: a full log-softmax would be one more (batch, length, vocab) tensor
    target_logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(dim=-1)
    return target_logprobs, logits.argmax(dim=-1) == targets


def context_length(checkpoint, model, requested: Optional[int] = None) -> int:
    """The tokens the model sees at once: `requested`, else the sequence length the checkpoint was trained with."""
    trained = checkpoint.config_int("model", "seq_length")
    limit = model.config.max_position_embeddings
    context = requested if requested is not None else trained or limit
    if not 1 <= context <= limit:
        raise MtnlgError(f"context {context} must be between 1 and the model's max_position_embeddings={limit}")
    return int(context)


def rolling_spans(tokens: Sequence[int], prefix_token: int, context: int, stride: int) -> list[Span]:
    """The windows that score every token of a document once, after `prefix_token`.

    Windows of up to `context` input tokens start every `stride` tokens; with stride == context they are
    non-overlapping chunks, with a smaller stride each token after the first window has at least
    context - stride tokens before it.
    """
    if not 1 <= stride <= context:
        raise MtnlgError(f"stride {stride} must be between 1 and the context length {context}")
    full = [prefix_token, *tokens]
    n = len(tokens)
    spans, begin, scored_until = [], 0, 0  # full[1 .. scored_until] are scored so far
    while scored_until < n:
        end = min(begin + context, n)  # inputs full[begin:end] predict full[begin + 1 : end + 1]
        spans.append(Span(full[begin:end + 1], scored_until + 1 - begin))
        scored_until = end
        begin += stride
    return spans


# ---------------------------------------------------------------------------------------------------------------
# Perplexity and bits per byte.


@dataclass
class Document:
    tokens: list[int]
    num_bytes: int  # UTF-8 bytes of the text the tokens stand for


@dataclass
class LanguageModelingResult:
    nll: float  # total negative log-likelihood, nats
    tokens: int
    bytes: int
    documents: int

    @property
    def loss(self) -> float:
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / (self.bytes * math.log(2))

    def metrics(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte,
                "tokens": self.tokens, "bytes": self.bytes, "documents": self.documents}


def document_logprobs(model: torch.nn.Module, documents: Sequence[Sequence[int]], prefix_token: int, context: int,
                      stride: int, batch_size: int = 8, progress: Optional[ProgressFn] = None) -> torch.Tensor:
    """The log-likelihood (nats, float64) of each document, scored on its own after `prefix_token`."""
    spans, owner = [], []
    for index, tokens in enumerate(documents):
        windows = rolling_spans(tokens, prefix_token, context, stride)
        spans += windows
        owner += [index] * len(windows)
    scores = score_spans(model, spans, batch_size, progress)
    return torch.zeros(len(documents), dtype=torch.float64).index_add_(0, torch.tensor(owner, dtype=torch.long),
                                                                       scores.logprob)


def evaluate_perplexity(model: torch.nn.Module, documents: Sequence[Document], prefix_token: int, context: int,
                        stride: int, batch_size: int = 8,
                        progress: Optional[ProgressFn] = None) -> LanguageModelingResult:
    """Loss, perplexity and bits per byte of `documents`, each scored with a sliding window."""
    documents = [d for d in documents if d.tokens]
    if not documents:
        raise MtnlgError("nothing to evaluate: the data has no tokens")
    logprobs = document_logprobs(model, [d.tokens for d in documents], prefix_token, context, stride, batch_size,
                                 progress)
    return LanguageModelingResult(nll=-float(logprobs.sum()), tokens=sum(len(d.tokens) for d in documents),
                                  bytes=sum(d.num_bytes for d in documents), documents=len(documents))


# ---------------------------------------------------------------------------------------------------------------
# Context/continuation pairs: cloze and multiple choice.


def encode_pair(tokenizer, context: str, continuation: str, prefix_token: int) -> tuple[list[int], list[int]]:
    """Token ids of `context` and of `continuation` after it, split as lm-evaluation-harness splits them.

    Spaces at the end of the context move to the continuation, the whole text is encoded once and the
    continuation is what follows the context's tokens, so word-boundary merges come out as in running text. An
    empty context becomes `prefix_token`.
    """
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    if not stripped:
        return [prefix_token], tokenizer.encode(continuation)
    context_ids = tokenizer.encode(stripped)
    return context_ids, tokenizer.encode(stripped + continuation)[len(context_ids):]


def pair_span(context_ids: Sequence[int], continuation_ids: Sequence[int], context: int) -> Span:
    """The span scoring the continuation, keeping the last `context` + 1 tokens when the pair is too long."""
    if not continuation_ids:
        raise MtnlgError("a continuation has no tokens to score")
    tokens = [*context_ids, *continuation_ids][-(context + 1):]
    return Span(tokens, len(tokens) - len(continuation_ids))


@dataclass
class ClozeItem:
    context: str
    target: str  # the space and the last word, or the last characters of text without spaces


@dataclass
class ChoiceItem:
    context: str
    choices: list[str]
    label: int


# Scripts written without spaces between words: Thai, Lao, Tibetan, Myanmar, Khmer, kana, Han (with its extensions
# and compatibility ideographs) and half-width katakana. In them a "word" is a character.
UNSPACED_SCRIPTS = ("\u0e00-\u0fff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
                    "\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003134f")
UNSPACED_CHARACTER = re.compile(f"[{UNSPACED_SCRIPTS}]")
# A word: one character of those scripts, or a run of other characters between spaces.
WORD = re.compile(f"[{UNSPACED_SCRIPTS}]|[^\\s{UNSPACED_SCRIPTS}]+")
TARGET_CHARS = 2  # cloze, unspaced text: letters to predict at least (most Chinese words have one to three)


def cloze_item(text: str, where: str, tokenizer, target_chars: int = TARGET_CHARS) -> ClozeItem:
    """The text split into context and target (see the module docstring): at the last space, or, when the last
    word is in a script written without spaces, at the last token boundary that leaves `target_chars` letters or
    digits (or all of the last word's, when it has fewer)."""
    text = text.rstrip()
    words = text.rsplit(None, 1)
    if words and UNSPACED_CHARACTER.search(words[-1]):
        return _character_cloze_item(text, where, tokenizer, min(target_chars, sum(map(str.isalnum, words[-1]))))
    cut = text.rfind(" ")
    if cut <= 0 or not text[:cut].strip():
        raise MtnlgError(f"{where}: a cloze text needs at least two words separated by a space")
    return ClozeItem(text[:cut], text[cut:])


def _character_cloze_item(text: str, where: str, tokenizer, target_chars: int) -> ClozeItem:
    target_chars = max(1, target_chars)
    ids = tokenizer.encode(text)
    letters = 0  # letters and digits from `cut` on
    for cut in range(len(text) - 1, 0, -1):
        letters += text[cut].isalnum()
        context = text[:cut].rstrip()  # encode_pair moves the spaces between context and target to the target
        if not context:
            break
        if letters < target_chars or unicodedata.category(text[cut]).startswith("M"):
            continue  # a combining mark belongs to the character before it
        context_ids = tokenizer.encode(context)
        if ids[:len(context_ids)] == context_ids:
            return ClozeItem(text[:cut], text[cut:])
    raise MtnlgError(f"{where}: a cloze text needs some context before the characters to predict")


def evaluate_cloze(model: torch.nn.Module, tokenizer, items: Sequence[ClozeItem], context: int,
                   batch_size: int = 8, progress: Optional[ProgressFn] = None) -> dict:
    """LAMBADA-style scores: accuracy (the last word is the greedy continuation) and last-word perplexity."""
    if not items:
        raise MtnlgError("nothing to evaluate: the task has no items")
    spans = [pair_span(*encode_pair(tokenizer, item.context, item.target, tokenizer.document_start_id), context)
             for item in items]
    scores = score_spans(model, spans, batch_size, progress)
    return {"acc": float(scores.greedy.double().mean()), "perplexity": math.exp(-float(scores.logprob.mean())),
            "items": len(items)}


def evaluate_choice(model: torch.nn.Module, tokenizer, items: Sequence[ChoiceItem], context: int,
                    delimiter: str = " ", batch_size: int = 8, progress: Optional[ProgressFn] = None) -> dict:
    """Multiple-choice accuracy by log-likelihood (`acc`) and by log-likelihood per character (`acc_norm`)."""
    if not items:
        raise MtnlgError("nothing to evaluate: the task has no items")
    spans = [pair_span(*encode_pair(tokenizer, item.context, delimiter + choice, tokenizer.document_start_id), context)
             for item in items for choice in item.choices]
    scores = score_spans(model, spans, batch_size, progress).logprob
    correct = correct_norm = 0
    start = 0
    for item in items:
        lls = scores[start:start + len(item.choices)]
        start += len(item.choices)
        lengths = torch.tensor([float(len(choice)) for choice in item.choices], dtype=torch.float64)
        correct += int(lls.argmax()) == item.label  # argmax takes the first of equal scores, as numpy's does
        correct_norm += int((lls / lengths).argmax()) == item.label
    return {"acc": correct / len(items), "acc_norm": correct_norm / len(items), "items": len(items)}


# ---------------------------------------------------------------------------------------------------------------
# Reading data and task files.


def _read_text(path: Path) -> str:
    if not Path(path).exists():
        raise MtnlgError(f"no such file: {path}")
    return read_text(path, "a task or data file")


def read_jsonl(path: Path) -> list[tuple[str, dict]]:
    """(where, record) for each non-blank line; `where` is "FILE:LINE" for messages."""
    records = []
    for where, record, problem in json_object_lines(_read_text(path), path):
        if problem:
            raise MtnlgError(f"{where}: {problem}")
        records.append((where, record))
    if not records:
        raise MtnlgError(f"{path} is empty")
    return records


def _field(record: dict, key: str, kind: type, where: str):
    if key not in record:
        raise MtnlgError(f"{where}: missing key {key!r}")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise MtnlgError(f"{where}: {key!r} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def is_jsonl(path: Path) -> bool:
    return Path(path).suffix.lower() in (".jsonl", ".json")


def read_texts(path: Path, text_key: str = "text") -> list[str]:
    """The documents of a data file: a JSONL file's `text_key` values, or a text file's paragraphs."""
    if is_jsonl(path):
        texts = []
        for where, record in read_jsonl(path):
            text = _field(record, text_key, str, where)
            if not text.strip():
                raise MtnlgError(f"{where}: {text_key!r} is empty")
            texts.append(text)
        return texts
    texts = [p for p in re.split(r"\n\s*\n", _read_text(path)) if p.strip()]
    if not texts:
        raise MtnlgError(f"{path} has no text")
    return texts


def read_cloze_items(path: Path, tokenizer, target_chars: int = TARGET_CHARS) -> list[ClozeItem]:
    return [cloze_item(_field(record, "text", str, where), where, tokenizer, target_chars)
            for where, record in read_jsonl(path)]


def read_choice_items(path: Path) -> list[ChoiceItem]:
    items = []
    for where, record in read_jsonl(path):
        context = _field(record, "context", str, where)
        choices = _field(record, "choices", list, where)
        label = _field(record, "label", int, where)
        if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise MtnlgError(f"{where}: 'choices' must be a list of at least two non-empty strings")
        if not 0 <= label < len(choices):
            raise MtnlgError(f"{where}: label {label} is outside the {len(choices)} choices (0 to "
                             f"{len(choices) - 1})")
        items.append(ChoiceItem(context, choices, label))
    return items


def build_cloze_items(text: str, tokenizer, min_words: int = 20, max_words: int = 200,
                      target_chars: int = TARGET_CHARS) -> list[ClozeItem]:
    """A LAMBADA-like cloze set from running text: one item per paragraph of at least `min_words` words.

    Each item is the paragraph's text (whitespace collapsed, at most `max_words` words) up to its last word that
    starts with a letter or digit, which holds the target (see `cloze_item`); punctuation after that word is
    dropped. Each character of a script written without spaces counts as a word.
    """
    items = []
    for paragraph in re.split(r"\n\s*\n", text):
        words = [match.span() for match in WORD.finditer(paragraph)][:max_words]
        while words and not re.match(r"\w", paragraph[words[-1][0]:]):
            words.pop()
        if len(words) < min_words:
            continue
        start, end = words[-1]
        end = start + len(re.match(r"^(.*?\w)\W*$", paragraph[start:end]).group(1))
        passage = re.sub(r"\s+", " ", paragraph[words[0][0]:end])
        items.append(cloze_item(passage, "paragraph", tokenizer, target_chars))
    return items
