"""Remote rewards: a reward scored over HTTP by `python -m rewards.server` or by a reference-project /compute server.

Spec: NAME=URL[:WEIGHT]. NAME is the reward's name in metrics; the weight follows the URL's port, so a weighted
spec names the port: `remote=http://127.0.0.1:8000:0.5`. A URL path ending in /compute speaks the reference
project's JSON protocol (POST /compute, GET /health); any other URL speaks ours (GET /health, POST /score,
POST /group_transform). Options go in the query, never a secret: ?timeout=S (per request, default 120),
?max_wait=S (all attempts of one call together, default 300), ?token_file=PATH. The token comes from token_file,
else FLOW_RL_REWARD_TOKEN, else the file named by FLOW_RL_REWARD_TOKEN_FILE; it is sent as a bearer token.

Our body format, both directions: safetensors (raw little-endian arrays with a JSON header, no pickle). Images
travel as uint8 (B,3,H,W) / (B,F,3,H,W), rounded as the PNG samples and jpeg reward do; the JSON header holds the
prompts and the metadata's JSON values; condition images travel as their files' bytes and decoded data videos
(metadata["video_frames"]) as uint8 frames. The server rebuilds metadata["images"] as paths to those files.
"""
import base64
import io
import json
import math
import os
import re
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from rewards.base import Reward, RewardError
from rewards.images import to_rgb8

PROTOCOL = "flow-rl-reward/1"
MEDIA_TYPE = "application/vnd.flow-rl-reward+safetensors"
TOKEN_ENV, TOKEN_FILE_ENV = "FLOW_RL_REWARD_TOKEN", "FLOW_RL_REWARD_TOKEN_FILE"
OPTIONS = {"timeout": 120.0, "max_wait": 300.0, "token_file": None}
SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,8}")  # condition file suffixes the server accepts (no path parts)


def one_line(text) -> str:
    return " ".join(str(text).split())


# ---- spec ----

@dataclass
class RemoteSpec:
    name: str
    url: str  # base URL, without /compute and without the query
    compute: bool  # the reference project's /compute protocol
    weight: float
    timeout: float
    max_wait: float
    token_file: str | None


def _port(url: str):
    try:
        parts = urlsplit(url)
        return parts.port if parts.scheme in ("http", "https") else None
    except ValueError:
        return None


def parse_remote(spec: str) -> RemoteSpec:
    """'NAME=URL[:WEIGHT]' -> RemoteSpec; raises RewardError (one line) on anything malformed."""
    name, _, rest = spec.strip().partition("=")
    if not re.fullmatch(r"[A-Za-z_][\w-]*", name):
        raise RewardError(f"bad remote reward name {name!r} in spec {spec!r}; expected NAME=URL[:WEIGHT] "
                          "with NAME of letters, digits, _ or -")
    url, weight = rest, 1.0
    head, _, tail = rest.rpartition(":")
    if _port(head) is not None:  # a number after the port is the weight
        try:
            url, weight = head, float(tail)
        except ValueError:
            pass
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RewardError(f"bad reward URL {url!r} in spec {spec!r}; expected NAME=http://HOST:PORT[:WEIGHT]")
    if _port(url) is None and ":" in parts.netloc.rsplit("]", 1)[-1]:
        raise RewardError(f"bad port in reward URL {url!r} (spec {spec!r}); a weight follows the port: "
                          "NAME=http://HOST:PORT:WEIGHT")
    if parts.username or parts.password:
        raise RewardError(f"reward {name!r}: no credentials in the URL (specs are saved to config.json); "
                          f"put the token in {TOKEN_ENV} or a token file")
    if not math.isfinite(weight):
        raise RewardError(f"bad weight {tail!r} in reward spec {spec!r}; the weight must be finite")
    opts = dict(OPTIONS)
    for key, values in parse_qs(parts.query, keep_blank_values=True).items():
        if key == "token":
            raise RewardError(f"reward {name!r}: never put the token in the spec (it is saved to config.json); "
                              f"use {TOKEN_ENV}, {TOKEN_FILE_ENV} or ?token_file=PATH")
        if key not in OPTIONS:
            raise RewardError(f"reward {name!r}: unknown option {key!r} in {url!r}; known: {', '.join(OPTIONS)}")
        opts[key] = values[-1]
    for key in ("timeout", "max_wait"):
        try:
            value = float(opts[key])
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise RewardError(f"reward {name!r}: {key} must be a positive number of seconds, got {opts[key]!r}")
        opts[key] = value
    path = parts.path.rstrip("/")
    compute = path.endswith("/compute")
    base = f"{parts.scheme}://{parts.netloc}{path[:-len('/compute')] if compute else path}"
    return RemoteSpec(name, base, compute, weight, opts["timeout"], opts["max_wait"], opts["token_file"])


def read_token(token_file: str | None = None) -> str | None:
    """The token: from token_file, else $FLOW_RL_REWARD_TOKEN, else the file $FLOW_RL_REWARD_TOKEN_FILE."""
    path = token_file or (None if os.environ.get(TOKEN_ENV) else os.environ.get(TOKEN_FILE_ENV))
    if path:
        try:
            with open(path) as f:
                token = f.read().strip()
        except OSError as e:
            raise RewardError(f"cannot read the reward token file {path!r}: {e.strerror}") from None
        if not token:
            raise RewardError(f"the reward token file {path!r} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


# ---- body format: safetensors with a JSON header, both directions ----

def encode(tensors: dict, header: dict | None = None) -> bytes:
    return st_save({k: v.contiguous() for k, v in tensors.items()}, metadata={"json": json.dumps(header or {})})


def decode(body: bytes) -> tuple[dict, dict]:
    try:
        n = int.from_bytes(body[:8], "little")
        meta = json.loads(body[8:8 + n]).get("__metadata__") or {}
        return st_load(body), json.loads(meta.get("json", "{}"))
    except Exception as e:  # malformed bytes: safetensors, JSON or unicode errors
        raise RewardError(f"bad body (expected safetensors): {one_line(e)}") from None


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> uint8, rounded as rewards.jpeg and the PNG samples do (clamp(0, 1) * 255, round)."""
    y = x.detach().float().mul(255)  # one copy, then in place (most of a call's transport cost); on x's device
    return y.round_().clamp_(0, 255).to(torch.uint8).cpu()


def _jsonable(v) -> bool:
    try:
        json.dumps(v, allow_nan=False)
        return True
    except (TypeError, ValueError):
        return False


def encode_score_request(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> bytes:
    """The body of POST /score. Metadata values that JSON cannot hold are dropped, except "images" (sent as the
    files' bytes) and "video_frames" (sent as uint8 frames with their fps)."""
    tensors, rows, files, fps = {"images": to_uint8(images)}, [], [], []
    for i, m in enumerate(metadata):
        rows.append({k: v for k, v in m.items() if k not in ("images", "video_frames") and _jsonable(v)})
        files.append(None if "images" not in m else [os.path.splitext(p)[1] for p in m["images"]])
        for j, p in enumerate(m.get("images") or []):
            try:
                with open(p, "rb") as f:
                    tensors[f"cond.{i}.{j}"] = torch.from_numpy(np.frombuffer(f.read(), np.uint8).copy())
            except OSError as e:
                raise RewardError(f"cannot read condition image {p!r} to send it: {e.strerror}") from None
        fps.append(None if "video_frames" not in m else [float(r) for _, r in m["video_frames"]])
        for j, (frames, _) in enumerate(m.get("video_frames") or []):
            tensors[f"video.{i}.{j}"] = to_uint8(frames)
    return encode(tensors, {"prompts": list(prompts), "metadata": rows, "files": files, "fps": fps})


def decode_score_request(body: bytes, workdir: str):
    """Server side of encode_score_request -> (images in [0, 1], prompts, metadata); condition files land in
    workdir, which the caller removes after scoring."""
    tensors, h = decode(body)
    images = tensors.get("images")
    if images is None or images.dtype != torch.uint8 or images.dim() not in (4, 5) or images.shape[-3] != 3:
        raise RewardError("bad /score body: expected uint8 'images' of shape (B,3,H,W) or (B,F,3,H,W)")
    prompts, rows = h.get("prompts"), h.get("metadata")
    if not (isinstance(prompts, list) and isinstance(rows, list) and len(rows) == len(prompts)):
        raise RewardError("bad /score body: 'prompts' and 'metadata' must be lists of equal length")
    try:
        for i, row in enumerate(rows):
            if h["files"][i] is not None:
                row["images"] = []
                for j, suffix in enumerate(h["files"][i]):
                    path = os.path.join(workdir, f"cond_{i}_{j}{suffix if SUFFIX.fullmatch(suffix) else ''}")
                    with open(path, "wb") as f:
                        f.write(tensors[f"cond.{i}.{j}"].numpy().tobytes())
                    row["images"].append(path)
            if h["fps"][i] is not None:
                row["video_frames"] = [(tensors[f"video.{i}.{j}"].float().div_(255), r)
                                       for j, r in enumerate(h["fps"][i])]
    except (KeyError, IndexError, TypeError, AttributeError) as e:
        raise RewardError(f"bad /score body: inconsistent condition images or videos "
                          f"({type(e).__name__}: {e})") from None
    return images.float().div_(255), prompts, rows


# ---- the reference project's /compute JSON protocol ----

def png_b64(image) -> str:
    """(3, H, W) uint8 tensor or a PIL image -> base64 PNG."""
    if isinstance(image, torch.Tensor):
        image = Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _rgb8(path):
    with Image.open(path) as im:
        return to_rgb8(im)  # 16-bit, palette, CMYK: as the run itself reads them (Pillow's convert whitens 16-bit)


def compute_payload(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> dict:
    """{prompt, image: [b64 PNG] | None, video: [[b64 PNG per frame]] | None, condition_images, condition_videos}."""
    u8 = to_uint8(images)
    cond = [[png_b64(_rgb8(p)) for p in m.get("images") or []] for m in metadata]
    cond_v = [[[png_b64(f) for f in to_uint8(frames)] for frames, _ in m.get("video_frames") or []]
              for m in metadata]
    return {"prompt": list(prompts),
            "image": [png_b64(x) for x in u8] if u8.dim() == 4 else None,
            "video": [[png_b64(f) for f in v] for v in u8] if u8.dim() == 5 else None,
            "condition_images": cond if any(cond) else None,
            "condition_videos": cond_v if any(cond_v) else None}


# ---- the client ----

def concat_scores(chunks: list, name: str) -> torch.Tensor:
    """Scores of consecutive chunks -> one tensor, whatever their shape (RewardSet.score then checks it)."""
    if len(chunks) == 1:
        return chunks[0]
    try:
        return torch.cat([torch.atleast_1d(c) for c in chunks])
    except RuntimeError:
        raise RewardError(f"reward {name!r} returned scores of shapes {[tuple(c.shape) for c in chunks]} "
                          "for consecutive batches; expected (batch,) each") from None


class RemoteReward(Reward):
    """A reward scored by a server, health-checked when built. RewardSet.score validates its scores like any
    reward's (shape, NaN/inf). Failures raise RewardError; a score is never replaced by a default."""

    thread_safe = True  # one httpx.Client, which threads may share: RewardSet takes no lock around this reward

    def __init__(self, spec: str):
        import httpx  # only runs with remote rewards need the HTTP client

        self.httpx, self.spec = httpx, parse_remote(spec)
        self.name, self.url = self.spec.name, self.spec.url
        token = read_token(self.spec.token_file)
        self.client = httpx.Client(headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            info = self._health()
        except RewardError:
            self.client.close()
            raise
        self.groupwise = info.get("kind") == "groupwise"
        self.server_name, self.batch_size = info.get("name", "compute"), info.get("batch_size")
        self.max_request_bytes = int((info.get("max_request_mb") or 0) * 2**20)

    def _health(self) -> dict:
        # at start-up a wrong URL should fail fast: at most 10 s per try and 30 s in all
        r = self._request("GET", "/health", timeout=min(self.spec.timeout, 10), max_wait=min(self.spec.max_wait, 30))
        if self.spec.compute:  # a /compute server's health answer is free-form: any 2xx will do
            return {}
        try:
            info = r.json()
        except ValueError:
            info = None
        if not isinstance(info, dict) or info.get("protocol") != PROTOCOL:
            raise RewardError(self._answered(r, "/health", f"{PROTOCOL} JSON") + "; for a reference-project server "
                              "end the URL with /compute")
        return info

    def close(self):
        self.client.close()

    def _request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
                 timeout: float | None = None, max_wait: float | None = None):
        """One call with retries: connection errors, timeouts, 429 and 5xx are retried with exponential backoff
        while the call's max_wait seconds last (each attempt gets at most timeout seconds of them); 401, 403,
        413 and the other 4xx fail at once."""
        url, name = self.url + path, self.name
        timeout, max_wait = timeout or self.spec.timeout, max_wait or self.spec.max_wait
        start = time.monotonic()
        deadline, delay, attempt = start + max_wait, 0.25, 0
        headers = {"Content-Type": content_type} if content_type else {}
        while True:
            attempt += 1
            try:
                r = self.client.request(method, url, content=body, headers=headers,
                                        timeout=max(0.05, min(timeout, deadline - time.monotonic())))
            except self.httpx.TransportError as e:  # refused, reset, timed out: the server may come back
                last = f"{type(e).__name__}: {one_line(e) or 'no detail'}"
            else:
                if r.status_code < 400:
                    return r
                try:
                    msg = one_line(r.json().get("error", r.text))[:300]
                except (ValueError, AttributeError):
                    msg = one_line(r.text)[:300]
                if r.status_code in (401, 403):
                    raise RewardError(f"reward {name!r}: bad token for {url} ({r.status_code}: {msg}); give the "
                                      f"server's token in {TOKEN_ENV}, {TOKEN_FILE_ENV} or ?token_file=PATH")
                if r.status_code == 413:
                    raise RewardError(f"reward {name!r}: {url} refused a {len(body or b'') / 2**20:.1f} MB request "
                                      f"as too large (413: {msg}); raise the server's --max-request-mb")
                if r.status_code != 429 and r.status_code < 500:
                    raise RewardError(f"reward {name!r}: {url} answered {r.status_code}: {msg}")
                last = f"HTTP {r.status_code}: {msg}"
            if time.monotonic() + delay >= deadline:
                raise RewardError(f"reward {name!r}: {url} failed {attempt} attempt(s) in "
                                  f"{time.monotonic() - start:.1f} s (timeout {timeout:g} s, max_wait "
                                  f"{max_wait:g} s); last error: {last}")
            time.sleep(delay)
            delay = min(2 * delay, 30.0)

    def _answered(self, r, path, expected) -> str:
        """What a 2xx answer that is not the protocol's was: the reward, the URL, the status and the content type
        (an HTML page from a proxy or a login wall answers 200 too)."""
        kind = r.headers.get("content-type", "no content type")
        return (f"reward {self.name!r}: {self.url}{path} answered {r.status_code} with {kind} "
                f"({len(r.content)} bytes: {one_line(r.text)[:80]!r}), expected {expected}")

    def _post(self, path: str, body: bytes) -> torch.Tensor:
        r = self._request("POST", path, body, MEDIA_TYPE)
        try:
            tensors, _ = decode(r.content)
        except RewardError:
            raise RewardError(self._answered(r, path, MEDIA_TYPE)) from None
        if "scores" not in tensors:
            raise RewardError(f"reward {self.name!r}: {self.url}{path} answered without 'scores'")
        return tensors["scores"]

    def __call__(self, images, prompts, metadata):
        if len(prompts) == 0:
            return torch.zeros(0)
        if self.spec.compute:
            body = json.dumps(compute_payload(images, prompts, metadata)).encode()
            r = self._request("POST", "/compute", body, "application/json")
            try:
                out = r.json()
            except ValueError:
                raise RewardError(self._answered(r, "/compute", "JSON {rewards: [...]}")) from None
            if not isinstance(out, dict) or out.get("error") or not isinstance(out.get("rewards"), list):
                raise RewardError(f"reward {self.name!r}: {self.url}/compute answered {one_line(out)[:200]} "
                                  "instead of {rewards: [...]}")
            try:  # null (how some JSON encoders write NaN) stays NaN, so RewardSet.score names it
                return torch.tensor([math.nan if v is None else v for v in out["rewards"]], dtype=torch.float32)
            except (TypeError, ValueError):
                raise RewardError(f"reward {self.name!r}: {self.url}/compute answered non-numeric rewards "
                                  f"{one_line(out['rewards'])[:100]}") from None
        # split a call so that each request fits the server's bound (3/4 of it, for the condition files)
        per = max(1, images[0].numel())  # uint8 bytes of one sample
        n = max(1, self.max_request_bytes * 3 // 4 // per) if self.max_request_bytes else len(prompts)
        return concat_scores([self._post("/score", encode_score_request(images[i:i + n], prompts[i:i + n],
                                                                          metadata[i:i + n]))
                              for i in range(0, len(prompts), n)], self.name)

    def group_transform(self, scores: torch.Tensor) -> torch.Tensor:
        if not self.groupwise:
            return scores
        s = torch.as_tensor(scores).detach().float().cpu()
        out = self._post("/group_transform", encode({"scores": s})).float()
        if out.shape != s.shape or not torch.isfinite(out).all():
            raise RewardError(f"reward {self.name!r}: group_transform at {self.url} returned shape "
                              f"{tuple(out.shape)} for {tuple(s.shape)} scores, or non-finite values")
        return out
