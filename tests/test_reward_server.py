"""Remote rewards against real server processes on 127.0.0.1: rewards.server serving the jpeg reward, a custom
pointwise and a custom groupwise reward, and a reference-protocol /compute server written here. The remote path
gives the local reward's scores, errors come as one-line RewardErrors (bad token at check_specs, a killed server
after bounded retries, NaN / wrong count as for a local reward, 413), and rewards/ imports no pickle."""
import base64
import io
import os
import re
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from rewards import RewardError, check_specs, load_rewards, parse_spec
from rewards.remote import decode, decode_score_request, encode_score_request
from tests.helpers import wait_for_health

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "s3cret-test-token"


# ---- rewards served by the tests (dotted paths tests.test_reward_server.X) ----

class Probe:
    """Pointwise: reads everything a remote call carries (pixels, prompts, JSON metadata, condition image files,
    decoded data videos with fps). metadata "fail": "nan" | "short" makes it misbehave; "sleep" slows it."""

    batch_size = 2  # the server scores in chunks of 2
    thread_safe = True  # the server may run two requests' calls at once

    def __call__(self, images, prompts, metadata):
        s = images.flatten(1).mean(1).double() + torch.tensor([len(p) for p in prompts], dtype=torch.float64)
        for i, m in enumerate(metadata):
            s[i] += float(m.get("value", 0)) + len(m.get("videos", []))
            for path in m.get("images", []):  # a file on the server: its bytes are the client's file's
                s[i] += np.asarray(Image.open(path).convert("RGB"), np.float64).mean() / 255 + (path[-4:] == ".jpg")
            for frames, fps in m.get("video_frames", []):
                s[i] += frames.double().mean().item() * 10 + fps
            time.sleep(m.get("sleep", 0))
        if any(m.get("fail") == "nan" for m in metadata):
            s[[m.get("fail") == "nan" for m in metadata]] = float("nan")
        if any(m.get("fail") == "short" for m in metadata):
            return s[:-1]
        return s


class Rank:
    """Groupwise: raw score = brightness; the group transform ranks within each group (as pickscore_rank)."""

    groupwise = True

    def __call__(self, images, prompts, metadata):
        return images.flatten(1).mean(1)

    def group_transform(self, scores):
        return torch.argsort(torch.argsort(scores, dim=1), dim=1).float() / scores.shape[1]


def serve_compute(port: int):
    """A small server of the reference project's protocol: POST /compute {prompt, image: [b64 PNG], video:
    [[b64 PNG]], condition_images, ...} -> {rewards}; GET /health. reward = -JPEG kB (videos: mean over frames)
    + the mean pixel of each condition image."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from rewards.jpeg import jpeg_kb

    def png(b64):
        return torch.from_numpy(np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).copy())

    async def compute(request):
        d = await request.json()
        if d.get("image"):
            scores = [-jpeg_kb(png(x).permute(2, 0, 1)[None] / 255).item() for x in d["image"]]
        else:
            scores = [-jpeg_kb(torch.stack([png(f) for f in v]).permute(0, 3, 1, 2) / 255).mean().item()
                      for v in d["video"]]
        for i, cond in enumerate(d.get("condition_images") or []):
            scores[i] += sum(png(c).float().mean().item() / 255 for c in cond)
        return JSONResponse({"rewards": scores})

    async def health(request):
        return JSONResponse({"status": "ok"})

    uvicorn.run(Starlette(routes=[Route("/compute", compute, methods=["POST"]), Route("/health", health)]),
                host="127.0.0.1", port=port, log_level="warning")


# ---- server processes ----

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """name -> (url, Popen); all started at once, each waited for on its /health."""
    log_dir = tmp_path_factory.mktemp("servers")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    env.pop("FLOW_RL_REWARD_TOKEN", None), env.pop("FLOW_RL_REWARD_TOKEN_FILE", None)
    server = [sys.executable, "-m", "rewards.server", "--reward"]
    commands = {
        "jpeg": (server + ["jpeg_compressibility", "--timeout", "1"], {"FLOW_RL_REWARD_TOKEN": TOKEN}),
        "probe": (server + ["tests.test_reward_server.Probe", "--max-request-mb", "1", "--timeout", "1"], {}),
        "rank": (server + ["tests.test_reward_server.Rank"], {}),
        "victim": (server + ["jpeg_compressibility"], {}),
        "compute": ([sys.executable, "-c", "import sys, tests.test_reward_server as t; "
                     "t.serve_compute(int(sys.argv[1]))"], {}),
    }
    procs = {}
    for name, (cmd, extra) in commands.items():
        port = free_port()
        cmd = cmd + ([str(port)] if name == "compute" else ["--port", str(port)])
        log = open(log_dir / f"{name}.log", "w")
        procs[name] = (f"http://127.0.0.1:{port}", subprocess.Popen(cmd, cwd=ROOT, env={**env, **extra}, stdout=log,
                                                                    stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 60
    try:
        for name, (url, proc) in procs.items():
            wait_for_health(name, url, proc, log_dir / f"{name}.log", deadline, {"Authorization": f"Bearer {TOKEN}"})
        yield procs
    finally:
        for _, proc in procs.values():
            proc.kill()
            proc.wait()


def one_line_error(fn, *args, match):
    with pytest.raises(RewardError, match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


def u8_images(*shape, seed=0):
    """Floats on the uint8 grid, which the transport carries exactly."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).float() / 255


# ---- specs (no server) ----

def test_remote_spec_syntax():
    assert parse_spec("remote=http://127.0.0.1:8000") == ("remote", 1.0)
    assert parse_spec("remote=http://127.0.0.1:8000:0.5") == ("remote", 0.5)
    assert parse_spec(" ocr-2=https://host.example:443/rewards/ocr?timeout=30:-2 ") == ("ocr-2", -2.0)
    assert parse_spec("ref=http://[::1]:9000/compute:3") == ("ref", 3.0)
    assert parse_spec("remote=http://host/x") == ("remote", 1.0)
    one_line_error(parse_spec, "remote=http://host:0.5", match="bad port.*NAME=http://HOST:PORT:WEIGHT")
    one_line_error(parse_spec, "remote=127.0.0.1:8000", match="expected NAME=http://HOST:PORT")
    one_line_error(parse_spec, "re mote=http://h:1", match="bad remote reward name")
    one_line_error(parse_spec, "r=http://h:1?token=abc", match="never put the token in the spec")
    one_line_error(parse_spec, "r=http://u:pw@h:1", match="no credentials in the URL")
    one_line_error(parse_spec, "r=http://h:1?retries=3", match="unknown option 'retries'")
    one_line_error(parse_spec, "r=http://h:1?timeout=-1", match="timeout must be a positive")
    one_line_error(parse_spec, "r=http://h:1:inf", match="bad weight")
    one_line_error(check_specs, ["jpeg_compressibility", "jpeg_compressibility=http://h:1"], match="given twice")


def test_metadata_transport_rule(tmp_path):
    """JSON values travel, others are dropped; condition files keep their bytes, video frames their values."""
    cond = tmp_path / "c.jpg"
    Image.fromarray(np.full((5, 6, 3), 7, np.uint8)).save(cond)
    frames = u8_images(2, 3, 4, 4)
    meta = [{"prompt": "a", "tag": [1, "x"], "t": torch.ones(2), "images": [str(cond)], "videos": ["v.mp4"],
             "video_frames": [(frames, 24)]}, {"prompt": "b"}]
    body = encode_score_request(u8_images(2, 3, 4, 4), ["a", "b"], meta)
    _, prompts, rows = decode_score_request(body, str(tmp_path))
    assert prompts == ["a", "b"] and rows[1] == {"prompt": "b"}
    assert set(rows[0]) == {"prompt", "tag", "images", "videos", "video_frames"} and rows[0]["tag"] == [1, "x"]
    assert open(rows[0]["images"][0], "rb").read() == cond.read_bytes() and rows[0]["images"][0].endswith(".jpg")
    assert torch.equal(rows[0]["video_frames"][0][0], frames) and rows[0]["video_frames"][0][1] == 24.0


def test_no_pickle_in_rewards():
    """Nothing in rewards/ unpickles, except the one-off converter of upstream pickles (rewards/convert.py), which reads
    them with torch.load(weights_only=True): tensors and plain containers, no code."""
    pattern = re.compile(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle|joblib)\b"
                         r"|torch\.load\((?![^)\n]*weights_only=True)|allow_pickle\s*=\s*True", re.M)
    for name in os.listdir(os.path.join(ROOT, "rewards")):
        if name.endswith(".py"):
            text = open(os.path.join(ROOT, "rewards", name)).read()
            assert not pattern.search(text), f"rewards/{name} uses pickle"
            assert name == "convert.py" or "torch.load(" not in text, f"rewards/{name} reads a pickle at run time"
    assert pattern.search("torch.load(p)") and pattern.search("torch.load(p, weights_only=False)")
    assert not pattern.search("torch.load(p, weights_only=True)")


def test_public_bind_needs_a_token(monkeypatch, capsys):
    from rewards import server

    monkeypatch.delenv("FLOW_RL_REWARD_TOKEN", raising=False)
    monkeypatch.delenv("FLOW_RL_REWARD_TOKEN_FILE", raising=False)
    with pytest.raises(SystemExit, match=r"^error: --host 0\.0\.0\.0 is reachable from other machines.*token"):
        server.main(["--reward", "jpeg_compressibility", "--host", "0.0.0.0"])
    assert server.is_loopback("127.0.0.1") and server.is_loopback("::1") and not server.is_loopback("myhost")


# ---- against the servers ----

def test_jpeg_remote_equals_local_mixed_and_weighted(servers, monkeypatch, tmp_path):
    url = servers["jpeg"][0]
    monkeypatch.setenv("FLOW_RL_REWARD_TOKEN", TOKEN)
    rs = load_rewards([f"remote={url}:0.5", "jpeg_compressibility", "tests.test_reward_server.Rank:2"])
    assert rs.names == ["remote", "jpeg_compressibility", "tests.test_reward_server.Rank"]
    assert rs.weights == {"remote": 0.5, "jpeg_compressibility": 1.0, "tests.test_reward_server.Rank": 2.0}
    assert rs.rewards["remote"].server_name == "jpeg_compressibility" and not rs.is_groupwise("remote")
    torch.manual_seed(0)
    for x in (torch.rand(5, 3, 48, 40), torch.rand(3, 4, 3, 32, 32)):  # images, then videos
        s = rs.score(x, ["p"] * len(x), [{}] * len(x))
        assert torch.equal(s["remote"], s["jpeg_compressibility"])  # the jpeg reward rounds to uint8 itself
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    monkeypatch.delenv("FLOW_RL_REWARD_TOKEN")
    check_specs([f"remote={url}?token_file={token_file}"])
    monkeypatch.setenv("FLOW_RL_REWARD_TOKEN_FILE", str(token_file))
    check_specs([f"remote={url}"])


def test_bad_token_fails_at_check_specs(servers, monkeypatch):
    url = servers["jpeg"][0]
    monkeypatch.setenv("FLOW_RL_REWARD_TOKEN", "wrong")
    t = time.monotonic()
    msg = one_line_error(check_specs, ["jpeg_compressibility", f"remote={url}:0.5"], match="reward 'remote': bad token")
    assert url in msg and "FLOW_RL_REWARD_TOKEN" in msg and time.monotonic() - t < 2  # at once, no retries
    monkeypatch.delenv("FLOW_RL_REWARD_TOKEN")
    one_line_error(check_specs, [f"remote={url}"], match="bad token .*401")


def test_custom_remote_equals_local_with_metadata_and_batches(servers, tmp_path):
    url = servers["probe"][0]
    rs = load_rewards([f"probe={url}", "tests.test_reward_server.Probe"])
    assert rs.rewards["probe"].batch_size == 2 and not rs.is_groupwise("probe")
    png, jpg = str(tmp_path / "a.png"), str(tmp_path / "b.jpg")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), np.uint8)).save(png)
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 16, 3), np.uint8)).save(jpg)
    meta = [{"value": 0.25, "images": [png, jpg]}, {"value": -3, "videos": ["x.mp4"],
                                                    "video_frames": [(u8_images(3, 3, 8, 8, seed=2), 16.0)]},
            {}, {"images": []}, {"value": 7, "images": [jpg]}]
    prompts = ["a cat", "a dog", "", "a long prompt here", "x"]
    for x in (u8_images(5, 3, 24, 16), u8_images(5, 2, 3, 8, 8)):
        s = rs.score(x, prompts, meta)
        assert torch.equal(s["probe"], s["tests.test_reward_server.Probe"])
    big = u8_images(4, 3, 300, 300)  # 4 x 0.26 MB: split by the client to fit the server's 1 MB bound
    s = rs.score(big, ["a"] * 4, [{}] * 4)
    assert torch.equal(s["probe"], s["tests.test_reward_server.Probe"])


def test_bad_scores_give_the_local_errors(servers):
    url = servers["probe"][0]
    rs = load_rewards([f"probe={url}"])
    local = load_rewards(["tests.test_reward_server.Probe"])
    x, prompts = u8_images(3, 3, 8, 8), ["ok", "the bad one", "ok too"]
    meta = [{}, {"fail": "nan"}, {}]
    msg = one_line_error(rs.score, x, prompts, meta, match="reward 'probe' returned non-finite values for prompts")
    assert msg == one_line_error(local.score, x, prompts, meta, match="non-finite").replace(
        "tests.test_reward_server.Probe", "probe")
    meta = [{}, {}, {"fail": "short"}]
    one_line_error(rs.score, x[:1], prompts[:1], meta[2:],
                   match=r"reward 'probe' returned shape \(0,\), expected \(1,\)")
    one_line_error(local.score, x[:1], prompts[:1], meta[2:], match=r"returned shape \(0,\), expected \(1,\)")


def test_oversized_request_is_refused(servers):
    url = servers["probe"][0]
    r = httpx.post(url + "/score", content=b"\0" * (2 << 20))
    assert r.status_code == 413 and "max-request-mb" in r.json()["error"]
    rs = load_rewards([f"probe={url}"])
    one_line_error(rs.score, u8_images(1, 3, 700, 700), ["a"], [{}],
                   match=r"reward 'probe': .*/score refused a 1\.4 MB request as too large \(413")


def test_concurrent_requests_do_not_block_each_other(servers):
    url = servers["probe"][0]
    rs = load_rewards([f"probe={url}"])
    x, out = u8_images(1, 3, 8, 8), []
    threads = [threading.Thread(target=lambda: out.append(rs.score(x, ["a"], [{"sleep": 1.0}]))) for _ in range(2)]
    t = time.monotonic()
    for th in threads:
        th.start()
    time.sleep(0.3)
    health = httpx.get(url + "/health", timeout=0.5)  # answered while both requests score
    assert health.json()["name"] == "tests.test_reward_server.Probe"
    for th in threads:
        th.join()
    assert len(out) == 2 and time.monotonic() - t < 1.8


def closed(sock) -> bool:
    """The server closed its end (EOF or reset); a socket timeout if it is still open."""
    try:
        return sock.recv(1 << 16) == b""
    except ConnectionResetError:
        return True


def test_idle_and_trickling_connections_time_out_before_the_token(servers):
    """--timeout 1: a connection that sends nothing, or its headers a byte every 0.2 s (each byte well within the
    timeout), is closed after about 1 s, without the token it would need; other clients are answered meanwhile."""
    url = servers["jpeg"][0]
    address = ("127.0.0.1", int(url.rsplit(":", 1)[1]))
    t = time.monotonic()
    with socket.create_connection(address, timeout=3) as idle, socket.create_connection(address, timeout=3) as slow:
        cut = None
        for byte in b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n" * 2:
            try:
                slow.send(bytes([byte]))
            except OSError:  # reset: the server closed it
                cut = time.monotonic() - t
                break
            if byte == ord("\n"):  # answered while two connections hang
                assert httpx.get(url + "/health", timeout=1, headers={"Authorization": f"Bearer {TOKEN}"}).is_success
            time.sleep(0.2)
        assert cut is not None and 0.9 < cut < 3, cut  # bounds loose for a loaded machine
        assert closed(idle) and closed(slow) and time.monotonic() - t < 3.5


def test_slow_steady_upload_is_scored_and_a_stalled_one_gets_408(servers):
    """--timeout 1 bounds the wait for each piece of a body, not the whole: a 240 kB body sent in 3 pieces 0.4 s
    apart is scored (and so is one taking over 1 s to score); one that stops half-way gets 408 and is closed."""
    url = servers["probe"][0]
    x, prompts = u8_images(2, 3, 200, 200), ["a", "b"]
    body = encode_score_request(x, prompts, [{}, {"sleep": 1.1}])

    def pieces(step=len(body) // 3 + 1):
        for i in range(0, len(body), step):
            time.sleep(0.4)
            yield body[i:i + step]

    t = time.monotonic()
    r = httpx.post(url + "/score", content=pieces(), headers={"Content-Length": str(len(body))}, timeout=5)
    assert r.status_code == 200 and time.monotonic() - t > 2, r.text
    assert torch.equal(decode(r.content)[0]["scores"], Probe()(x, prompts, [{}, {}]).float())
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=3) as s:
        t = time.monotonic()
        s.sendall(b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        answer = b""
        while chunk := s.recv(1 << 16):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408") and b"--timeout" in answer and 0.9 < time.monotonic() - t < 3


def test_counts_must_agree(servers):
    """4 images with 2 prompts, or 3 metadata rows with 2 samples: 400 with one line naming the counts."""
    url = servers["probe"][0]
    for body, counts in ((encode_score_request(u8_images(4, 3, 8, 8), ["a", "b"], [{}, {}]), "4 images, 2 prompts"),
                         (encode_score_request(u8_images(2, 3, 8, 8), ["a", "b"], [{}, {}, {}]), "3 metadata")):
        r = httpx.post(url + "/score", content=body)
        assert r.status_code == 400 and counts in r.json()["error"] and "\n" not in r.text, r.text


def test_an_empty_request_scores_nothing(servers):
    """0 samples: 200 and no scores, as the client answers an empty call itself; with or without a batch_size."""
    for url in (servers["probe"][0], servers["rank"][0]):  # batch_size 2, none
        r = httpx.post(url + "/score", content=encode_score_request(u8_images(0, 3, 8, 8), [], []))
        assert r.status_code == 200, r.text
        assert decode(r.content)[0]["scores"].shape == (0,)


def test_groupwise_remote(servers, monkeypatch):
    url = servers["rank"][0]
    rs = load_rewards([f"rank={url}:2", "tests.test_reward_server.Rank", "jpeg_compressibility"])
    assert rs.is_groupwise("rank") and rs.is_groupwise("tests.test_reward_server.Rank")
    assert httpx.get(url + "/health").json() == {
        "protocol": "flow-rl-reward/1", "name": "tests.test_reward_server.Rank", "kind": "groupwise",
        "max_request_mb": 256.0, "batch_size": None}
    x = u8_images(6, 3, 8, 8)
    s = rs.score(x, ["a"] * 6, [{}] * 6)
    assert torch.equal(s["rank"], s["tests.test_reward_server.Rank"])
    groups = s["rank"].view(2, 3)
    assert torch.equal(rs.group_transform("rank", groups), rs.group_transform("tests.test_reward_server.Rank", groups))


def test_server_killed_mid_run_fails_within_the_bound(servers):
    url, proc = servers["victim"]
    rs = load_rewards([f"remote={url}?timeout=1&max_wait=2"])
    x = u8_images(2, 3, 8, 8)
    rs.score(x, ["a", "b"], [{}, {}])
    proc.kill()
    proc.wait()
    t = time.monotonic()
    msg = one_line_error(rs.score, x, ["a", "b"], [{}, {}], match=rf"reward 'remote': {url}/score failed \d+ attempt")
    assert time.monotonic() - t < 3 and "last error: Connect" in msg and "failed 1 attempt" not in msg
    one_line_error(check_specs, [f"remote={url}?timeout=0.5&max_wait=0.5"], match="failed .* attempt.*ConnectError")


def test_reference_compute_protocol_interop(servers, tmp_path):
    url = servers["compute"][0]
    one_line_error(check_specs, [f"ref={url}"], match="expected flow-rl-reward/1 JSON; for a reference-project server end the URL with /compute")
    rs = load_rewards([f"ref={url}/compute:0.5", "jpeg_compressibility"])
    assert rs.weights["ref"] == 0.5 and not rs.is_groupwise("ref")
    cond = str(tmp_path / "c.png")
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (12, 10, 3), np.uint8)).save(cond)
    cond_mean = torch.from_numpy(np.asarray(Image.open(cond).convert("RGB")).copy()).float().mean().item() / 255
    torch.manual_seed(4)
    for x in (torch.rand(3, 3, 32, 24), torch.rand(2, 3, 3, 16, 16)):
        meta = [{"images": [cond]}] + [{}] * (len(x) - 1)
        s = rs.score(x, ["p"] * len(x), meta)
        expected = s["jpeg_compressibility"].clone()
        expected[0] += cond_mean
        assert torch.allclose(s["ref"], expected, rtol=0, atol=1e-5)


def test_an_html_answer_names_the_reward_url_status_and_content_type():
    """A proxy or login page answering 200 with HTML: the error names the reward, the URL, the status and the content
    type (issue 21 item 9), on /health, /score and /compute alike."""
    import http.server
    import json

    class Handler(http.server.BaseHTTPRequestHandler):
        def _send(self, body: bytes, kind: str):
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # a protocol health answer only under /ok, so that /score is reached
            if self.path.startswith("/ok"):
                self._send(json.dumps({"protocol": "flow-rl-reward/1", "name": "x"}).encode(), "application/json")
            else:
                self._send(b"<html><body>Sign in</body></html>", "text/html; charset=utf-8")

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self._send(b"<html><body>Sign in</body></html>", "text/html; charset=utf-8")

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        one_line_error(check_specs, [f"proxy={url}"], match=rf"reward 'proxy': {url}/health answered 200 with "
                                                            r"text/html; charset=utf-8 \(33 bytes: '<html>")
        x = u8_images(2, 3, 8, 8)
        rs = load_rewards([f"proxy={url}/ok"])
        one_line_error(rs.score, x, ["a", "b"], [{}, {}], match=rf"reward 'proxy': {url}/ok/score answered 200 with "
                                                                 "text/html.*expected application/vnd.flow-rl")
        rs = load_rewards([f"proxy={url}/compute"])
        one_line_error(rs.score, x, ["a", "b"], [{}, {}], match=rf"reward 'proxy': {url}/compute answered 200 "
                                                                 r"with text/html.*expected JSON \{rewards")
    finally:
        server.shutdown()


def test_compute_payload_reads_16_bit_condition_images(tmp_path):
    """The /compute protocol sends condition images as PNGs: a 16-bit one as the run reads it (scaled to 8 bits),
    not white (Pillow's convert("RGB") of a 16-bit image)."""
    from rewards.remote import compute_payload
    path = str(tmp_path / "deep.png")
    values = np.array([[0, 257 * 128], [65535, 257 * 64]], dtype=np.uint16)
    Image.fromarray(values).save(path)  # uint16: a 16-bit gray PNG
    payload = compute_payload(torch.zeros(1, 3, 2, 2), ["a"], [{"images": [path]}])
    sent = np.asarray(Image.open(io.BytesIO(base64.b64decode(payload["condition_images"][0][0]))))
    assert sent.shape == (2, 2, 3) and (sent[..., 0] == [[0, 128], [255, 64]]).all()
