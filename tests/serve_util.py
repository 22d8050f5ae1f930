"""What the server tests share: the server on a loopback port in a thread, and request builders."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time

import httpx
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from vismmoe.serve.app import ServeOptions, create_app
from vismmoe.serve.server import HTTPServer, server_config

MODEL = "vqa-moe"


class Server:
    """create_app on a free loopback port, run by the server `vismmoe serve` runs (uvicorn) in a thread."""

    def __init__(self, engine, **opts):
        self.app = create_app(engine, ServeOptions(model_name=MODEL, **opts))
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.server = HTTPServer(server_config(self.app, self.app.state.shutdown_timeout_s, host="127.0.0.1",
                                               port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key="none") -> OpenAI:
        return OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0)

    def post(self, body, headers=None, timeout=60) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.post(self.url + "/v1/chat/completions", content=content, timeout=timeout,
                          headers={"content-type": "application/json", **(headers or {})})

    def metrics(self) -> dict:
        text = httpx.get(self.url + "/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.app.state.scheduler.close()


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat(image, question, **kw) -> dict:
    return dict(model=MODEL, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": question}]}], **kw)


def text_chat(text, **kw) -> dict:
    return dict(model=MODEL, messages=[{"role": "user", "content": text}], **kw)
