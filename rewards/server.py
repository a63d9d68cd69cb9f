"""Serve one reward of this project over HTTP: the server side of rewards.remote.

    python -m rewards.server --reward pickscore --port 8000 --device cuda:1
    FLOW_RL_REWARD_TOKEN=$(cat token) python -m rewards.server --reward mypkg.rewards.Ocr --host 0.0.0.0 --port 8000

then train with `--reward pickscore=http://HOST:8000`. Registry names and dotted custom rewards alike, pointwise
and groupwise. GET /health -> {protocol, name, kind, batch_size, max_request_mb}; POST /score and
POST /group_transform take and return safetensors bodies (format in rewards.remote, docs/rewards.md).

Starlette on uvicorn. Scoring runs in a thread pool (--threads), so the event loop keeps reading and answering
other requests while a batch scores; calls into the reward itself are serialised unless it declares
`thread_safe = True` (models, tokenizers are not known to be). A request is scored in chunks of the reward's
`batch_size` when it declares one. Binds 127.0.0.1 by default; any other bind needs a token (FLOW_RL_REWARD_TOKEN
or --token-file: never a flag value, which ps and logs would show), and then every request must carry it. A client
gets --timeout seconds to send a request's headers and between two pieces of its body, token or not: an idle or
trickling connection is closed, a slow but steady upload goes on, and scoring time does not count.
"""
import argparse
import asyncio
import contextlib
import hmac
import ipaddress
import json
import shutil
import sys
import tempfile
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor

import torch
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rewards import RewardError, load_rewards, parse_spec
from rewards.remote import (MEDIA_TYPE, PROTOCOL, TOKEN_ENV, concat_scores, decode, decode_score_request, encode,
                            one_line, read_token)


def batch_size(reward) -> int | None:
    n = getattr(reward, "batch_size", None)
    return n if isinstance(n, int) and n > 0 else None


class BadRequest(RewardError):
    """A request inconsistent in itself: 400, not retried."""


def check_counts(body: bytes):
    """Images, prompts and metadata rows must be as many: read from the safetensors header alone, before any tensor
    is decoded; anything malformed is left to decode_score_request (422)."""
    try:
        head = json.loads(body[8:8 + int.from_bytes(body[:8], "little")])
        h = json.loads(head["__metadata__"]["json"])
        counts = {"images": head["images"]["shape"][0]}
        counts.update({k: len(h[k]) for k in ("prompts", "metadata") if isinstance(h.get(k), list)})
    except Exception:
        return
    if len(set(counts.values())) > 1:
        raise BadRequest("bad /score body: " + ", ".join(f"{v} {k}" for k, v in counts.items())
                         + "; expected one of each per sample")


def score_in_batches(reward, name: str, images, prompts, metadata, lock=contextlib.nullcontext()) -> torch.Tensor:
    """The reward's raw scores, in chunks of its batch_size; shape and values unchecked (the client checks them,
    through RewardSet.score, exactly as for a local reward)."""
    if not prompts:  # as the client answers an empty call itself: no scores, the reward is not called
        return torch.zeros(0)
    n = batch_size(reward) or len(prompts)
    with lock, torch.no_grad():
        return concat_scores([torch.as_tensor(reward(images[i:i + n], prompts[i:i + n], metadata[i:i + n]))
                              .detach().float().cpu() for i in range(0, len(prompts), n)], name)


def timed_protocol(timeout: float):
    """uvicorn's HTTP protocol, closing a connection whose request headers take over `timeout` s (from its opening or
    the previous answer): uvicorn alone waits for them forever, and its keep-alive timer stops at the first byte."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class Timed(AutoHTTPProtocol):
        timer = None

        def waiting(self) -> bool:  # for the next request's headers, not on the app
            return self.cycle is None or self.cycle.response_complete

        def arm(self):
            self.disarm()
            if self.waiting():
                self.timer = self.loop.call_later(timeout, self.transport.close)

        def disarm(self):
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self.arm()

        def data_received(self, data):
            super().data_received(data)
            if not self.waiting():  # headers complete: the body's pace is read_body's concern
                self.disarm()

        def on_response_complete(self):
            super().on_response_complete()
            self.arm()

        def connection_lost(self, exc):
            self.disarm()
            super().connection_lost(exc)

    return Timed


def build_app(reward, name: str, token: str | None = None, max_request_mb: float = 256, threads: int = 4,
              timeout: float = 60):
    kind = "groupwise" if getattr(reward, "groupwise", False) else "pointwise"
    limit = int(max_request_mb * 2**20)
    pool = ThreadPoolExecutor(threads, thread_name_prefix="reward")
    expected = f"Bearer {token}".encode() if token else None
    lock = contextlib.nullcontext() if getattr(reward, "thread_safe", False) else threading.Lock()

    def error(status: int, msg: str):
        return JSONResponse({"error": one_line(msg)}, status)

    def authorized(request) -> bool:
        return expected is None or hmac.compare_digest(request.headers.get("authorization", "").encode(), expected)

    async def read_body(request):
        """The body, or an error answer: 413 past the bound (from Content-Length before reading, else while reading),
        408 when no piece of it comes for `timeout` s (a slow but steady upload goes on)."""
        too_large = f"request body over {max_request_mb:g} MB (the server's --max-request-mb)"
        try:
            if int(request.headers.get("content-length", 0)) > limit:
                return error(413, too_large)
        except ValueError:
            return error(413, too_large)
        chunks, size, stream = [], 0, request.stream()
        while True:
            try:
                chunk = await asyncio.wait_for(anext(stream), timeout)
            except StopAsyncIteration:
                return b"".join(chunks)
            except asyncio.TimeoutError:  # the rest of the body will not come: answer, and close the connection
                return JSONResponse({"error": f"no request data for {timeout:g} s (the server's --timeout)"}, 408,
                                    headers={"Connection": "close"})
            size += len(chunk)
            if size > limit:
                return error(413, too_large)
            chunks.append(chunk)

    def score(body: bytes) -> bytes:
        workdir = tempfile.mkdtemp(prefix="reward-server-")  # the request's condition images, as files
        try:
            check_counts(body)
            images, prompts, metadata = decode_score_request(body, workdir)
            return encode({"scores": score_in_batches(reward, name, images, prompts, metadata, lock)})
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def group_transform(body: bytes) -> bytes:
        tensors, _ = decode(body)
        if tensors.get("scores") is None or tensors["scores"].dim() != 2:
            raise RewardError("bad /group_transform body: expected 'scores' of shape (G, K)")
        with lock, torch.no_grad():
            return encode({"scores": torch.as_tensor(reward.group_transform(tensors["scores"].float()))
                           .detach().float().cpu().contiguous()})

    def endpoint(fn):
        async def handle(request):
            if not authorized(request):
                return error(401, "bad or missing token")
            body = await read_body(request)
            if isinstance(body, Response):
                return body
            try:  # off the event loop: other requests (and /health) are served meanwhile
                return Response(await asyncio.get_running_loop().run_in_executor(pool, fn, body),
                                media_type=MEDIA_TYPE)
            except BadRequest as e:
                return error(400, str(e))
            except ValueError as e:  # RewardError, bad input: the same request would fail again, no retry
                return error(422, f"{type(e).__name__}: {e}")
            except Exception as e:  # possibly transient (out of memory, a busy device): the client retries 5xx
                traceback.print_exc()
                return error(500, f"{type(e).__name__}: {e}")
        return handle

    async def health(request):
        if not authorized(request):
            return error(401, "bad or missing token")
        return JSONResponse({"protocol": PROTOCOL, "name": name, "kind": kind, "max_request_mb": max_request_mb,
                             "batch_size": batch_size(reward)})

    return Starlette(routes=[Route("/health", health),
                             Route("/score", endpoint(score), methods=["POST"]),
                             Route("/group_transform", endpoint(group_transform), methods=["POST"])])


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m rewards.server", description=__doc__.split("\n")[0])
    p.add_argument("--reward", required=True, help="a registry name (pickscore, ...) or a dotted path pkg.mod.Reward")
    p.add_argument("--reward-path", help="a local folder overriding a registry reward's hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback needs a token")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--max-request-mb", type=float, default=256, help="larger request bodies are refused (413)")
    p.add_argument("--threads", type=int, default=4, help="requests scored at the same time")
    p.add_argument("--timeout", type=float, default=60,
                   help="seconds a client gets to send a request's headers, and between two pieces of its body")
    p.add_argument("--token-file", help=f"file holding the token (else ${TOKEN_ENV}, else ${TOKEN_ENV}_FILE)")
    args = p.parse_args(argv)
    if args.threads < 1 or not args.max_request_mb > 0 or not 0 < args.timeout < float("inf"):
        p.error("--threads must be >= 1, --max-request-mb > 0 and --timeout a positive number of seconds")
    try:
        token = read_token(args.token_file)
        if token is None and not is_loopback(args.host):
            raise RewardError(f"--host {args.host} is reachable from other machines: set {TOKEN_ENV} or "
                              "--token-file, so that only holders of the token can score")
        if "=" in args.reward:
            raise RewardError("--reward names a local reward (registry name or dotted path), not NAME=URL")
        name, _ = parse_spec(args.reward)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        reward = load_rewards([name], {name: args.reward_path} if args.reward_path else None,
                              device=args.device, dtype=dtype).rewards[name]
    except RewardError as e:
        sys.exit(f"error: {e}")
    import uvicorn

    kind = "groupwise" if getattr(reward, "groupwise", False) else "pointwise"
    print(f"serving {kind} reward {name!r} on http://{args.host}:{args.port} "
          f"(token {'required' if token else 'off: loopback only'})", flush=True)
    uvicorn.run(build_app(reward, name, token, args.max_request_mb, args.threads, args.timeout), host=args.host,
                port=args.port, http=timed_protocol(args.timeout), log_level="warning")


if __name__ == "__main__":
    main()
