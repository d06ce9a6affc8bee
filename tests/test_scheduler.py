"""The continuous-batching scheduler: rows of different lengths and settings decoding together, joining and leaving
at any step, and each getting what it would get alone."""

from __future__ import annotations

import threading

import pytest
import torch

from mtnlg_cli.errors import MtnlgError
from test_generation import CHINESE, CONTEXT, ENGLISH, generator, greedy, ws  # noqa: F401  (fixtures)

PROMPTS = [ENGLISH, "Mr. Darcy", "", CHINESE]


def sampled(**changes):
    from mtnlg_cli.config import SamplingSettings

    return SamplingSettings(temperature=1.0, top_p=0.95, **changes)


def scheduler_for(generator, **options):
    from mtnlg_cli.inference.scheduler import Scheduler

    return Scheduler(generator, **options)


def test_batched_rows_equal_each_prompt_alone_through_the_generator(generator):
    """Different prompt lengths, budgets and settings in one batch; the first row slides past the 64-token
    window."""
    settings = [greedy(max_new_tokens=70), greedy(max_new_tokens=5), sampled(max_new_tokens=50, seed=3),
                sampled(max_new_tokens=12, seed=4, top_k=20, repetition_penalty=1.3)]
    together = scheduler_for(generator, max_batch=3).generate(PROMPTS, settings, stop_token_ids=())
    for prompt, setting, completion in zip(PROMPTS, settings, together):
        [alone] = generator.generate([prompt], setting, stop_token_ids=())
        assert completion.tokens == alone.tokens and completion.text == alone.text
        assert completion.finish_reason == "length" and completion.prompt_tokens == alone.prompt_tokens
    assert [len(c.tokens) for c in together] == [70, 5, 50, 12]


def test_a_request_joins_at_the_next_step_and_gets_what_it_gets_alone(generator):
    from mtnlg_cli.inference.scheduler import Delta, Request

    scheduler = scheduler_for(generator, max_batch=4)
    first = Request(generator.encode(ENGLISH), sampled(max_new_tokens=40, seed=11), stop_token_ids=())
    scheduler.submit(first)
    for _ in range(10):
        scheduler.step()
    events = []
    late = Request(generator.encode("Mr. Darcy"), sampled(max_new_tokens=15, seed=12), stop_token_ids=(),
                   on_event=events.append)
    scheduler.submit(late)
    scheduler.step()
    assert len(events) == 1 and isinstance(events[0], Delta) and events[0].token is not None
    while not (first.done and late.done):
        scheduler.step()
    for request, prompt in ((first, ENGLISH), (late, "Mr. Darcy")):
        [alone] = generator.generate([prompt], request.settings, stop_token_ids=())
        assert request.wait().tokens == alone.tokens
    assert "".join(e.text for e in events if isinstance(e, Delta)) == late.wait().text


def test_cancelling_frees_the_row_for_a_waiting_request(generator):
    from mtnlg_cli.inference.scheduler import Request

    scheduler = scheduler_for(generator, max_batch=1)
    running = Request(generator.encode(ENGLISH), greedy(max_new_tokens=50), stop_token_ids=())
    waiting = Request(generator.encode(CHINESE), greedy(max_new_tokens=6), stop_token_ids=())
    scheduler.submit(running, waiting)
    for _ in range(3):
        scheduler.step()
    assert scheduler.counts() == (1, 1)
    running.cancel()
    scheduler.step()
    assert running.done and running.wait().finish_reason == "cancelled" and len(running.wait().tokens) == 3
    assert scheduler.counts() == (1, 0)
    while not waiting.done:
        scheduler.step()
    [alone] = generator.generate([CHINESE], greedy(max_new_tokens=6), stop_token_ids=())
    assert waiting.wait().tokens == alone.tokens


def test_a_full_queue_refuses_all_of_a_submission(generator):
    from mtnlg_cli.inference.scheduler import QueueFull, Request

    scheduler = scheduler_for(generator, max_batch=2, max_waiting=1)

    def request():
        return Request(generator.encode(ENGLISH), greedy(max_new_tokens=4))

    scheduler.submit(request(), request(), request())  # two take the free rows, one waits
    with pytest.raises(QueueFull):
        scheduler.submit(request())
    assert scheduler.counts() == (0, 3)
    scheduler.step()
    assert scheduler.counts() == (2, 1)


def test_stops_logprobs_and_the_thread(generator):
    """Stop strings and stop tokens per request, the model's log-probabilities, and a scheduler on its own thread
    that finishes what runs when it is closed."""
    from mtnlg_cli.inference.scheduler import Request

    [reference] = generator.generate([ENGLISH], greedy(max_new_tokens=20), stop_token_ids=())
    stop_string = reference.text[len(reference.text) // 2:][:3]
    scheduler = scheduler_for(generator, max_batch=4)
    scheduler.start()
    by_string = Request(generator.encode(ENGLISH), greedy(max_new_tokens=20, stop=[stop_string]), stop_token_ids=())
    stop_at = reference.tokens.index(reference.tokens[5])
    by_token = Request(generator.encode(ENGLISH), greedy(max_new_tokens=20), stop_token_ids=[reference.tokens[5]])
    scored = Request(generator.encode(ENGLISH), greedy(max_new_tokens=6), stop_token_ids=(), logprobs=3)
    scheduler.submit(by_string, by_token, scored)
    assert by_string.wait(30).finish_reason == "stop"
    assert by_string.wait().text == reference.text[:reference.text.index(stop_string)]
    assert by_token.wait(30).finish_reason == "eos" and by_token.wait().tokens == reference.tokens[:stop_at]

    completion = scored.wait(30)
    with torch.no_grad():
        ids = generator.encode(ENGLISH) + completion.tokens
        logits = generator.model(torch.tensor([ids]))[0, len(ids) - 7:-1, :generator.tokenizer.vocab_size]
    expected = logits.float().log_softmax(-1)
    for position, entry in enumerate(completion.logprobs):
        assert entry.token == completion.tokens[position] == entry.top[0][0]  # greedy: the likeliest
        assert entry.logprob == pytest.approx(float(expected[position, entry.token]), abs=1e-4)
        assert [t for t, _ in entry.top] == expected[position].topk(3).indices.tolist()

    long = Request(generator.encode(ENGLISH), greedy(max_new_tokens=10_000), stop_token_ids=())
    scheduler.submit(long)
    closer = threading.Thread(target=scheduler.close, kwargs={"grace": 0.2})
    closer.start()
    closer.join(30)
    assert not closer.is_alive() and long.wait().finish_reason == "cancelled"
    with pytest.raises(MtnlgError, match="shutting down"):
        scheduler.submit(Request([1, 2], greedy()))


def test_presence_and_frequency_penalties_follow_openai():
    """logit - frequency_penalty * count - presence_penalty * (count > 0), on generated tokens only."""
    from mtnlg_cli.config import SamplingSettings
    from mtnlg_cli.inference.sampling import Sampler

    class Vocabulary:
        vocab_size, pad_id, never_sampled = 6, 0, (0,)

    logits = torch.tensor([[0.0, 3.0, 2.5, 1.0, 0.5, 0.2]])
    for settings, expected in ((SamplingSettings(temperature=0), [1, 1, 1, 1]),
                               (SamplingSettings(temperature=0, presence_penalty=1.0), [1, 2, 1, 1]),
                               (SamplingSettings(temperature=0, frequency_penalty=0.6), [1, 2, 1, 2, 1, 2, 1, 3])):
        sampler = Sampler(settings, Vocabulary(), [[1, 1, 1]], torch.device("cpu"))
        assert [sampler(logits.clone())[0] for _ in expected] == expected
    with pytest.raises(MtnlgError, match="presence_penalty"):
        SamplingSettings(presence_penalty=2.5).validate()


def test_the_api_generates_a_list_of_prompts_together(ws):
    from mtnlg_cli import MegatronLM

    model = MegatronLM.from_workspace(ws.root, device="cpu", quiet=True)
    texts = model.generate(PROMPTS, max_length=CONTEXT + 10, temperature=0.9, seed=5)
    assert texts == [model.generate(p, max_length=CONTEXT + 10, temperature=0.9, seed=5) for p in PROMPTS]
