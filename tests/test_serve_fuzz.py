"""Fuzzing the chat-completions request against the real server on loopback (hypothesis, derandomised so that CI
runs the same examples every time): every field of the schema, valid, at its edges (sampling values under
float32's reach, huge integers, lone surrogates, NaN) or any JSON at all, and raw bodies. The answer is a 200 or
a 4xx OpenAI error object, never a 5xx, and the server keeps answering."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .serve_util import MODEL, Server, data_url

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])

# text: mostly plain, sometimes with everything JSON can spell (lone surrogates, NUL, the model's special tokens)
pieces = (st.characters(categories=["Cs"]) | st.characters(codec="utf-8")
          | st.sampled_from(["\x00", "\n", " ", "<|im_end|>", "<|image_pad|>"]))
plain = st.sampled_from(["what is it?", "is it red?", "how many shapes?", " "]) | st.text(min_size=1, max_size=12)


@st.composite
def _rarely(draw, usual, rare, one_in: int = 10):
    return draw(rare) if draw(st.integers(1, one_in)) == one_in else draw(usual)


text = _rarely(plain, st.lists(pieces, min_size=1, max_size=8).map("".join), one_in=4)
scalar = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | text
anything = st.recursive(scalar, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(text, kids, max_size=3),
                        max_leaves=6)


def mostly(valid):
    """`valid` most of the time, any JSON value now and then."""
    return _rarely(valid, anything)


unit_float = st.sampled_from([0.0, -0.0, 1e-45, 5e-324, 1e-300, 0.5, 1.0, 1.0000001, 2.0, 2.5, -1.0]) | st.floats()
small_int = st.sampled_from([-1, 0, 1, 2, 3, 10**7, 2**63, 2**80])      # never a long generation
TINY_PNG: list[str] = []                                                 # filled by the fixture
image_url = _rarely(st.builds(lambda: TINY_PNG[0]), st.sampled_from(
    ["data:image/png;base64,AAAA", "data:image/png;base64,@@", "data:,", "http://127.0.0.1/", "file:///etc/passwd",
     "file:///tmp/%00x.png", "ftp://x/y.png", "", "data:image/png;base64,"]) | text)
part = mostly(st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": text}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": mostly(st.fixed_dictionaries(
        {"url": image_url}, optional={"detail": st.sampled_from(["auto", "low", "x"])}))})))
message = mostly(st.fixed_dictionaries(
    {"role": mostly(st.sampled_from(["user", "user", "system", "developer", "assistant", "tool"])),
     "content": mostly(text | st.lists(part, max_size=3))},
    optional={"name": mostly(text)}))
request = st.fixed_dictionaries(
    {"model": mostly(st.just(MODEL)), "messages": mostly(st.lists(message, min_size=1, max_size=3))},
    optional={"max_tokens": mostly(small_int), "max_completion_tokens": mostly(small_int),
              "temperature": mostly(unit_float), "top_p": mostly(unit_float), "top_k": mostly(small_int),
              "seed": mostly(small_int), "stop": mostly(text | st.lists(text, max_size=5)),
              "stream": mostly(st.booleans()),
              "stream_options": mostly(st.fixed_dictionaries({"include_usage": st.booleans()})),
              "ignore_eos": mostly(st.booleans()), "n": mostly(st.sampled_from([1, 1, 2])),
              "presence_penalty": mostly(st.sampled_from([0, 0.0, 1.0])), "logprobs": mostly(st.booleans()),
              "user": mostly(text)})
# and now and then a field the schema does not have
request = st.builds(lambda known, extra: {**extra, **known}, request,
                    _rarely(st.just({}), st.dictionaries(text, anything, min_size=1, max_size=1)))


@pytest.fixture(scope="module")
def server(bundled_engine):
    from PIL import Image
    TINY_PNG[:] = [data_url(Image.new("RGB", (32, 32), (200, 30, 30)))]
    srv = Server(bundled_engine, default_max_tokens=2, max_batch=2)
    srv.http = httpx.Client(timeout=60)
    yield srv
    srv.http.close()
    srv.close()


def _check(srv, content: bytes) -> None:
    r = srv.http.post(srv.url + "/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 200 or 400 <= r.status_code < 500, (content[:300], r.status_code, r.text[:300])
    if r.status_code != 200:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and err["type"], r.text[:300]


@FUZZ
@given(body=request)
def test_fuzzed_requests_get_200_or_4xx(server, body):
    _check(server, json.dumps(body).encode())                 # ensure_ascii: lone surrogates go as \udXXX escapes


@settings(FUZZ, max_examples=60)
@given(raw=st.binary(max_size=64) | st.builds(lambda v: json.dumps(v).encode(), anything)
       | st.builds(lambda n, tail: b'{"model": "' + MODEL.encode() + b'", "stop": ' + b"[" * n + tail,
                   st.integers(1, 3000), st.binary(max_size=8)))
def test_fuzzed_bodies_get_200_or_4xx(server, raw):
    _check(server, raw)


def test_the_server_still_answers_after_fuzzing(server):
    assert server.http.get(server.url + "/health").json() == {"status": "ok"}
    r = server.http.post(server.url + "/v1/chat/completions", json={
        "model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "is it red?"}]})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    metrics = server.http.get(server.url + "/metrics").text
    assert 'vismmoe_requests_total{outcome="error"}' not in metrics
