"""VLM judge: a vision-language model behind any OpenAI-compatible chat endpoint (vLLM, SGLang, `transformers serve`)
judges each image against its prompt.

Each image is resized (default 512x512, the size UnifiedReward's judges are given), sent as a PNG data URL with the
template's text ({prompt} replaced by the sample's prompt) to POST URL/v1/chat/completions at temperature 0:
  mode=yes (default): one answer token with its top 20 log-probabilities; score = P(Yes) / (P(Yes) + P(No)), each
    side summed over its spellings (" Yes", "yes", "YES", ...), in [0, 1]. Neither among the 20 stops the run with a
    RewardError: the template asks no yes/no question, which a default score would hide. The server must return
    logprobs (vLLM, SGLang do; transformers serve ignores them: use mode=number there).
  mode=number: the last match of `regex` in the answer, divided by `max_score`; an answer without a match scores
    `no_match` (default 0, as UnifiedReward's reference code) and is reported on stderr.
Requests go out `concurrency` (default 16) at once. Videos: each frame the reward receives (the run's
--reward-frame-stride) is judged alone, one request each; a video scores their mean.

The URL: `--reward-paths vlm=URL` (rewards.server, `python -m rewards score`: `--reward-path URL`), else
$FLOW_RL_VLM_URL; a trailing /v1 is dropped. Each option comes from the URL's query (?mode=number&size=448), else from
$FLOW_RL_VLM_<OPTION> (FLOW_RL_VLM_MODE=number). The token, timeouts, retries and error lines are the remote rewards'
(rewards.remote): the token from ?token_file=, else $FLOW_RL_REWARD_TOKEN, else the file $FLOW_RL_REWARD_TOKEN_FILE,
sent as a bearer token (vLLM's and SGLang's --api-key). The endpoint is checked when the reward is built: GET
URL/v1/models must list the model (or list one model, taken when `model` is unset).
"""
import json
import math
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qsl, urlencode, urlsplit

import torch
from PIL import Image

from rewards.base import RewardError, over_frames
from rewards.remote import OPTIONS as TRANSPORT
from rewards.remote import TOKEN_ENV, TOKEN_FILE_ENV, RemoteReward, png_b64, one_line, to_uint8

URL_ENV = "FLOW_RL_VLM_URL"
TEMPLATES = {
    "yes": 'Does this image match the description "{prompt}"? Answer Yes or No.',
    "number": 'Rate how well this image matches the description "{prompt}" and how good it looks, from 1 (poor) '
              "to 5 (excellent). Give a short reason, then end with the line: Final Score: <1-5>",
}
OPTIONS = {"model": None, "mode": "yes", "template": None, "size": "512", "regex": r"Final Score:\s*([0-9.]+)",
           "max_score": "5", "no_match": "0", "max_tokens": "1024", "concurrency": "16"}
TOP_LOGPROBS = 20  # the most OpenAI's API (and vLLM's default --max-logprobs) allows


def _logsumexp(values: list[float]) -> float:
    m = max(values, default=-math.inf)
    return m if m == -math.inf else m + math.log(sum(math.exp(v - m) for v in values))


def p_yes(top: list[dict]) -> float | None:
    """P(Yes) / (P(Yes) + P(No)) from the first token's top log-probabilities [{token, logprob}], each side summed
    over its spellings (case, surrounding spaces, a byte-level BPE's Ġ or SentencePiece's ▁); None when neither is
    there. Computed from log-probabilities (a sigmoid of their difference), so tiny probabilities do not underflow."""
    sides = {"yes": [], "no": []}
    for t in top:
        key = str(t.get("token", "")).strip().lstrip("Ġ▁").strip().lower()
        if key in sides:
            sides[key].append(float(t["logprob"]))
    if not (sides["yes"] or sides["no"]):
        return None
    d = _logsumexp(sides["yes"]) - _logsumexp(sides["no"])
    return 1 / (1 + math.exp(-d)) if d >= 0 else math.exp(d) / (1 + math.exp(d))


class VlmJudge(RemoteReward):
    """RemoteReward's HTTP client (token, retries with backoff on 5xx/429/connection errors, 4xx at once, one-line
    errors naming the reward and the URL), speaking the OpenAI chat API instead of flow-rl-reward/1."""

    name = "vlm"
    thread_safe = True  # HTTP calls only: concurrent calls go out side by side

    def __init__(self, path=None, device="cpu", dtype=torch.float32):
        """path: the endpoint's URL (else $FLOW_RL_VLM_URL); device, dtype: unused (the judge runs on its server)."""
        url = path or os.environ.get(URL_ENV)
        if not url:
            raise RewardError(f"reward 'vlm' needs the judge's URL: --reward-paths vlm=http://HOST:PORT "
                              f"(rewards.server: --reward-path URL) or {URL_ENV}")
        parts = urlsplit(url)
        try:
            parts.port
        except ValueError:
            raise RewardError(f"reward 'vlm': bad port in URL {url!r}; the reward's weight goes in --reward vlm:W") \
                from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RewardError(f"reward 'vlm': bad URL {url!r}; expected http://HOST:PORT")
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        opts, transport = {}, {}
        for key, default in {**OPTIONS, **TRANSPORT}.items():
            value = query.pop(key, None) or os.environ.get(f"FLOW_RL_VLM_{key.upper()}") or default
            (opts if key in OPTIONS else transport)[key] = value
        transport = {k: v for k, v in transport.items() if v is not None}
        self._configure(opts, url, list(query))  # before the endpoint check, which needs the model
        base = f"{parts.scheme}://{parts.netloc}{re.sub(r'/v1/?$', '', parts.path.rstrip('/'))}"
        super().__init__(f"vlm={base}" + (f"?{urlencode(transport)}" if transport else ""))  # checks the endpoint
        self.pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="vlm")

    def _configure(self, opts: dict, url: str, unknown: list):
        def bad(key, why):
            return RewardError(f"reward 'vlm': option {key}={opts[key]!r} {why}")

        if "token" in unknown:
            raise RewardError(f"reward 'vlm': never put the token in the URL (it is saved to config.json); use "
                              f"{TOKEN_ENV}, {TOKEN_FILE_ENV} or ?token_file=PATH")
        if unknown:
            raise RewardError(f"reward 'vlm': unknown option {unknown[0]!r} in {url!r}; known: "
                              f"{', '.join([*OPTIONS, *TRANSPORT])}")
        if opts["mode"] not in TEMPLATES:
            raise bad("mode", "is neither yes nor number")
        self.mode, self.model = opts["mode"], opts["model"]
        if opts["template"]:
            try:
                with open(opts["template"]) as f:
                    self.template = f.read().strip()
            except OSError as e:
                raise bad("template", f"cannot be read: {e.strerror}") from None
            if not self.template:
                raise bad("template", "is an empty file")
        else:
            self.template = TEMPLATES[self.mode]
        size = re.fullmatch(r"(\d+)(?:x(\d+))?", opts["size"])
        if size is None:
            raise bad("size", "is not N (N x N pixels), WxH, or 0 (the image's own size)")
        w, h = int(size[1]), int(size[2] or size[1])
        self.size = (w, h) if w and h else None
        try:
            self.regex = re.compile(opts["regex"])
        except re.error as e:
            raise bad("regex", f"is not a regular expression ({e})") from None
        try:
            self.max_score, self.no_match = float(opts["max_score"]), float(opts["no_match"])
            self.max_tokens, self.concurrency = int(opts["max_tokens"]), int(opts["concurrency"])
        except ValueError as e:
            raise RewardError(f"reward 'vlm': {e} (options max_score, no_match: numbers; max_tokens, concurrency: "
                              "integers)") from None
        if not (math.isfinite(self.max_score) and self.max_score > 0 and math.isfinite(self.no_match)):
            raise RewardError("reward 'vlm': max_score must be a positive number and no_match a finite one")
        if not (self.max_tokens >= 1 and 1 <= self.concurrency <= 100):  # 100: the HTTP client's connection pool
            raise RewardError("reward 'vlm': max_tokens must be >= 1 and concurrency between 1 and 100")

    def _health(self) -> dict:
        """GET /v1/models must list the model; an unset model is the only one listed. A wrong URL fails here, before
        any training, within 30 s (at most 10 s per try), as a remote reward's health check."""
        r = self._request("GET", "/v1/models", timeout=min(self.spec.timeout, 10), max_wait=min(self.spec.max_wait, 30))
        try:
            ids = [m["id"] for m in r.json()["data"]]
        except (ValueError, KeyError, TypeError):
            raise RewardError(self._answered(r, "/v1/models", "an OpenAI model list {data: [{id}, ...]}")) from None
        if self.model is None and len(ids) == 1:
            self.model = ids[0]
        elif self.model not in ids:
            which = "no model given and " if self.model is None else f"model {self.model!r} not served; "
            raise RewardError(f"reward 'vlm': {which}{self.url}/v1/models lists {ids}; set ?model= or "
                              "FLOW_RL_VLM_MODEL to one of them")
        return {}

    def close(self):
        self.pool.shutdown(cancel_futures=True)
        super().close()

    def request_body(self, image: torch.Tensor, prompt: str) -> dict:
        """(3, H, W) uint8 and its prompt -> the chat completion request."""
        im = Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB")
        if self.size and im.size != self.size:
            im = im.resize(self.size, Image.Resampling.BICUBIC)
        content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + png_b64(im)}},
                   {"type": "text", "text": self.template.replace("{prompt}", prompt)}]  # other braces stay as written
        body = {"model": self.model, "messages": [{"role": "user", "content": content}], "temperature": 0}
        if self.mode == "yes":
            return {**body, "max_tokens": 1, "logprobs": True, "top_logprobs": TOP_LOGPROBS}
        return {**body, "max_tokens": self.max_tokens}

    def judge(self, image: torch.Tensor, prompt: str) -> tuple[float, str | None]:
        """One image's score, and the answer when it held no number (mode=number)."""
        path = "/v1/chat/completions"
        r = self._request("POST", path, json.dumps(self.request_body(image, prompt)).encode(), "application/json")
        try:
            choice = r.json()["choices"][0]
            if self.mode == "number":
                answer = choice["message"]["content"] or ""
                if not isinstance(answer, str):
                    raise TypeError
            elif choice.get("logprobs") is None:
                top = None
            else:
                first = choice["logprobs"]["content"][0]
                top = first.get("top_logprobs") or [first]
                p = p_yes(top)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            what = "a chat completion with the first token's logprobs" if self.mode == "yes" else "a chat completion"
            raise RewardError(self._answered(r, path, what)) from None
        if self.mode == "yes":
            if top is None:
                raise RewardError(f"reward 'vlm': {self.url}{path} answered without logprobs (transformers serve "
                                  "ignores them); use mode=number, or a server that returns them (vLLM, SGLang)")
            if p is None:
                seen = [t.get("token") for t in top[:5]]
                raise RewardError(f"reward 'vlm': {self.url}{path}: for prompt {prompt!r} the first answer token was "
                                  f"neither Yes nor No among the top {len(top)} (most likely: {seen}); ask a yes/no "
                                  "question in the template, or use mode=number")
            return p, None
        found = self.regex.findall(answer)
        try:  # a regex with groups finds its first group, one without the whole match
            value = float(found[-1][0] if isinstance(found[-1], tuple) else found[-1]) if found else math.nan
        except ValueError:
            value = math.nan
        return (value / self.max_score, None) if math.isfinite(value) else (self.no_match, answer)

    def score_images(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        futures = [self.pool.submit(self.judge, x, p) for x, p in zip(to_uint8(images), prompts)]
        try:
            out = [f.result() for f in futures]
        except BaseException:  # the first failure is the call's; what is still queued is not sent
            for f in futures:
                f.cancel()
            raise
        missed = [a for _, a in out if a is not None]
        if missed:
            print(f"warning: reward 'vlm': {len(missed)} of {len(out)} answer(s) had no match for "
                  f"{self.regex.pattern!r}, scored {self.no_match:g}; first: {one_line(missed[0])[:120]!r}",
                  file=sys.stderr, flush=True)
        return torch.tensor([s for s, _ in out], dtype=torch.float32)

    def __call__(self, images, prompts, metadata):
        return over_frames(self.score_images, images, prompts)
