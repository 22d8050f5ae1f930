"""A stand-in for FreeToken's OpenAI server (FreeToken itself needs CUDA), run as a script by the bench tests:

    python tests/freetoken_standin.py MODE [--port P] [any FreeToken flags, ignored]

MODE  what it does
serve         answers /health, /v1/models and chat completions (streamed: one "x" per token, usage at the end)
hang          never serves: logs a progress bar and a warning, /health says it is loading expert banks
health-error  /health answers FreeToken's error document (its engine worker died of an assertion) and the process
              keeps running (FreeToken stops itself with SIGTERM ten seconds later)
self-sigterm  writes the log FreeToken 0.1.2 wrote when 128 slots of 4 x 128 experts were refused (its worker's
              traceback, the supervisor's error, uvicorn's shutdown, the resource_tracker warning) and then ends by
              SIGTERM sent to itself, as FreeToken does
fail-requests serves /health and /v1/models, then fails every chat completion with HTTP 500

Its flags are written to a file next to it when the environment names one (STANDIN_ARGV).
"""

import http.server
import json
import os
import signal
import sys
import threading
import time

ASSERTION = ("AssertionError: Prefill overlap borrows two full expert-layer buffers from the unified MoE cache, so "
             "cache_size must be at least 2 * num_experts (raise moe_cache_size or disable moe_prefill_overlap)")
_R, _G, _Y, _0, _B = "\x1b[31m", "\x1b[32m", "\x1b[33m", "\x1b[0m", "\x1b[1m"

FAILED_LOG = f"""{_B}[2026-12-06|11:58:01|initializer]{_0} {_G}INFO    {_0} Default sampling config (source=framework): temperature=0.0, top_k=-1, top_p=1.0
INFO:     Started server process [4242]
INFO:     Waiting for application startup.
INFO:     Application startup complete.
INFO:     Uvicorn running on http://127.0.0.1:40000 (Press CTRL+C to quit)
{_B}[2026-12-06|11:58:20|core|rank=0]{_0} {_G}INFO    {_0} Free memory before loading model: 78.66 GiB
Loading expert banks:  40%|████      | 1.93G/4.83G [00:02<00:03, 905MB/s]\rLoading expert banks: 100%|██████████| 4.83G/4.83G [00:05<00:00, 905MB/s]
Process freetoken-TP0-scheduler:
Traceback (most recent call last):
  File "/usr/lib/python3.12/multiprocessing/process.py", line 314, in _bootstrap
    self.run()
  File "/tmp/site/freetoken/engine/engine.py", line 555, in _init_offload_moe_cache
    cache = OffloadMoeCache(
            ^^^^^^^^^^^^^^^^
  File "/tmp/site/freetoken/moe/offload_cache.py", line 141, in __post_init__
    assert not self.prefill_overlap or self.cache_size >= 2 * self.num_experts, (
           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
{ASSERTION}
{_B}[2026-12-06|11:58:31|initializer]{_0} {_R}ERROR   {_0} Backend supervisor: {ASSERTION}
{_B}[2026-12-06|11:58:41|initializer]{_0} {_R}ERROR   {_0} Backend worker is gone and cannot be restarted; stopping the API server
INFO:     Shutting down
INFO:     Waiting for application shutdown.
INFO:     Application shutdown complete.
INFO:     Finished server process [4242]
/usr/lib/python3.12/multiprocessing/resource_tracker.py:279: UserWarning: resource_tracker: There appear to be 1 leaked semaphore objects to clean up at shutdown: {{'/mp-8ek2'}}
  warnings.warn('resource_tracker: There appear to be %d '
"""


def main() -> None:
    mode = sys.argv[1]
    port = int(sys.argv[sys.argv.index("--port") + 1]) if "--port" in sys.argv else 0
    if os.environ.get("STANDIN_ARGV"):
        with open(os.environ["STANDIN_ARGV"], "a") as f:
            f.write(json.dumps(sys.argv[2:]) + "\n")
    if mode == "self-sigterm":
        sys.stdout.write(FAILED_LOG)
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    if mode == "hang":
        print("Loading expert banks:  40%|████      | 1.93G/4.83G [00:02<00:03, 905MB/s]", flush=True)
        print("/tmp/site/freetoken/utils.py:12: UserWarning: something harmless", flush=True)
        print("  warnings.warn('something harmless')", flush=True)
    t0 = time.monotonic()

    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _send(self, code, body):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/health":
                if mode == "health-error" and time.monotonic() - t0 > 0.3:
                    return self._send(200, {"status": "error", "message": ASSERTION, "instance_id": "x"})
                if mode in ("hang", "health-error"):
                    return self._send(200, {"status": "loading", "phase": "expert_banks",
                                            "progress": {"done_bytes": 1.93e9, "total_bytes": 4.83e9}})
                return self._send(200, {"status": "ok"})
            if mode in ("hang", "health-error"):
                return self._send(503, {"error": "server unavailable: model is still loading"})
            self._send(200, {"object": "list", "data": [{"id": "m", "object": "model"}]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            if mode != "serve":
                return self._send(500, {"error": {"message": "expert bank exploded", "type": "server_error"}})
            n = int(body.get("max_tokens") or 1)
            prompt = sum(len(m["content"].split()) for m in body["messages"])
            if not body.get("stream"):
                return self._send(200, {"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                                        "choices": [{"index": 0, "finish_reason": "length",
                                                     "message": {"role": "assistant", "content": "x" * n}}],
                                        "usage": {"prompt_tokens": prompt, "completion_tokens": n,
                                                  "total_tokens": prompt + n}})
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("connection", "close")
            self.end_headers()
            for i in range(n):
                chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                         "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
                time.sleep(0.002)
            end = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [],
                   "usage": {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}}
            self.wfile.write(f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n".encode())
            self.wfile.flush()
            self.close_connection = True

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    time.sleep(600)


if __name__ == "__main__":
    main()
