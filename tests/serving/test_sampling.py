"""Sampling is reproducible per request (seed), stop sequences and max_tokens end completions, and the
streamed text equals the final text."""

from __future__ import annotations

import pytest
import torch

from lorafleet.serving.detok import TextStream
from lorafleet.serving.engine import RequestError, SamplingParams
from lorafleet.serving.sampling import sample_rows

PROMPTS = ["The quick brown fox", "hello", "lorem ipsum dolor sit amet, consectetur", "0123456789"]


def test_seeded_sampling_is_reproducible_regardless_of_batch_mates(adapters, blobs, make_engine):
    digest = blobs.put(adapters[2])
    hot = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=20, seed=1234)
    engine = make_engine(blobs, max_batch=8, max_active=2, max_cached=2)
    alone = engine.generate([PROMPTS[0]], digest, hot)[0]
    # Same request again, now among other sampled and greedy requests with other seeds and adapters.
    mates = [SamplingParams(temperature=1.2, max_tokens=25, seed=s) for s in (1, 2)] + [SamplingParams(max_tokens=7)]
    crowd = engine.generate(PROMPTS[1:] + [PROMPTS[0]], [None, digest, None, digest], mates + [hot])
    assert crowd[-1].token_ids == alone.token_ids
    assert crowd[-1].text == alone.text
    other_seed = engine.generate([PROMPTS[0]], digest, SamplingParams(temperature=0.9, top_p=0.95, max_tokens=20,
                                                                     seed=99))[0]
    assert other_seed.token_ids != alone.token_ids
    assert alone.seed == 1234


def test_unseeded_requests_report_their_seed(blobs, make_engine):
    engine = make_engine(blobs)
    first = engine.generate([PROMPTS[1]], None, SamplingParams(temperature=1.0, max_tokens=12))[0]
    again = engine.generate([PROMPTS[1]], None, SamplingParams(temperature=1.0, max_tokens=12, seed=first.seed))[0]
    assert again.token_ids == first.token_ids


def test_tiny_top_p_is_greedy(blobs, make_engine):
    engine = make_engine(blobs)
    greedy = engine.generate(PROMPTS, None, SamplingParams(max_tokens=15))
    nucleus = engine.generate(PROMPTS, None, [SamplingParams(temperature=1.5, top_p=1e-6, max_tokens=15, seed=i)
                                              for i in range(len(PROMPTS))])
    assert [r.token_ids for r in nucleus] == [r.token_ids for r in greedy]


def test_sample_rows_matches_distribution():
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25]]))
    counts = torch.zeros(2, 3)
    gens = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    for _ in range(3000):
        tok = sample_rows(logits, [1.0, 1.0], [1.0, 1.0], gens)
        counts[0, tok[0]] += 1
        counts[1, tok[1]] += 1
    torch.testing.assert_close(counts / 3000, torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25]]), atol=0.04, rtol=0)
    # top_p = 0.5 on row 0 keeps only the 0.6 token; greedy rows (temperature 0) take the argmax.
    for _ in range(50):
        tok = sample_rows(logits, [1.0, 0.0], [0.5, 1.0], gens)
        assert tok.tolist() == [1, 0]


def test_max_tokens_is_respected(blobs, make_engine):
    engine = make_engine(blobs)
    results = engine.generate(PROMPTS, None, [SamplingParams(max_tokens=n, ignore_eos=True) for n in (1, 2, 5, 17)])
    assert [r.completion_tokens for r in results] == [1, 2, 5, 17]
    assert all(r.finish_reason == "length" for r in results)


def test_stop_sequences_stop(base, blobs, make_engine):
    engine = make_engine(blobs)
    free = engine.generate([PROMPTS[2]], None, SamplingParams(max_tokens=40, ignore_eos=True))[0]
    text = free.text
    assert len(text) > 12
    stop = text[6:9]  # a string the free run produces: the stopped run must end right before it
    first = text.find(stop)
    stopped = engine.generate([PROMPTS[2]], None, SamplingParams(max_tokens=40, stop=(stop, "never-seen"),
                                                                 ignore_eos=True))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == text[:first]
    assert stopped.completion_tokens < free.completion_tokens
    assert stopped.token_ids == free.token_ids[: stopped.completion_tokens]


def test_streaming_yields_the_final_text(adapters, blobs, make_engine):
    digest = blobs.put(adapters[0])
    engine = make_engine(blobs).start()
    params = [SamplingParams(max_tokens=30, ignore_eos=True), SamplingParams(temperature=0.8, max_tokens=25, seed=5),
              SamplingParams(max_tokens=30, stop=("e", "zz"), ignore_eos=True)]
    pairs = enumerate(zip(PROMPTS[:3], params, strict=True))
    handles = [engine.submit(p, digest if i % 2 else None, s) for i, (p, s) in pairs]
    for h in handles:
        deltas = list(h)
        res = h.result(timeout=60)
        assert "".join(deltas) == res.text
        assert len(deltas) >= 1
    no_stop = handles[0].result()
    assert no_stop.text == engine.tokenizer.decode(no_stop.token_ids, skip_special_tokens=True,
                                                   clean_up_tokenization_spaces=False)
    engine.stop()


def test_streaming_without_background_loop_drives_the_engine(blobs, make_engine):
    engine = make_engine(blobs)
    handle = engine.submit(PROMPTS[3], None, SamplingParams(max_tokens=10, ignore_eos=True))
    assert "".join(handle) == handle.result().text


def test_cancel(blobs, make_engine):
    engine = make_engine(blobs)
    handle = engine.submit(PROMPTS[0], None, SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    handle.cancel()
    res = handle.result(timeout=30)
    assert res.finish_reason == "cancelled"
    assert res.completion_tokens < 50


class _ByteTok:
    """Decodes ids as UTF-8 bytes (like a byte-level tokenizer), to test the detokenizer alone."""

    def decode(self, ids, **kwargs):
        return bytes(ids).decode("utf-8", errors="replace")


@pytest.mark.parametrize(
    ("text", "stop", "want"),
    [
        ("héllo wörld €uro", (), "héllo wörld €uro"),
        ("hello world", ("wor",), "hello "),
        ("hello world", ("ld", "lo w"), "hel"),
        ("aaab", ("aab",), "a"),
        ("no stop here", ("xyz",), "no stop here"),
    ],
)
def test_text_stream(text, stop, want):
    stream = TextStream(_ByteTok(), stop)
    out = []
    for b in text.encode():
        delta, stopped = stream.push(b)
        out.append(delta)
        if stopped:
            break
    out.append(stream.flush())
    assert "".join(out) == want
    assert all("\ufffd" not in d for d in out)


def test_failed_request_raises_when_streamed(blobs, make_engine):
    engine = make_engine(blobs)
    handle = engine.submit("hi", "0" * 64, SamplingParams(max_tokens=4))
    with pytest.raises(RequestError, match="could not be loaded"):
        list(handle)
