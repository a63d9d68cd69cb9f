"""The vlm reward against an OpenAI-compatible judge written here (starlette on uvicorn, in a thread of the test
process): it lists a model at /v1/models, records every chat completion request and answers with log-probabilities
or texts the test chose. Scores are checked against P(Yes)/(P(Yes)+P(No)) and number parsing worked out here, the
requests' format (model, image as a PNG data URL of the right size, logprobs, temperature, token), retries,
timeouts, one-line errors, concurrency, videos, and a reward server serving the same scores. Then against a real
server, `transformers serve` on a tiny LLaVA built here (skipped without transformers[serving]: fastapi, openai)."""
import asyncio
import base64
import io
import math
import os
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import urlencode

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rewards import REGISTRY, RewardError, load_rewards
from rewards.vlm import VlmJudge
from tests.helpers import reward_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "judge-7b"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def logprob_answer(top: list[tuple[str, float]]) -> dict:
    """A chat completion whose one answer token is top[0], with `top` as its top log-probabilities."""
    first = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top]
    return {"object": "chat.completion", "model": MODEL, "choices": [{
        "index": 0, "message": {"role": "assistant", "content": top[0][0]}, "finish_reason": "length",
        "logprobs": {"content": [{**first[0], "top_logprobs": first}]}}]}


def text_answer(text: str) -> dict:
    return {"object": "chat.completion", "model": MODEL, "choices": [
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop", "logprobs": None}]}


def brightness_answer(image: np.ndarray, text: str) -> dict:
    """The default answer, set by the image: with b its mean pixel / 255, P(" Yes") = 0.6b + 0.01, P("yes") = 0.2b,
    P("No") = 0.5(1 - b) + 0.01, and an unrelated token."""
    b = image.mean() / 255
    return logprob_answer([("Yes", math.log(0.6 * b + 0.01)), ("No", math.log(0.5 * (1 - b) + 0.01)),
                           (" yes", math.log(0.2 * b)), ("The", math.log(0.05))])


def by_brightness(b: float) -> float:
    """brightness_answer's score, by hand."""
    yes, no = 0.6 * b + 0.01 + 0.2 * b, 0.5 * (1 - b) + 0.01
    return yes / (yes + no)


class FakeJudge:
    """State of the judge server, reset by each test: the requests it got (headers, JSON body), a token it requires
    (None: none), statuses it answers first (fail), a delay before each answer, the answer function
    (image array (H, W, 3), text) -> JSON, and the most requests it held at once."""

    def __init__(self, url):
        self.url = url
        self.reset()

    def reset(self):
        self.requests, self.token, self.fail, self.delay, self.answer = [], None, [], 0.0, brightness_answer
        self.models, self.in_flight, self.max_in_flight = [MODEL], 0, 0
        self.generation = getattr(self, "generation", 0) + 1

    def denied(self, request):
        return self.token is not None and request.headers.get("authorization") != f"Bearer {self.token}"


def serve(judge: FakeJudge, port: int) -> uvicorn.Server:
    async def models(request):
        if judge.denied(request):
            return JSONResponse({"error": "Unauthorized"}, 401)
        return JSONResponse({"object": "list", "data": [{"id": m, "object": "model"} for m in judge.models]})

    async def chat(request):
        body = await request.json()
        judge.requests.append((dict(request.headers), body))
        if judge.denied(request):
            return JSONResponse({"error": "Unauthorized"}, 401)
        if judge.fail:
            return JSONResponse({"error": {"message": "server busy", "code": judge.fail[0]}}, judge.fail.pop(0))
        generation = judge.generation  # a request of an earlier test, still sleeping, counts for none after it
        judge.in_flight += 1
        judge.max_in_flight = max(judge.max_in_flight, judge.in_flight)
        try:
            await asyncio.sleep(judge.delay)
        finally:
            judge.in_flight -= judge.generation == generation
        content = body["messages"][0]["content"]
        answer = judge.answer(decode_image(content[0]["image_url"]["url"]), content[1]["text"])
        return answer if isinstance(answer, Response) else JSONResponse(answer)

    app = Starlette(routes=[Route("/v1/models", models), Route("/v1/chat/completions", chat, methods=["POST"])])
    return uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))


def decode_image(url: str) -> np.ndarray:
    head, _, b64 = url.partition(",")
    assert head == "data:image/png;base64"
    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        return np.asarray(im).copy()


@pytest.fixture(scope="module")
def server():
    port = free_port()
    judge = FakeJudge(f"http://127.0.0.1:{port}")
    srv = serve(judge, port)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the judge server did not start"
        time.sleep(0.02)
    yield judge
    srv.should_exit = True
    thread.join(5)


@pytest.fixture
def clean_env(monkeypatch):
    """No FLOW_RL_VLM_* or token variable of the caller's environment leaks in."""
    for key in list(os.environ):
        if key.startswith("FLOW_RL_VLM_") or key.startswith("FLOW_RL_REWARD_TOKEN"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("FLOW_RL_VLM_MAX_WAIT", "10")  # a server's bug (500) fails a test in seconds, not 300 s


@pytest.fixture
def judge(server, clean_env):
    """The judge, reset."""
    server.reset()
    return server


@pytest.fixture
def build(judge):
    """build(**options) -> a VlmJudge on the judge's URL with those query options, closed after the test."""
    built = []

    def make(**options):
        built.append(VlmJudge(judge.url + (f"?{urlencode(options)}" if options else "")))
        return built[-1]

    yield make
    for reward in built:
        reward.close()


def one_line(fn, *args, match, **kwargs):
    with pytest.raises(RewardError, match=match) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


def constant(*values, size=(32, 32)) -> torch.Tensor:
    """(B, 3, H, W) images, each of one uint8 gray level."""
    return torch.stack([torch.full((3, *size), v / 255) for v in values])


def u8_images(*shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).float() / 255


# ---- scores ----

# per prompt, the first token's top log-probabilities, and P(Yes)/(P(Yes)+P(No)) by hand (plain exp sums)
YES_CASES = {
    "a cat": ([(" Yes", -0.3), ("yes", -2.0), ("No", -1.5), (" NO", -3.0), ("Maybe", -4.0)],
              (math.exp(-0.3) + math.exp(-2.0)) / (math.exp(-0.3) + math.exp(-2.0) + math.exp(-1.5) + math.exp(-3.0))),
    "a dog": ([("No", -0.05), ("Yes", -3.2)], math.exp(-3.2) / (math.exp(-3.2) + math.exp(-0.05))),
    "yes only": ([("Yes", -0.01), ("Sure", -5.0)], 1.0),
    "no only": ([("no", -0.2), ("Nope", -2.0)], 0.0),
    "raw tokens": ([("ĠYes", -1.0), ("▁No", -1.0), ("YES ", -1.0)], 2 / 3),
    "tiny": ([("Yes", -800.0), ("No", -801.0), ("The", -0.01)], 1 / (1 + math.exp(-1.0))),  # no underflow
}


def prompt_of(text: str) -> str:
    return text.split('"')[1]  # the default templates quote the prompt


def test_yes_mode_scores_and_request_format(judge, build, monkeypatch):
    assert REGISTRY["vlm"] == "rewards.vlm:VlmJudge" and VlmJudge.thread_safe
    judge.answer = lambda image, text: logprob_answer(YES_CASES[prompt_of(text)][0])
    judge.token = "s3cret"
    monkeypatch.setenv("FLOW_RL_REWARD_TOKEN", "s3cret")
    monkeypatch.setenv("FLOW_RL_VLM_URL", judge.url + "/v1")  # the OpenAI base URL form works too
    rs = load_rewards(["vlm"])
    prompts = list(YES_CASES)
    s = rs.score(constant(*range(10, 10 + len(prompts))), prompts, [{}] * len(prompts))["vlm"]
    assert s.dtype == torch.float32 and s.tolist() == pytest.approx([w for _, w in YES_CASES.values()], abs=1e-7)
    assert len(judge.requests) == len(prompts)
    level = dict(zip(prompts, range(10, 100)))
    for headers, body in judge.requests:  # in any order: they are sent side by side
        prompt = prompt_of(body["messages"][0]["content"][1]["text"])
        assert headers["authorization"] == "Bearer s3cret" and headers["content-type"] == "application/json"
        assert {k: body[k] for k in body if k != "messages"} == {
            "model": MODEL, "temperature": 0, "max_tokens": 1, "logprobs": True, "top_logprobs": 20}
        (message,) = body["messages"]
        assert message["role"] == "user" and [c["type"] for c in message["content"]] == ["image_url", "text"]
        image = decode_image(message["content"][0]["image_url"]["url"])
        # 32x32 resized to 512x512, its gray level kept
        assert image.shape == (512, 512, 3) and (image == level.pop(prompt)).all()
    rs.rewards["vlm"].close()


def test_neither_yes_nor_no_is_one_line_naming_the_prompt(judge, build):
    judge.answer = lambda image, text: logprob_answer([("The", -0.1), ("A", -2.0)])
    msg = one_line(build(), constant(100), ["a red bus"], [{}],
                   match=r"reward 'vlm': http://127\.0\.0\.1:\d+/v1/chat/completions: for prompt 'a red bus' the "
                         r"first answer token was neither Yes nor No among the top 2")
    assert "['The', 'A']" in msg and "mode=number" in msg
    judge.answer = lambda image, text: text_answer("Yes")  # a server that ignores logprobs
    one_line(build(), constant(100), ["a red bus"], [{}],
             match=r"reward 'vlm': http://127\.0\.0\.1:\d+/v1/chat/completions answered without logprobs")
    judge.answer = lambda image, text: {"choices": []}  # not a chat completion
    one_line(build(), constant(100), ["a red bus"], [{}],
             match=r"answered 200 with application/json .*expected a chat completion with the first token's logprobs")


def test_image_sizes_sent(judge, build):
    x = u8_images(1, 3, 24, 40)
    build(size="0")(x, ["a"], [{}])  # the image's own size: its pixels exactly
    sent = decode_image(judge.requests[-1][1]["messages"][0]["content"][0]["image_url"]["url"])
    assert np.array_equal(sent, (x[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    build(size="64x48")(x, ["a"], [{}])
    assert decode_image(judge.requests[-1][1]["messages"][0]["content"][0]["image_url"]["url"]).shape == (48, 64, 3)
    one_line(build, size="big", match=r"reward 'vlm': option size='big' is not N")  # before the endpoint is asked
    assert len(judge.requests) == 2


# per prompt: the judge's answer and the score by hand (the last "Final Score: N", / 5; no match: 0)
NUMBER_CASES = {
    "p1": ("Balanced composition, sharp.\nFinal Score: 4.5", 4.5 / 5),
    "p2": ("Final Score:3", 3 / 5),
    "p3": ("First guess Final Score: 2, but on reflection:\nFinal Score: 4", 4 / 5),
    "p4": ("A nice picture, no verdict.", 0.0),
    "p5": ("Final Score: 4.2.1", 0.0),  # not a number: no match
}


def test_number_mode(judge, build, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("FLOW_RL_VLM_MODE", "number")
    judge.answer = lambda image, text: text_answer(NUMBER_CASES[prompt_of(text)][0])
    reward = build()
    s = reward(constant(1, 2, 3, 4, 5), list(NUMBER_CASES), [{}] * 5)
    assert s.tolist() == pytest.approx([w for _, w in NUMBER_CASES.values()], abs=1e-7)
    assert "warning: reward 'vlm': 2 of 5 answer(s) had no match" in capsys.readouterr().err
    body = judge.requests[0][1]
    assert body["max_tokens"] == 1024 and body["temperature"] == 0 and "logprobs" not in body
    # a template file (other braces stay as written), a regex of one's own, a max, a no-match score
    (tmp_path / "t.txt").write_text('Judge "{prompt}" as JSON {"score": N} and <Score>N</Score>\n')
    judge.answer = lambda image, text: text_answer("<Score>7</Score>" if "cat" in text else "{}")
    reward = build(template=str(tmp_path / "t.txt"), regex=r"<Score>(\d+)</Score>", max_score=10, no_match=0.25,
                   max_tokens=64, model=MODEL)
    assert reward(constant(1, 2), ["a cat", "a dog"], [{}] * 2).tolist() == pytest.approx([0.7, 0.25])
    texts = {body["messages"][0]["content"][1]["text"] for _, body in judge.requests[-2:]}
    assert texts == {f'Judge "{p}" as JSON {{"score": N}} and <Score>N</Score>' for p in ("a cat", "a dog")}
    assert judge.requests[-1][1]["max_tokens"] == 64


def test_videos_are_the_mean_over_the_judged_frames(judge, monkeypatch):
    monkeypatch.setenv("FLOW_RL_VLM_URL", judge.url)
    rs = load_rewards(["vlm"], frame_stride=2)  # registry rewards see every 2nd frame
    levels = [[20, 90, 200, 30], [250, 0, 128, 0]]
    x = torch.stack([constant(*v, size=(16, 24)) for v in levels])  # (2, 4, 3, 16, 24)
    s = rs.score(x, ["a", "b"], [{}, {}])["vlm"]
    want = [(by_brightness(v[0] / 255) + by_brightness(v[2] / 255)) / 2 for v in levels]
    assert s.tolist() == pytest.approx(want, abs=1e-7) and len(judge.requests) == 4
    rs.rewards["vlm"].close()


# ---- transport: retries, errors, timeouts, concurrency ----

def test_retries_on_503_then_success(judge, build):
    reward = build()
    judge.fail = [503, 503]
    t0 = time.monotonic()
    s = reward(constant(200), ["a"], [{}])
    assert s.tolist() == pytest.approx([by_brightness(200 / 255)], abs=1e-7)
    assert len(judge.requests) == 3 and time.monotonic() - t0 >= 0.75  # backoff 0.25 s, then 0.5 s
    judge.fail = [400]  # another 4xx: at once, with the server's message
    one_line(reward, constant(200), ["a"], [{}],
             match=r"reward 'vlm': http://127\.0\.0\.1:\d+/v1/chat/completions answered 400: .*server busy")
    assert len(judge.requests) == 4


def test_bad_token_is_one_line_at_construction(judge, build, monkeypatch, tmp_path):
    judge.token = "right"
    monkeypatch.setenv("FLOW_RL_REWARD_TOKEN", "wrong")
    msg = one_line(build, match=r"reward 'vlm': bad token for http://127\.0\.0\.1:\d+/v1/models \(401: Unauthorized\)")
    assert "FLOW_RL_REWARD_TOKEN" in msg and judge.requests == []  # nothing scored
    (tmp_path / "token").write_text("right\n")
    build(token_file=str(tmp_path / "token"))(constant(9), ["a"], [{}])
    assert judge.requests[-1][0]["authorization"] == "Bearer right"


def test_endpoint_checked_at_construction(judge, build, monkeypatch):
    one_line(build, model="other", match=r"reward 'vlm': model 'other' not served; http://127\.0\.0\.1:\d+/v1/models "
                                         r"lists \['judge-7b'\]")
    judge.models = [MODEL, "judge-72b"]
    one_line(build, match=r"no model given and .* lists \['judge-7b', 'judge-72b'\]; set \?model= or FLOW_RL_VLM_MODEL")
    monkeypatch.setenv("FLOW_RL_VLM_MODEL", "judge-72b")
    build()(constant(9), ["a"], [{}])
    assert judge.requests[-1][1]["model"] == "judge-72b"
    dead = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    one_line(load_rewards, ["vlm"], {"vlm": dead + "?max_wait=0.5"},
             match=rf"reward 'vlm': {dead}/v1/models failed \d attempt\(s\) .* ConnectError")
    assert time.monotonic() - t0 < 5
    one_line(load_rewards, ["vlm"], {"vlm": judge.url + "/nothing"},
             match=r"reward 'vlm': http://127\.0\.0\.1:\d+/nothing/v1/models answered 404")
    one_line(load_rewards, ["vlm"], match=r"reward 'vlm' needs the judge's URL: --reward-paths vlm=http://HOST:PORT")
    one_line(load_rewards, ["vlm"], {"vlm": judge.url + "?mode=maybe"}, match="option mode='maybe' is neither")
    one_line(load_rewards, ["vlm"], {"vlm": judge.url + "?retries=3"}, match="unknown option 'retries'")
    one_line(load_rewards, ["vlm"], {"vlm": judge.url + "?token=x"}, match="never put the token in the URL")
    one_line(load_rewards, ["vlm"], {"vlm": judge.url + ":0.5"}, match="bad port .* --reward vlm:W")


def test_timeout(judge, build):
    reward = build(timeout=0.3, max_wait=1)
    judge.delay = 3
    t0 = time.monotonic()
    one_line(reward, constant(9), ["a"], [{}],
             match=r"reward 'vlm': http://127\.0\.0\.1:\d+/v1/chat/completions failed \d attempt\(s\) "
                   r".*timeout 0\.3 s, max_wait 1 s.*ReadTimeout")
    assert time.monotonic() - t0 < 2


def test_concurrent_requests(judge, build, monkeypatch):
    judge.delay = 0.5
    t0 = time.monotonic()
    s = build()(constant(*range(1, 21)), ["a"] * 20, [{}] * 20)  # 16 at once by default
    assert judge.max_in_flight == 16 and time.monotonic() - t0 < 20 * 0.5 / 4
    assert s.tolist() == pytest.approx([by_brightness(v / 255) for v in range(1, 21)], abs=1e-7)
    judge.reset()
    judge.delay = 0.3
    monkeypatch.setenv("FLOW_RL_VLM_CONCURRENCY", "3")
    build()(constant(*range(1, 8)), ["a"] * 7, [{}] * 7)
    assert judge.max_in_flight == 3


# ---- served by rewards.server ----

def test_server_gives_the_same_scores(judge, tmp_path):
    with reward_server("vlm", tmp_path / "server.log", "--reward-path", judge.url) as url:
        remote = load_rewards([f"vlm={url}"])
        local = load_rewards(["vlm"], {"vlm": judge.url})
        images, video = u8_images(3, 3, 40, 56, seed=1), u8_images(2, 3, 3, 40, 56, seed=2)
        for x in (images, video):
            prompts = [f"p{i}" for i in range(len(x))]
            s = remote.score(x, prompts, [{}] * len(x))["vlm"]
            assert torch.equal(s, local.score(x, prompts, [{}] * len(x))["vlm"]) and s.std() > 0
        local.rewards["vlm"].close()


# ---- a real OpenAI-compatible server: transformers serve (transformers[serving]: fastapi, openai) ----

def tiny_llava(folder):
    """A tiny LLaVA (CLIP vision tower, Qwen2 language model, byte-level tokenizer) saved to `folder`, whose greedy
    answer is "4" whatever it is asked: every attention and MLP output projection is zero, so the last hidden state is
    the last token's embedding, all ones; the output layer is zero but for the row of "4"."""
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor, Qwen2Config)

    from common.models import tiny_parts

    tok = tiny_parts.qwen2_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": tiny_parts.QWEN_SPECIAL_TOKENS + ["<image>"]})
    tok.chat_template = tiny_parts.QWEN_CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>",
                                                              "<image>")
    ids = tok.convert_tokens_to_ids
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=16)
    text = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
                       bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"))
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="full")).eval()
    lm = model.model.language_model
    with torch.no_grad():
        for layer in lm.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        lm.embed_tokens.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[ids("4")] = 1.0
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = ids("<|endoftext|>"), ids("<|im_end|>")
    model.save_pretrained(folder)
    processor = LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 28},
                                                                     crop_size={"height": 28, "width": 28}),
                               tokenizer=tok, patch_size=14, vision_feature_select_strategy="full",
                               num_additional_image_tokens=1, chat_template=tok.chat_template)
    processor.save_pretrained(folder)


def test_transformers_serve(clean_env, tmp_path):
    """`transformers serve` takes the requests as they are (image data URL, chat template, greedy at temperature 0,
    max_tokens) and lists the model's folder at /v1/models; it ignores logprobs, so mode=yes stops at once."""
    for package in ("fastapi", "openai"):
        pytest.importorskip(package, reason="transformers serve needs fastapi and openai: transformers[serving]")
    folder = str(tmp_path / "tiny-llava")
    tiny_llava(folder)
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "transformers.cli.transformers", "serve", folder, "--device",
                             "cpu", "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(url + "/v1/models", timeout=1).is_success:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "transformers serve did not come up"
            time.sleep(0.3)
        reward = VlmJudge(url + "?" + urlencode({"mode": "number", "regex": r"(\d)", "max_tokens": 1}))
        assert reward.model == folder  # the only model listed
        assert reward(u8_images(2, 3, 64, 48), ["a cat", "a dog"], [{}] * 2).tolist() == pytest.approx([0.8, 0.8])
        reward.close()
        one_line(VlmJudge(url), u8_images(1, 3, 64, 48), ["a cat"], [{}],
                 match=r"reward 'vlm': http://127\.0\.0\.1:\d+/v1/chat/completions answered without logprobs "
                       r"\(transformers serve ignores them\); use mode=number")
    finally:
        proc.kill()
        proc.wait()
