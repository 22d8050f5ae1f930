"""The server under faults, one kind at a time: sampling values float32 cannot carry, a row whose logits hold NaN,
prompts too long to tokenize, JSON nested deep, NaN literals or lone surrogates, a NUL in a file URL, a client
that leaves before its body ends, lower-case auth schemes, remote images (deadline, size, address policy), the
drain at shutdown, the command's own refusals (empty key, busy port, a body limit or default token limit that
would refuse every request), the default token limit shrunk to the context a prompt leaves, loosely typed fields
(true as 1, "yes" as true), data URLs that are not images, NUL in message text, and error params as the client
wrote the path. Each answer is the request's own: a 4xx OpenAI error object for the bad one, and the other
requests of its batch answer as they do alone."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import http.server
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from vismmoe.cli.app import main
from vismmoe.data import balanced_subset
from vismmoe.engine.sampling import Sampler
from vismmoe.serve import media
from vismmoe.serve.media import MediaRules, image_bytes, parse_networks
from vismmoe.errors import UserError

from .conftest import poison_sampling
from .serve_util import MODEL, Server, chat, data_url, text_chat


@pytest.fixture(scope="module")
def samples():
    return balanced_subset("test", 4)


@pytest.fixture(scope="module")
def server(bundled_engine, tmp_path_factory):
    media_dir = tmp_path_factory.mktemp("media")
    srv = Server(bundled_engine, max_batch=4, media=MediaRules(allowed_local=str(media_dir)))
    srv.media = media_dir
    yield srv
    srv.close()


def _batched(server, bodies):
    """Post `bodies` at once (they batch: max_batch 4, one engine) -> responses in order."""
    with cf.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(server.post, bodies))


def test_sampling_values_below_float32_answer_and_spare_their_batch(server, bundled_engine, samples):
    s = samples[0]
    want = bundled_engine.generate(s.image, s.question, max_new_tokens=5).text
    greedy = chat(s.image, s.question, temperature=0, max_tokens=5)
    extreme = [dict(temperature=1e-45), dict(temperature=5e-324), dict(temperature=1.0, top_p=5e-324),
               dict(temperature=1e-30, top_p=1e-300)]
    for kw in extreme:
        rs = _batched(server, [greedy, chat(s.image, s.question, max_tokens=5, seed=1, **kw), greedy])
        assert [r.status_code for r in rs] == [200, 200, 200], (kw, [r.text for r in rs])
        # the smallest temperatures and top_p leave the argmax: the greedy answer
        assert {r.json()["choices"][0]["message"]["content"] for r in rs} == {want}, kw


def test_a_row_whose_logits_hold_nan_fails_alone(server, bundled_engine, samples, monkeypatch):
    """Logits with NaN (broken weights) for one sampled request: that request gets its own error (500: the model's
    fault, not the client's), the requests batched with it their usual answers."""
    poison_sampling(monkeypatch)
    s = samples[1]
    want = bundled_engine.generate(s.image, s.question, max_new_tokens=5).text
    greedy = chat(s.image, s.question, temperature=0, max_tokens=5)
    sampled = chat(s.image, s.question, temperature=0.5, top_k=1, max_tokens=5, seed=3)
    bad = chat(s.image, s.question, temperature=0.777, max_tokens=5)
    rs = _batched(server, [greedy, bad, sampled, greedy])
    assert [r.status_code for r in rs] == [200, 500, 200, 200], [r.text for r in rs]
    err = rs[1].json()["error"]
    assert err["code"] == "model_output_not_finite" and "NaN" in err["message"] and "\n" not in err["message"]
    assert all(r.json()["choices"][0]["message"]["content"] == want for r in (rs[0], rs[2], rs[3]))


def test_one_row_that_fails_leaves_its_batch(bundled_engine, samples, monkeypatch):
    """Engine.generate_requests with rows that fail on their own: a bad image and NaN logits end their rows with
    finish reason "error"; the other rows give what they give alone; the default raises the first error."""
    from vismmoe.engine.request import GenerationRequest as G
    from vismmoe.engine.sampling import NonFiniteLogits, SamplingParams
    s = samples[2]
    alone = G.from_prompt(s.image, s.question, max_new_tokens=4)
    bundled_engine.generate_requests([alone])
    pick = Sampler.pick

    def poisoned(self, logits):
        logits[1] = float("nan")
        return pick(self, logits)

    monkeypatch.setattr(Sampler, "pick", poisoned)
    rows = [G.from_prompt(s.image, s.question, max_new_tokens=4),
            G.from_prompt(s.image, s.question, max_new_tokens=4, sampling=SamplingParams(temperature=1.0)),
            G.from_prompt("/no/such/image.png", s.question, max_new_tokens=4)]
    bundled_engine.generate_requests(rows, row_errors="keep")
    assert rows[0].error is None and rows[0].token_ids == alone.token_ids and rows[0].text == alone.text
    assert isinstance(rows[1].error, NonFiniteLogits) and rows[1].finish_reason == "error"
    assert isinstance(rows[2].error, UserError) and rows[2].finish_reason == "error"
    again = [G.from_prompt(s.image, s.question, max_new_tokens=4),
             G.from_prompt(s.image, s.question, max_new_tokens=4, sampling=SamplingParams(temperature=1.0))]
    with pytest.raises(NonFiniteLogits):
        bundled_engine.generate_requests(again)
    assert again[0].token_ids == alone.token_ids


def test_a_batch_that_fails_before_its_first_token_runs_its_rows_alone():
    """Static batching: an exception for the whole batch in its prefill (one row's doing): each row runs again
    alone, so only the row that causes it fails."""
    from vismmoe.engine.request import GenerationRequest as G
    from vismmoe.serve.scheduler import Scheduler

    class Engine:
        def generate_requests(self, reqs, row_errors="raise"):
            if any(r.messages == "poison" for r in reqs):
                raise RuntimeError("the prefill failed")
            for r in reqs:
                r.token_ids.append(1)
                r.finish_reason = "length"

    sched = Scheduler(Engine(), max_batch=4, batching="static")
    got, finished = {}, threading.Event()

    def done(req, error):
        got[id(req)] = error
        if len(got) == 3:
            finished.set()

    rows = [G(messages=[]), G(messages="poison"), G(messages=[])]
    with sched._cv:                        # all three wait before the worker takes any: one batch
        for r in rows:
            sched.submit(r, done)
    assert finished.wait(timeout=30)
    sched.close()
    assert [type(got[id(r)]).__name__ for r in rows] == ["NoneType", "RuntimeError", "NoneType"]
    assert [r.finish_reason for r in rows] == ["length", None, "length"]


class _BlockedEngine:
    """An engine whose prefill (continuous: `_BlockedBatch.admit_group`) or batch (static: `generate_requests`)
    waits at `entered` until `release`: a burst that arrives while the engine is busy, without sleeps."""
    prefill_chunk = 0

    def __init__(self):
        self.entered, self.release = threading.Event(), threading.Event()

    def generate_requests(self, reqs, row_errors="raise"):
        self.entered.set()
        assert self.release.wait(timeout=60)
        for r in reqs:
            r.finish_reason = "length"


class _BlockedBatch:
    """serve/scheduler.py's RunningBatch over a `_BlockedEngine`: a prefill waits for the release, a decode step
    ends every row."""

    def __init__(self, engine, capacity):
        self.engine, self.requests, self.prefilling, self.stepped = engine, [], None, []

    def __len__(self):
        return len(self.requests)

    def admit(self, req):
        return self.admit_group([req])

    def admit_group(self, reqs):
        self.engine.generate_requests([])
        self.requests += reqs
        return []

    def step(self):
        self.stepped, self.requests = self.requests, []
        for r in self.stepped:
            r.finish_reason = "length"
        return self.stepped


@pytest.mark.parametrize("batching", ["continuous", "static"])
@pytest.mark.parametrize("when", ["idle", "busy"])
def test_a_burst_gets_max_batch_plus_max_queue_places_whatever_the_engine_does(monkeypatch, batching, when):
    """--max-batch 8, --max-queue 16, a burst of 30: 24 are taken and 6 refused (QueueFull: 429), whether the burst
    comes before the worker took anything (idle) or while one request's prefill or batch runs (busy); a free row is
    a place, not a wait in the queue. Every request taken is answered."""
    from vismmoe.engine.request import GenerationRequest as G
    from vismmoe.serve import scheduler as sched_mod
    monkeypatch.setattr(sched_mod, "RunningBatch", _BlockedBatch)
    monkeypatch.setattr(sched_mod, "blocker", lambda engine: None)
    engine = _BlockedEngine()
    sched = sched_mod.Scheduler(engine, max_batch=8, max_queue=16, batching=batching)
    answered, refused = [], []
    burst = [G(messages=[]) for _ in range(30)]

    def submit(r):
        try:
            sched.submit(r, lambda req, error: answered.append(req))
        except sched_mod.QueueFull as e:
            refused.append(str(e))

    try:
        if when == "busy":
            submit(burst[0])
            assert engine.entered.wait(timeout=60)            # one request runs (its prefill, or its batch)
            for r in burst[1:]:
                submit(r)
        else:
            with sched._cv:                                    # the worker takes nothing until all 30 came
                for r in burst:
                    submit(r)
        assert (30 - len(refused), len(refused)) == (24, 6), refused
        assert "--max-batch 8 + --max-queue 16" in refused[0], refused[0]
    finally:
        engine.release.set()
        sched.close()
    assert len(answered) == 24 and all(r.finish_reason == "length" for r in answered)


def test_prompt_over_the_character_limit_is_refused_before_tokenizing(server, bundled_engine):
    limit = 16 * 2048                                               # the bundled model's context: 2048 tokens
    for n in (limit + 1, 24 * 1024 * 1024):
        r = server.post(text_chat("a " * (n // 2) + "a" * (n % 2), max_tokens=2))
        assert r.status_code == 400, r.text[:300]
        err = r.json()["error"]
        assert err["code"] == "prompt_too_long" and f"{limit:,}" in err["message"] and "--max-prompt-chars" in \
            err["message"]
    ok = server.post(text_chat("what? " * 20, max_tokens=2, temperature=0))
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("body", [
    b'{"model": "vqa-moe", "messages": [{"role": "user", "content": "\\ud800 hi"}]}',
    b'{"model": "vqa-moe", "messages": [{"role": "user", "content": [{"type": "text", "text": "a\\udfff"}]}]}',
    b'{"model": "vqa-moe", "messages": [{"role": "user", "content": "hi"}], "stop": ["\\udc00"]}',
    b'{"model": "vqa-moe", "messages": [{"role": "user", "content": "hi"}], "\\ud800": 1}',
    b'{"model": "vqa-moe", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    b'{"model": "vqa-moe", "messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}',
    b'{"model": "vqa-moe", "messages": [{"role": "user", "content": "hi"}], "stop": ' + b"[" * 5000 + b"]" * 5000
    + b"}",
    b'{"model": "vqa-moe", "messages": [{"role": "user", "content": "hi"}], "stop": ' + b"[" * 200 + b"]" * 200
    + b"}",
    b'{"model": "vqa-moe", "messages": ' + b'[{"role": "user", "content": ' * 300 + b'"x"' + b"}]" * 300 + b"}",
    b"[" * 100000,
], ids=["surrogate-content", "surrogate-part", "surrogate-stop", "surrogate-key", "nan", "infinity", "deep-5000",
        "deep-200", "deep-messages", "open-100000"])
def test_malformed_text_and_json_get_400(server, body):
    r = server.post(body)
    assert r.status_code == 400, (body[:120], r.text[:300])
    err = r.json()["error"]
    assert err["message"] and "\n" not in err["message"] and err["type"] == "invalid_request_error"


def test_a_surrogate_pair_is_text(server):
    r = server.post(b'{"model": "vqa-moe", "max_tokens": 2, "messages": [{"role": "user", "content": '
                    b'"what is \\ud83d\\ude00?"}]}')
    assert r.status_code == 200, r.text


def test_file_url_with_a_nul_gets_400(server, samples):
    samples[0].image.save(server.media / "ok.png")
    for url in (f"file://{server.media}/ok%00.png", f"file://{server.media}/%00/../ok.png"):
        r = server.post({"model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what?"}]}]})
        assert r.status_code == 400 and "NUL" in r.json()["error"]["message"], r.text


def test_a_client_that_leaves_before_its_body_ends_is_a_cancellation(server, caplog):
    key = lambda outcome: ("vismmoe_requests_total", (("outcome", outcome),))     # noqa: E731
    before = server.metrics()
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 5000\r\n\r\n{\"model\": \"vqa")
            time.sleep(0.2)
        deadline = time.time() + 20
        while server.metrics().get(key("cancelled"), 0) < before.get(key("cancelled"), 0) + 3 and \
                time.time() < deadline:
            time.sleep(0.1)
    after = server.metrics()
    assert after.get(key("cancelled"), 0) == before.get(key("cancelled"), 0) + 3
    assert after.get(key("error"), 0) == before.get(key("error"), 0)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text
    assert server.post(text_chat("hi", max_tokens=2)).status_code == 200


def test_auth_scheme_is_case_insensitive(bundled_engine):
    srv = Server(bundled_engine, api_key="sekret")
    try:
        body = text_chat("hi", max_tokens=2)
        for header in ("Bearer sekret", "bearer sekret", "BEARER sekret", "Bearer  sekret"):
            assert srv.post(body, {"authorization": header}).status_code == 200, header
        for header in ("Bearer sekre", "Basic sekret", "sekret", "Bearersekret", ""):
            r = srv.post(body, {"authorization": header})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", header
    finally:
        srv.close()


def test_wrong_paths_and_methods_get_error_objects(server):
    for r, status in ((httpx.get(server.url + "/v1/chat/completions"), 405), (httpx.get(server.url + "/nope"), 404),
                      (httpx.post(server.url + "/v1/models"), 405)):
        assert r.status_code == status and r.json()["error"]["message"], r.text


def test_too_many_images_get_400(server, samples):
    url = data_url(samples[0].image.resize((8, 8)))
    parts = [{"type": "image_url", "image_url": {"url": url}}] * 33 + [{"type": "text", "text": "how many?"}]
    r = server.post({"model": MODEL, "messages": [{"role": "user", "content": parts}]})
    assert r.status_code == 400 and "--max-images" in r.json()["error"]["message"], r.text


# ---- remote media --------------------------------------------------------------------------------------------
class _Origin:
    """A loopback HTTP server for image URLs: /ok (a PNG), /drip (a byte every 0.2 s, for ever), /big (over the
    cap), /redirect (to 127.0.0.2, loopback but not allowed). Counts the requests it gets."""

    def __init__(self, png: bytes):
        origin = self
        self.hits = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                origin.hits += 1
                try:
                    if self.path == "/drip":
                        self.send_response(200)
                        self.send_header("Content-Length", "100000")
                        self.end_headers()
                        while True:
                            self.wfile.write(b"x")
                            self.wfile.flush()
                            time.sleep(0.2)
                    elif self.path == "/big":
                        self.send_response(200)
                        self.end_headers()
                        for _ in range(64):
                            self.wfile.write(b"x" * 65536)
                    elif self.path == "/redirect":
                        self.send_response(302)
                        self.send_header("Location", f"http://127.0.0.2:{origin.port}/ok")
                        self.end_headers()
                    else:
                        self.send_response(200)
                        self.send_header("Content-Length", str(len(png)))
                        self.end_headers()
                        self.wfile.write(png)
                except OSError:
                    pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_port
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


@pytest.fixture(scope="module")
def origin(samples):
    import io
    buf = io.BytesIO()
    samples[0].image.save(buf, "PNG")
    o = _Origin(buf.getvalue())
    yield o
    o.httpd.shutdown()


LOOPBACK = MediaRules(allow_remote=True, allow_networks=parse_networks("127.0.0.1"), timeout_s=2.0,
                      max_bytes=1024 * 1024)


def test_remote_images_are_fetched_from_allowed_networks(origin):
    assert image_bytes(origin.url("/ok"), LOOPBACK)[:4] == b"\x89PNG"


def test_loopback_and_private_addresses_are_refused_without_the_allow_list(origin):
    rules = MediaRules(allow_remote=True, timeout_s=2.0)
    hits = origin.hits
    for url in (origin.url("/ok"), origin.url("/ok", "localhost"), origin.url("/ok", "[::ffff:127.0.0.1]"),
                origin.url("/ok", "[::1]"), "http://10.1.2.3/x.png", "http://169.254.169.254/latest/meta-data",
                "http://192.168.0.1/x.png", "http://0.0.0.0/x.png", "http://[fe80::1]/x.png",
                "http://224.0.0.1/x.png", "http://100.64.0.1/x.png", "http://[64:ff9b::7f00:1]/x.png"):
        with pytest.raises(UserError, match="not at a public address"):
            image_bytes(url, rules)
    assert origin.hits == hits                                      # nothing was asked of the loopback server
    assert not media.allowed_address(ipaddress.ip_address("127.0.0.1"))
    assert media.allowed_address(ipaddress.ip_address("8.8.8.8"))
    assert media.allowed_address(ipaddress.ip_address("10.1.2.3"), parse_networks("10.0.0.0/8"))


def test_remote_fetch_has_one_deadline_a_size_cap_and_checked_redirects(origin):
    errors = []

    def fetch():
        try:
            image_bytes(origin.url("/drip"), LOOPBACK)         # each byte comes well within any read timeout
        except UserError as e:
            errors.append(e)

    dripping = threading.Thread(target=fetch, daemon=True)
    dripping.start()
    dripping.join(timeout=60)                                  # the deadline is 2 s; the drip would last hours
    assert not dripping.is_alive() and len(errors) == 1
    with pytest.raises(UserError, match="over 1 MiB"):
        image_bytes(origin.url("/big"), LOOPBACK)
    with pytest.raises(UserError) as redirect:
        image_bytes(origin.url("/redirect"), LOOPBACK)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with pytest.raises(UserError) as refused:
        image_bytes(f"http://127.0.0.1:{port}/x.png", LOOPBACK)
    with pytest.raises(UserError) as denied:
        image_bytes(origin.url("/ok"), MediaRules(allow_remote=True))
    # a timeout, a closed port, a refused redirect and a refused address read alike: no port scan through errors
    assert len({str(e) for e in (errors[0], redirect.value, refused.value, denied.value)}) == 1


@pytest.mark.parametrize("url", ["http://[::1/x.png", "http://x:99999/x.png", "http://ünï.example/x.png", "http:///x",
                                 "http://:80/x.png", "file://[/x.png"])
def test_urls_that_do_not_parse_are_user_errors(url):
    with pytest.raises(UserError):
        image_bytes(url, MediaRules(allow_remote=True, allowed_local="/tmp", timeout_s=1.0))


def test_dns_rebinding_gains_nothing(origin, monkeypatch):
    """The name resolves to a public address when checked and to loopback after: the connection goes to the
    address that was checked, never to the loopback one."""
    answers = iter(["8.8.8.8"] + ["127.0.0.1"] * 10)
    monkeypatch.setattr(media.socket, "getaddrinfo", lambda host, port, *a, **kw: [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))])
    tried = []

    def connect(ip, port, timeout):
        tried.append(ip)
        raise media.httpcore.ConnectError("refused")

    monkeypatch.setattr(media, "_connect", connect)
    hits = origin.hits
    with pytest.raises(UserError, match="not at a public address"):
        image_bytes(origin.url("/ok", "rebind.example"), MediaRules(allow_remote=True, timeout_s=2.0))
    assert tried == ["8.8.8.8"] and origin.hits == hits


def test_remote_media_through_the_server(bundled_engine, origin, samples):
    srv = Server(bundled_engine, media=MediaRules(allow_remote=True, timeout_s=2.0))
    allowed = Server(bundled_engine, media=LOOPBACK)
    try:
        body = lambda url: {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": [  # noqa
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": samples[0].question}]}]}
        r = srv.post(body(origin.url("/ok")))
        assert r.status_code == 400 and "public address" in r.json()["error"]["message"], r.text
        assert allowed.post(body(origin.url("/ok"))).status_code == 200
        assert allowed.post(body(origin.url("/drip")), timeout=30).status_code == 400
    finally:
        srv.close()
        allowed.close()


# ---- shutdown ------------------------------------------------------------------------------------------------
def test_shutdown_drains_then_cancels_running_requests(bundled_engine):
    srv = Server(bundled_engine, shutdown_timeout_s=0.5, max_batch=2)
    long = text_chat("hello", max_tokens=1500, ignore_eos=True)
    with cf.ThreadPoolExecutor(2) as pool:
        streamed = pool.submit(lambda: httpx.post(srv.url + "/v1/chat/completions", json=dict(long, stream=True),
                                                  timeout=120).text)
        plain = pool.submit(srv.post, long, None, 120)
        sched, deadline = srv.app.state.scheduler, time.time() + 60
        while not (sched.running >= 1 and sched.running + sched.queued == 2) and time.time() < deadline:
            time.sleep(0.05)
        assert sched.running >= 1 and sched.running + sched.queued == 2
        srv.server.should_exit = True                            # what SIGTERM does
        r = plain.result()
        events = streamed.result()
    srv.thread.join(timeout=60)
    assert not srv.thread.is_alive()
    srv.app.state.scheduler.close()
    assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutdown", r.text
    assert '"code": "server_shutdown"' in events and events.rstrip().endswith("data: [DONE]")


def test_serve_command_port_zero_and_sigterm(tmp_path):
    """`vismmoe serve --port 0` says the port it bound, serves, and on SIGTERM answers its running requests within
    the drain deadline (plain: 503; streamed: a server_shutdown error event, then [DONE]), then exits 143 with the
    one line `vismmoe: terminated` (as SIGINT ends with `vismmoe: interrupted`), no traceback."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(os.path.dirname(__file__), "..", "src"),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "vismmoe", "serve", "--port", "0", "--shutdown-timeout", "1",
                             "--expert-budget", "25%"], stderr=subprocess.PIPE, text=True, env=env)
    lines, serving = [], threading.Event()

    def read():                         # all of stderr, so the pipe never fills whatever the server logs
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if "serving" in line:
                serving.set()
        serving.set()                   # ended before it served: the test fails below, not at a timeout

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert serving.wait(timeout=300) and proc.poll() is None, lines
        port = int(next(x for x in lines if "serving" in x).split("http://127.0.0.1:")[1].split("/")[0])
        assert port != 0
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:                     # the loop accepts once it said so; wait for it all the same
            try:
                if httpx.get(url + "/health", timeout=10).json() == {"status": "ok"}:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "no /health"
            time.sleep(0.1)
        long = text_chat("hello", max_tokens=1800, ignore_eos=True)
        with cf.ThreadPoolExecutor(2) as pool:
            plain = pool.submit(httpx.post, url + "/v1/chat/completions", json=long, timeout=300)
            streamed = pool.submit(lambda: httpx.post(url + "/v1/chat/completions", json=dict(long, stream=True),
                                                      timeout=300).text)
            deadline = time.time() + 300
            while "vismmoe_running_requests 2.0" not in httpx.get(url + "/metrics", timeout=30).text:
                assert time.time() < deadline and plain.running() and streamed.running(), "the requests never ran"
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            r, events = plain.result(), streamed.result()
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutdown", r.text
        assert '"code": "server_shutdown"' in events and events.rstrip().endswith("data: [DONE]"), events[-300:]
        assert proc.wait(timeout=120) == 143, lines
        reader.join(timeout=30)
        assert lines[-1] == "vismmoe: terminated" and not any("Traceback" in x for x in lines), lines
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=30)
        proc.stderr.close()


def test_serve_command_refuses_an_empty_key_and_a_busy_port(capsys, monkeypatch):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        monkeypatch.delenv("VISMMOE_API_KEY", raising=False)
        assert main(["serve", "--api-key", ""]) == 2
        assert main(["serve", "--api-key", "two words"]) == 2
        monkeypatch.setenv("VISMMOE_API_KEY", "")
        assert main(["serve"]) == 2
        monkeypatch.delenv("VISMMOE_API_KEY")
        assert main(["serve", "--port", str(busy.getsockname()[1])]) == 2
        assert main(["serve", "--allow-media-networks", "10.0.0.0/33", "--allow-remote-media"]) == 2
        assert main(["serve", "--allow-media-networks", "10.0.0.0/8"]) == 2
        assert main(["serve", "--shutdown-timeout", "nan"]) == 2
        assert main(["serve", "--admit-wait-ms", "-5"]) == 2
    finally:
        busy.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 8 and all(line.startswith("vismmoe: error:") for line in err), err
    assert "serving" not in "".join(err) and "in use" in err[3]


# ---- start-up options that would refuse every request --------------------------------------------------------
@pytest.fixture
def no_serving(monkeypatch):
    """A `vismmoe serve` that gets as far as serving fails the test instead of serving for ever."""
    from vismmoe.serve import server as server_mod

    def run(self, *a, **kw):
        raise AssertionError("the server started")

    monkeypatch.setattr(server_mod.HTTPServer, "run", run)


def test_serve_command_refuses_a_body_limit_too_small_for_any_request(capsys, no_serving):
    for size in ("0", "1000", "1023", "0.5KiB"):
        assert main(["serve", "--port", "0", "--max-body", size]) == 2, size
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("vismmoe: error: --max-body") and "1 KiB" in line for line in err), err
    assert main(["serve", "--help"]) == 0
    assert "at least 1KiB" in " ".join(capsys.readouterr().out.split())


def test_serve_command_refuses_a_default_max_tokens_that_leaves_no_room(capsys, no_serving):
    """The bundled model's context is 2048 tokens: a default of 2048 or more would refuse every request that names
    no max_tokens; it is refused at start, after the model is loaded (its context is known then)."""
    for n in ("99999", "2048", "0"):
        assert main(["serve", "--port", "0", "--default-max-tokens", n]) == 2, n
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("vismmoe: error: --default-max-tokens") for line in err), err
    assert "context of 2048 tokens" in err[0] and "serving" not in "".join(err)


def test_a_request_without_max_tokens_gets_what_the_context_leaves(server, bundled_engine):
    """No max_tokens: the server's default (256), or what the context (2048) leaves after the prompt, whichever is
    less; a max_tokens the client asked for that does not fit stays a 400; a prompt that leaves no room is a 400
    that does not blame a token count the client never gave."""
    long = "a " * 1800                                                  # 1809 tokens: 239 left
    r = server.post(text_chat(long, ignore_eos=True))
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] == 1809 and usage["completion_tokens"] == 2048 - 1809, usage
    assert r.json()["choices"][0]["finish_reason"] == "length"
    short = server.post(text_chat("hi", ignore_eos=True))
    assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 256, short.text
    for kw in (dict(max_tokens=256), dict(max_completion_tokens=256)):
        asked = server.post(text_chat(long, **kw))
        assert asked.status_code == 400 and "exceeds the model's context" in asked.json()["error"]["message"], kw
    for n in (2039, 2100):                                              # 2048 and 2109 tokens
        full = server.post(text_chat("a " * n))
        assert full.status_code == 400, full.text
        err = full.json()["error"]
        assert "leaves no room" in err["message"] and "fewer new tokens" not in err["message"], err
        assert err["param"] == "messages" and "\n" not in err["message"]


def test_default_max_tokens_over_the_context_is_refused_by_the_app(bundled_engine):
    with pytest.raises(UserError, match="--default-max-tokens 2048 leaves no room"):
        Server(bundled_engine, default_max_tokens=2048)


# ---- loosely typed fields --------------------------------------------------------------------------------------
_HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("field,value", [
    ("max_tokens", True), ("max_tokens", False), ("max_tokens", "5"), ("max_tokens", 2.0),
    ("max_completion_tokens", True), ("top_k", True), ("seed", "1"), ("n", True),
    ("stream", "yes"), ("stream", 1), ("stream", "true"), ("ignore_eos", "true"), ("ignore_eos", 0),
    ("logprobs", "no"), ("stream_options", {"include_usage": "yes"}),
    ("temperature", True), ("temperature", "0.5"), ("top_p", "1"), ("presence_penalty", False),
    ("model", 5), ("user", 7),
])
def test_loosely_typed_fields_get_400(server, field, value):
    r = server.post({"model": MODEL, "messages": _HI, "max_tokens": 2, field: value})
    assert r.status_code == 400, (field, value, r.text)
    err = r.json()["error"]
    want = field + (".include_usage" if field == "stream_options" else "")
    assert err["param"] == want and err["message"].startswith(want + ": ") and "\n" not in err["message"], err
    assert " not a" in err["message"] or " not an" in err["message"], err     # "..., not a boolean"


def test_floats_take_integers(server):
    r = server.post({"model": MODEL, "messages": _HI, "max_tokens": 2, "temperature": 0, "top_p": 1,
                     "presence_penalty": 0})
    assert r.status_code == 200, r.text


def test_a_data_url_must_name_an_image_type(server, samples):
    png = data_url(samples[0].image.resize((32, 32))).partition(",")[2]
    body = lambda url: {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": [  # noqa: E731
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what?"}]}]}
    for head in ("data:text/plain;base64", "data:;base64", "data:application/octet-stream;base64",
                 "data:text/html;charset=utf-8;base64", "data:imagex/png;base64"):
        r = server.post(body(f"{head},{png}"))
        assert r.status_code == 400, (head, r.text)
        assert "image/*" in r.json()["error"]["message"], r.text
    for head in ("data:image/png;base64", "data:IMAGE/PNG;base64", "data:image/jpeg;base64"):
        assert server.post(body(f"{head},{png}")).status_code == 200, head       # the bytes decide the format


@pytest.mark.parametrize("messages,param", [
    ([{"role": "user", "content": "what\x00 is it?"}], "messages.0.content"),
    ([{"role": "system", "content": "\x00"}, {"role": "user", "content": "hi"}], "messages.0.content"),
    ([{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "a\x00b"}]}],
     "messages.0.content.1.text"),
])
def test_nul_in_message_text_gets_400(server, messages, param):
    r = server.post({"model": MODEL, "max_tokens": 2, "messages": messages})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "NUL" in err["message"] and err["param"] == param and "\n" not in err["message"], err


# ---- error params ----------------------------------------------------------------------------------------------
def _image(image_url, text="hi"):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": image_url},
                                         {"type": "text", "text": text}]}]


@pytest.mark.parametrize("extra,param", [
    (dict(messages=_image({"url": 5})), "messages.0.content.0.image_url.url"),
    (dict(messages=_image({"url": "data:image/png;base64,AAAA", "detail": "x"})),
     "messages.0.content.0.image_url.detail"),
    (dict(messages=_image({"url": "data:image/png;base64,AAAA", "size": 1})), "messages.0.content.0.image_url.size"),
    (dict(messages=_image({})), "messages.0.content.0.image_url.url"),
    (dict(messages=_image({"url": "data:image/png;base64,AAAA"}, text=5)), "messages.0.content.1.text"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), "messages.0.content.0.image_url"),
    (dict(messages=[{"role": "user", "content": [{"type": "text"}]}]), "messages.0.content.0.text"),
    (dict(messages=[{"role": "user", "content": [{"type": "text", "text": "hi", "x": 1}]}]),
     "messages.0.content.0.x"),
    (dict(messages=[{"role": "user", "content": 5}]), "messages.0.content"),
    (dict(messages=[{"role": "user", "content": {"str": "hi"}}]), "messages.0.content"),
    (dict(messages=[{"role": "user"}]), "messages.0"),
    (dict(messages=_HI, stop={"a": 1}), "stop"),
    (dict(messages=_HI, stop=["a", 5]), "stop.1"),
    (dict(messages=_HI, stream_options={"include_usage": "x"}), "stream_options.include_usage"),
    (dict(), "messages"),
])
def test_error_param_is_the_path_the_client_wrote(server, extra, param):
    r = server.post({"model": MODEL, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"].startswith(param + ": "), err
    assert not any(s in err["message"] for s in ("[", "tagged-union", "function-")), err


@pytest.mark.parametrize("case,param,code", [
    ("over-context-asked", "messages", "context_length_exceeded"),
    ("over-context", "messages", "context_length_exceeded"),
    ("asked-past-what-is-left", "max_tokens", "context_length_exceeded"),
    ("completion-past-what-is-left", "max_completion_tokens", "context_length_exceeded"),
    ("asked-past-the-context", "max_tokens", "context_length_exceeded"),
    ("completion-past-the-context", "max_completion_tokens", "context_length_exceeded"),
    ("truncated-png", "messages.0.content.0.image_url.url", "invalid_image_format"),
    ("second-turn-second-image", "messages.2.content.1.image_url.url", "invalid_image_format"),
    ("bad-base64", "messages.0.content.0.image_url.url", "invalid_image_url"),
    ("not-an-image-type", "messages.0.content.0.image_url.url", "invalid_image_url"),
    ("file-outside", "messages.0.content.0.image_url.url", "invalid_image_url"),
    ("remote-off", "messages.0.content.0.image_url.url", "invalid_image_url"),
    ("no-text", "messages", None),
    ("too-many-images", "messages", None),
    ("over-the-character-limit", "messages", "prompt_too_long"),
])
def test_request_errors_name_the_field_to_change(server, samples, case, param, code):
    """Every 400 for a request field says which one (`param`, the path as the client wrote it) and, where one
    fits, why (`code`): a prompt over the context is `messages` whether or not max_tokens was given; a token limit
    the prompt leaves no room for is the limit the client wrote; a bad image is the path of its url."""
    png = data_url(samples[0].image.resize((32, 32)))
    truncated = "data:image/png;base64," + base64.b64encode(base64.b64decode(png.partition(",")[2])[:60]).decode()
    image = lambda url, text="what?": [{"role": "user", "content": [                        # noqa: E731
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}]
    long = "a " * 1800                                                   # 1809 tokens: 239 left
    body = {
        "over-context-asked": dict(messages=image(png, "star " * 3000), max_tokens=24),
        "over-context": dict(messages=image(png, "star " * 3000)),
        "asked-past-what-is-left": dict(messages=[{"role": "user", "content": long}], max_tokens=256),
        "completion-past-what-is-left": dict(messages=[{"role": "user", "content": long}],
                                             max_completion_tokens=256),
        "asked-past-the-context": dict(messages=_HI, max_tokens=10**9),
        "completion-past-the-context": dict(messages=_HI, max_completion_tokens=2048),
        "truncated-png": dict(messages=image(truncated), max_tokens=2),
        "second-turn-second-image": dict(messages=image(png) + [{"role": "assistant", "content": "a cube"}, {
            "role": "user", "content": [{"type": "text", "text": "and here?"},
                                        {"type": "image_url", "image_url": {"url": truncated}}]}], max_tokens=2),
        "bad-base64": dict(messages=image("data:image/png;base64,@@@@"), max_tokens=2),
        "not-an-image-type": dict(messages=image("data:text/plain;base64," + png.partition(",")[2]), max_tokens=2),
        "file-outside": dict(messages=image("file:///etc/hostname"), max_tokens=2),
        "remote-off": dict(messages=image("http://example.com/x.png"), max_tokens=2),
        "no-text": dict(messages=image(png, " "), max_tokens=2),
        "too-many-images": dict(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": png}}] * 33 + [{"type": "text", "text": "how many?"}]}]),
        "over-the-character-limit": dict(messages=[{"role": "user", "content": "a" * (16 * 2048 + 1)}]),
    }[case]
    r = server.post({"model": MODEL, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"]) == (param, code), err
    assert err["type"] == "invalid_request_error" and "\n" not in err["message"], err
    if param.startswith("messages."):                                    # the image part's path, then why
        assert err["message"].startswith(param + ": "), err
    elif code == "context_length_exceeded" and param == "messages":
        assert "leaves no room for an answer" in err["message"] and "new tokens" not in err["message"], err
    elif code == "context_length_exceeded":                              # the limit to lower, and to what
        assert f"{param} " in err["message"] and "ask for" in err["message"], err


@pytest.mark.parametrize("stop,param,says", [
    ([""], "stop.0", "must not be empty"), ("", "stop", "must not be empty"), (["a", ""], "stop.1", "must not be empty"),
    (["a", "b", "c", "d", "e"], "stop", "at most 4 stop strings (5 given)"),
])
def test_stop_strings_say_what_is_wrong_with_them(server, stop, param, says):
    """An empty stop string is refused for being empty (at its own path), not with the message for too many."""
    r = server.post({"model": MODEL, "messages": _HI, "max_tokens": 2, "stop": stop})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"].startswith(param + ": ") and says in err["message"], err
    assert ("at most" in err["message"]) == (says.startswith("at most")), err
