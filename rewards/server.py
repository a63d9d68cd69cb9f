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
or --token-file: never a flag value, which ps and logs would show), and then every request must carry it.
"""
import argparse
import asyncio
import contextlib
import hmac
import ipaddress
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


def score_in_batches(reward, name: str, images, prompts, metadata, lock=contextlib.nullcontext()) -> torch.Tensor:
    """The reward's raw scores, in chunks of its batch_size; shape and values unchecked (the client checks them,
    through RewardSet.score, exactly as for a local reward)."""
    n = batch_size(reward) or len(prompts)
    with lock, torch.no_grad():
        return concat_scores([torch.as_tensor(reward(images[i:i + n], prompts[i:i + n], metadata[i:i + n]))
                              .detach().float().cpu() for i in range(0, len(prompts), n)], name)


def build_app(reward, name: str, token: str | None = None, max_request_mb: float = 256, threads: int = 4):
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
        """The body, or None past the bound: refused from Content-Length before reading, else while reading."""
        try:
            if int(request.headers.get("content-length", 0)) > limit:
                return None
        except ValueError:
            return None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    def score(body: bytes) -> bytes:
        workdir = tempfile.mkdtemp(prefix="reward-server-")  # the request's condition images, as files
        try:
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
            if body is None:
                return error(413, f"request body over {max_request_mb:g} MB (the server's --max-request-mb)")
            try:  # off the event loop: other requests (and /health) are served meanwhile
                return Response(await asyncio.get_running_loop().run_in_executor(pool, fn, body),
                                media_type=MEDIA_TYPE)
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
    p.add_argument("--token-file", help=f"file holding the token (else ${TOKEN_ENV}, else ${TOKEN_ENV}_FILE)")
    args = p.parse_args(argv)
    if args.threads < 1 or not args.max_request_mb > 0:
        p.error("--threads must be >= 1 and --max-request-mb > 0")
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
    uvicorn.run(build_app(reward, name, token, args.max_request_mb, args.threads), host=args.host, port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
