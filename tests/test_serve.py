"""The OpenAI-compatible server, driven by the official `openai` client and raw HTTP on loopback, on the bundled
model: answers equal `vismmoe generate`, streaming equals non-streaming, seeds repeat, every malformed request
gets its 4xx and an OpenAI error object, the queue answers 429, disconnects cancel, metrics parse and move, memory
stays flat over a load of mixed requests, and the expert budget holds."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import ctypes
import gc
import io
import json
import os
import time

import httpx
import pytest

from vismmoe.cli.app import main
from vismmoe.data import balanced_subset
from vismmoe.serve.media import MediaRules

from .serve_util import MODEL, Server, chat, data_url


@pytest.fixture(scope="module")
def engine(bundled_engine):
    return bundled_engine


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    media = tmp_path_factory.mktemp("media")
    srv = Server(engine, max_batch=4, media=MediaRules(allowed_local=str(media)))
    srv.media = media
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def samples():
    return balanced_subset("test", 6)


def test_answers_equal_generate_streamed_or_not(server, engine, samples):
    c = server.client()
    for s in samples[:3]:
        want = engine.generate(s.image, s.question, max_new_tokens=8).text
        r = c.chat.completions.create(**chat(s.image, s.question, temperature=0, max_tokens=8))
        assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 100
        chunks = list(c.chat.completions.create(**chat(s.image, s.question, temperature=0, max_tokens=8),
                                                 stream=True, stream_options={"include_usage": True}))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want
        assert chunks[-1].usage.total_tokens == r.usage.total_tokens
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"


def test_seeded_sampling_repeats(server, samples):
    c = server.client()
    kw = dict(temperature=1.5, top_p=0.95, seed=11, max_tokens=6, extra_body={"top_k": 50})
    a = [c.chat.completions.create(**chat(s.image, s.question, **kw)).choices[0].message.content for s in samples]
    b = [c.chat.completions.create(**chat(s.image, s.question, **kw)).choices[0].message.content for s in samples]
    assert a == b


def test_concurrent_clients_get_their_own_answers(server, engine, samples):
    want = [engine.generate(s.image, s.question, max_new_tokens=6).text for s in samples]
    c = server.client()
    with cf.ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda s: c.chat.completions.create(
            **chat(s.image, s.question, temperature=0, max_tokens=6)).choices[0].message.content, samples))
    assert got == want


def test_models_health_and_metrics(server, samples):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert [m.id for m in server.client().models.list().data] == [MODEL]
    before = server.metrics()
    server.client().chat.completions.create(**chat(samples[0].image, samples[0].question, temperature=0,
                                                   max_tokens=4))
    after = server.metrics()
    ok = ("vismmoe_requests_total", (("outcome", "ok"),))
    assert after[ok] == before.get(ok, 0) + 1
    for name in ("vismmoe_expert_hits_total", "vismmoe_time_to_first_token_seconds_count",
                 "vismmoe_generation_tokens_total"):
        assert after[(name, ())] > before.get((name, ()), 0), name
    assert after[("vismmoe_expert_cache_bytes", (("kind", "peak"),))] <= \
        after[("vismmoe_expert_cache_bytes", (("kind", "budget"),))]
    assert any(k[0] == "vismmoe_expert_hit_rate" for k in after)
    assert ("vismmoe_queue_length", ()) in after


def _malformed(samples, media_dir) -> list[tuple[object, int]]:
    s = samples[0]
    big = chat(s.image, s.question)
    bomb = io.BytesIO()
    from PIL import Image
    Image.new("L", (12000, 12000)).save(bomb, "PNG")          # 144 MP: over the pixel limit, small on the wire
    bomb_url = "data:image/png;base64," + base64.b64encode(bomb.getvalue()).decode()
    outside = os.path.join(os.path.dirname(media_dir), "secret.png")
    s.image.save(outside)
    os.symlink(outside, os.path.join(media_dir, "link.png"))
    msg = lambda url: {"model": MODEL, "messages": [{"role": "user", "content": [      # noqa: E731
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what?"}]}]}
    return [
        (b"{not json", 400), (b"[1, 2]", 400), (b"\xff\xfe", 400),
        ({"model": MODEL}, 400),
        ({"model": MODEL, "messages": []}, 400),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**7}, 400),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 1}, 400),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "mystery": 1}, 400),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400),
        ({"model": MODEL, "messages": [{"role": "user", "content": "   "}]}, 400),
        ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url",
                                                                    "image_url": {"url": data_url(s.image)}}]}]}, 400),
        ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404),
        (msg("data:image/png;base64,AAAA"), 400),
        (msg("data:image/png;base64,@@@@"), 400),
        (msg("data:image/png,rawbytes"), 400),
        (msg(bomb_url), 400),
        (msg("https://example.com/cat.png"), 400),
        (msg("ftp://example.com/cat.png"), 400),
        (msg("file:///etc/passwd"), 400),
        (msg(f"file://{media_dir}/../secret.png"), 400),
        (msg(f"file://{media_dir}/link.png"), 400),
        (msg(f"file://{media_dir}/missing.png"), 400),
        (dict(big, stop=["a", "b", "c", "d", "e"]), 400),
    ]


def test_malformed_requests_get_their_4xx(server, samples):
    for body, status in _malformed(samples, str(server.media)):
        r = server.post(body)
        assert r.status_code == status, (body if isinstance(body, bytes) else json.dumps(body)[:200], r.text)
        err = r.json()["error"]
        assert err["message"] and "\n" not in err["message"] and err["type"]
    s = samples[0]
    s.image.save(server.media / "ok.png")
    ok = server.post({"model": MODEL, "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"file://{server.media}/ok.png"}},
        {"type": "text", "text": s.question}]}]})
    assert ok.status_code == 200, ok.text


def test_api_key_body_limit_and_full_queue(engine, samples):
    srv = Server(engine, api_key="sekret", max_body_bytes=200_000, max_batch=1, max_queue=1)
    try:
        s = samples[0]
        assert srv.post(chat(s.image, s.question)).status_code == 401
        assert srv.post(chat(s.image, s.question), {"authorization": "Bearer wrong"}).status_code == 401
        auth = {"authorization": "Bearer sekret"}
        assert srv.post(b"{" + b" " * 300_000 + b"}", auth).status_code == 413
        long = dict(model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=300, ignore_eos=True)
        with cf.ThreadPoolExecutor(4) as pool:
            futs = [pool.submit(srv.post, long, auth) for _ in range(4)]
            codes = sorted(f.result().status_code for f in futs)
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
        assert srv.post(chat(s.image, s.question, max_tokens=2), auth).status_code == 200   # still serving
    finally:
        srv.close()


def test_disconnect_cancels_the_request(server):
    key = ("vismmoe_requests_total", (("outcome", "cancelled"),))
    before = server.metrics().get(key, 0)
    body = dict(model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=1500, ignore_eos=True,
                stream=True)
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        next(r.iter_lines())                                    # the first chunk: generation has started
    deadline = time.time() + 20
    while server.metrics().get(key, 0) == before and time.time() < deadline:
        time.sleep(0.1)
    assert server.metrics().get(key, 0) == before + 1
    assert server.app.state.scheduler.running == 0


def _rss_mb() -> float:
    """Resident memory of this process in MiB, after a garbage collection and, with glibc, after handing the
    allocator's free pages back (so that memory still held is measured, not what malloc keeps cached per thread)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _hostile(samples, media_dir) -> list[tuple[object, set[int]]]:
    """Requests an attacker or a broken client sends, each with the statuses it may get."""
    s = samples[0]
    text = lambda t, **kw: {"model": MODEL, "messages": [{"role": "user", "content": t}], "max_tokens": 4, **kw}  # noqa
    image = lambda url: {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": [  # noqa: E731
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what?"}]}]}
    return [
        (b"{oops", {400}),
        (b'{"model": "vqa-moe", "stop": ' + b"[" * 5000, {400}),
        (b'{"model": "vqa-moe", "messages": [{"role": "user", "content": "\\ud800"}]}', {400}),
        (b'{"model": "vqa-moe", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', {400}),
        (text("a " * 20_000), {400}),                                 # over the character limit (16 x 2048)
        (text("hi", temperature=9), {400}),
        (text("hi", max_tokens=10**9), {400}),
        ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, {404}),
        (image("data:image/png;base64,AAAA"), {400}),
        (image(f"file://{media_dir}/x%00.png"), {400}),
        (image("ftp://example.com/cat.png"), {400}),
        (image("http://169.254.169.254/latest/meta-data"), {400}),  # remote media is off on this server
        (chat(s.image, s.question, temperature=1e-45, top_p=5e-324, max_tokens=4), {200}),
    ]


def test_mixed_load_keeps_serving_with_flat_memory(server, engine, samples):
    """250 requests from 6 clients, a quarter of them hostile: every answer is the request's own (the good ones
    equal their answers alone), the server keeps serving, and memory stays flat: it grows less than 50 MiB over
    the last 150 requests (the first 100 see every hostile kind at least once, so one-time costs of a path's
    first use fall before the baseline)."""
    good = [chat(s.image, s.question, temperature=0, max_tokens=4) for s in samples]
    want = {s.question: engine.generate(s.image, s.question, max_new_tokens=4).text for s in samples}
    hostile = _hostile(samples, str(server.media))
    jobs = [(good[i % len(good)], {200}) if i % 4 else hostile[(i // 4) % len(hostile)] for i in range(250)]
    assert 4 * len(hostile) <= 100
    rss = {}

    def run(i):
        body, status = jobs[i]
        r = server.post(body)
        return i, body, status, r

    with cf.ThreadPoolExecutor(6) as pool:
        for n, (i, body, status, r) in enumerate(pool.map(run, range(250)), 1):
            assert r.status_code in status, (i, r.text[:300])
            if r.status_code != 200:
                assert r.json()["error"]["message"], r.text
            elif isinstance(body, dict) and isinstance(body["messages"][0]["content"], list):
                q = body["messages"][0]["content"][1]["text"]
                assert r.json()["choices"][0]["message"]["content"] == want[q]    # temperature 1e-45: the argmax
            if n in (100, 250):
                rss[n] = _rss_mb()
    assert rss[250] - rss[100] < 50, rss
    assert engine.cache.peak_resident * engine.layout.nbytes <= engine.budget_bytes
    assert server.post(good[0]).status_code == 200
    assert server.metrics().get(("vismmoe_requests_total", (("outcome", "error"),)), 0) == 0


def test_serve_cli_refuses_bad_arguments(capsys):
    assert main(["serve", "--allowed-local-media", "/no/such/dir"]) == 2
    assert main(["serve", "--port", "70000"]) == 2
    assert main(["serve", "--max-queue", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("vismmoe: error:") for line in err)


def test_errors_name_what_is_wrong(server):
    """A union's error names the deepest problem (a part's type, an image_url that is not an object), and a
    host-style file URL says it has no path."""
    base = {"model": MODEL}
    audio = server.post(dict(base, messages=[{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}, {"type": "text", "text": "hi"}]}]))
    assert audio.status_code == 400 and "input_audio" in audio.json()["error"]["message"]
    bare = server.post(dict(base, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": "data:image/png;base64,AAAA"}, {"type": "text", "text": "hi"}]}]))
    assert bare.status_code == 400 and "image_url" in bare.json()["error"]["message"]
    host = server.post(dict(base, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file://scene.png"}}, {"type": "text", "text": "hi"}]}]))
    assert host.status_code == 400 and "file:///" in host.json()["error"]["message"]


def test_a_file_url_that_is_no_file_says_what_it_names(server):
    """A file:// URL naming a folder (the media folder itself, or one inside it) or a FIFO said "image not found"."""
    (server.media / "sub").mkdir(exist_ok=True)
    fifo = server.media / "pipe.png"
    if not fifo.exists():
        os.mkfifo(fifo)
    for path, says in ((server.media, "is a directory, not an image file"),
                       (server.media / "sub", "is a directory, not an image file"),
                       (fifo, "is a FIFO, device or socket, not an image file"),
                       (server.media / "missing.png", "image not found")):
        r = server.post({"model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"file://{path}"}}, {"type": "text", "text": "what?"}]}]})
        msg = r.json()["error"]["message"]
        assert r.status_code == 400 and says in msg and str(path) in msg, r.text
