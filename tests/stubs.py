"""A local OpenAI-compatible upstream for the proxy tests: no paid API is ever called."""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class UpstreamStub:
    """Answers POST /v1/chat/completions (plain or streamed) naming the model it was asked for.

    `behaviour[model]` makes it fail for that model: "500" or "429" (that status), "close" (the
    connection is closed with no answer), "slow" (answers after `slow_s`), "drop" (a stream that
    breaks after its first chunk), "cut" (a stream that ends cleanly after its first chunk, without
    `data: [DONE]`), "headers-only" (a stream's 200 and headers, then the connection closes before
    any chunk), "trickle" (a whole stream, one chunk every 0.25 s for about 3 s), "400" (the request
    refused as invalid, naming `temperature` as OpenAI does), "no-usage" (an answer without `usage`),
    "empty" (a stream's 200 and headers, then a clean end with no data), "keepalive" (a stream that
    sends only SSE comments, one every 0.2 s, for `slow_s`, before its chunks)."""

    def __init__(self, slow_s: float = 10.0) -> None:
        self.requests: list[dict] = []
        self.behaviour: dict[str, str] = {}
        self.slow_s = slow_s
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def reply(self, status: int, body: dict) -> None:
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def hang_up(self) -> None:
                self.close_connection = True
                self.connection.shutdown(2)

            def do_POST(self):  # noqa: N802 - http.server API
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                model = body.get("model")
                behaviour = stub.behaviour.get(model)
                if behaviour in ("500", "429"):
                    return self.reply(int(behaviour), {"error": {"message": f"stub {behaviour}"}})
                if behaviour == "400":
                    return self.reply(400, {"error": {"message": "temperature must be at most 2", "param": "temperature",
                                                      "type": "invalid_request_error"}})
                if behaviour == "empty" and body.get("stream"):
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if behaviour == "headers-only" and body.get("stream"):
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    self.wfile.flush()
                    time.sleep(0.2)
                    return self.hang_up()  # before the first chunk
                if behaviour == "close":
                    return self.hang_up()
                if behaviour == "slow":
                    time.sleep(stub.slow_s)
                if behaviour in ("drop", "cut") and body.get("stream"):  # one chunk of an answer, then the end
                    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": model,
                             "choices": [{"index": 0, "delta": {"content": "partial "}, "finish_reason": None}]}
                    data = f"data: {json.dumps(chunk)}\n\n".encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    if behaviour == "drop":
                        self.send_header("Transfer-Encoding", "chunked")
                        self.end_headers()
                        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                        self.wfile.flush()
                        time.sleep(0.2)
                        return self.hang_up()  # mid-stream, without the terminating chunk
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)  # "cut": a whole HTTP answer, but not a whole stream
                    return
                if "SEND-ERROR" in json.dumps(body.get("messages")):  # a careless upstream echoes the key it got
                    return self.reply(500, {"error": f"rejected {self.headers.get('Authorization')}"})
                if "SEND-GARBAGE" in json.dumps(body.get("messages")):  # a broken upstream: 200, not JSON
                    self.send_response(200)
                    self.send_header("Content-Length", "9")
                    self.end_headers()
                    self.wfile.write(b"<html>oops")
                    return
                text = f"answer from {model}"
                usage = None if behaviour == "no-usage" else {"prompt_tokens": 12, "completion_tokens": 5,
                                                              "total_tokens": 17}
                if not body.get("stream"):
                    return self.reply(200, {"id": "c1", "object": "chat.completion", "created": int(time.time()),
                                            "model": model, "usage": usage,
                                            "choices": [{"index": 0, "finish_reason": "stop",
                                                         "message": {"role": "assistant", "content": text}}]})
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                if behaviour == "keepalive":  # every read well within a read timeout, no chunk for slow_s
                    waited = 0.0
                    while waited < stub.slow_s:
                        self.wfile.write(b": keep-alive\n\n")
                        self.wfile.flush()
                        time.sleep(0.2)
                        waited += 0.2
                words = text.split(" ") * (4 if behaviour == "trickle" else 1)
                for i, word in enumerate(words):
                    if behaviour == "trickle":
                        time.sleep(0.25)
                    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": model,
                             "choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                final = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": model, "choices": [],
                         "usage": usage}
                self.wfile.write(f"data: {json.dumps(final)}\n\ndata: [DONE]\n\n".encode())
                self.wfile.flush()

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # a caller that hung up mid-stream is expected
                if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
                    super().handle_error(request, client_address)

        self.server = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/v1"

    def __enter__(self) -> UpstreamStub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
