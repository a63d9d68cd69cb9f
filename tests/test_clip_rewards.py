"""The aesthetic and hpsv2 rewards on tiny random CLIP builds saved to tmp folders, through the converter
(rewards/convert.py) from upstream-layout checkpoints written here. References are computed here in float64: the
aesthetic head as upstream's nn.Sequential, and HPS's CLIP as a plain-torch forward of open_clip's key layout, so the
open_clip -> transformers key mapping is checked on the features themselves. Also: HPS's pad-not-crop input, videos
as the frame mean, the one-line errors, and a reward server serving each with the in-process scores."""
import contextlib
import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.models.tiny_parts import clip_tokenizer
from rewards import REGISTRY, RewardError, load_rewards
from rewards import convert
from tests.helpers import reward_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# OpenAI CLIP's normalisation (both rewards' processors)
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073], dtype=torch.float64).view(3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711], dtype=torch.float64).view(3, 1, 1)
PROMPTS = ["a red cat", "a blue dog on the moon", "x " * 100]  # the last one is truncated to 77 tokens


def tiny_processor():
    from transformers import CLIPImageProcessor, CLIPProcessor

    return CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}),
                         tokenizer=clip_tokenizer())


def grid_images(n, h=32, w=32, seed=0):
    """Images on the uint8 grid (k / 255): what the processor and the server see of them is exact."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g).float() / 255


def by_hand(images):
    """Normalised pixels of images already at the model's 32 x 32: no resize, no crop, no padding."""
    return (images.double() - MEAN) / STD


def one_line(fn, *args, match, **kwargs):
    with pytest.raises((RewardError, SystemExit), match=match) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


# ---- aesthetic ----

class UpstreamHead(nn.Module):
    """The layout of upstream's MLP for sac+logos+ava1-l14-linearMSE.pth (no activations)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(768, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


@pytest.fixture(scope="module")
def aesthetic(tmp_path_factory):
    """(folder, upstream head in float64): the head converted from an upstream-style pickle by `python -m
    rewards.convert aesthetic ... --clip CLIP`, which also copies a tiny CLIP (768-d embeddings) and its processor."""
    from transformers import CLIPConfig, CLIPModel

    d = tmp_path_factory.mktemp("aesthetic")
    clip = d / "clip"
    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    text = dict(common, vocab_size=514, max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
                pad_token_id=513)
    CLIPModel(CLIPConfig(text_config=text, vision_config=dict(common, image_size=32, patch_size=8),
                         projection_dim=768)).save_pretrained(clip)
    tiny_processor().save_pretrained(clip)
    head = UpstreamHead()
    with torch.no_grad():
        head.layers[-1].bias.fill_(5.0)  # scores near upstream's ~5, as a real head gives
    torch.save(head.state_dict(), d / "upstream.pth")
    convert.main(["aesthetic", str(d / "upstream.pth"), str(d / "folder"), "--clip", str(clip)])
    return str(d / "folder"), head.double().eval()


def aesthetic_reference(folder, head, images):
    """head(e / |e|), e the CLIP image embedding, all in float64."""
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(folder, dtype=torch.float64).eval()
    with torch.no_grad():
        e = clip.visual_projection(clip.vision_model(pixel_values=by_hand(images)).pooler_output)
        return head(e / e.norm(dim=-1, keepdim=True)).squeeze(-1)


def test_aesthetic_equals_the_head_by_hand(aesthetic):
    folder, head = aesthetic
    assert REGISTRY["aesthetic"] == "rewards.aesthetic:Aesthetic"
    rs = load_rewards(["aesthetic"], paths={"aesthetic": folder})
    images = grid_images(4)
    s = rs.score(images, ["ignored"] * 4, [{}] * 4)["aesthetic"]
    want = aesthetic_reference(folder, head, images)
    assert s.dtype == torch.float32 and s.shape == (4,)
    assert torch.allclose(s.double(), want, atol=1e-5, rtol=0), (s, want)
    assert len(set(s.tolist())) == 4 and (s - 5).abs().max() < 2  # distinct, and near the bias as built
    # the prompt plays no part
    assert torch.equal(s, rs.score(images, ["a", "b", "c", "d"], [{}] * 4)["aesthetic"])


def test_aesthetic_errors_are_one_line(aesthetic, tmp_path):
    folder, head = aesthetic
    msg = one_line(load_rewards, ["aesthetic"], match="reward 'aesthetic': no folder given for its head")
    assert "python -m rewards.convert aesthetic sac+logos+ava1-l14-linearMSE.pth FOLDER" in msg
    assert "--reward-paths aesthetic=FOLDER" in msg
    one_line(load_rewards, ["aesthetic"], paths={"aesthetic": str(tmp_path)},
             match="has no aesthetic_head.safetensors; convert upstream's")
    # a folder with the head only: CLIP comes from the hub id (offline in tests: it names the id)
    only_head = tmp_path / "only_head"
    convert.main(["aesthetic", os.path.join(folder, "..", "upstream.pth"), str(only_head)])
    one_line(load_rewards, ["aesthetic"], paths={"aesthetic": str(only_head)},
             match=r"reward 'aesthetic': cannot load 'openai/clip-vit-large-patch14'")
    # upstream's reluMSE model (activations between the layers) is another formula: refused by the converter
    relu = {f"layers.{i}.{p}": torch.zeros(1) for i in (0, 3, 6, 9, 11) for p in ("weight", "bias")}
    torch.save(relu, tmp_path / "relu.pth")
    one_line(convert.main, ["aesthetic", str(tmp_path / "relu.pth"), str(tmp_path / "out")],
             match=r"^error: reward 'aesthetic': .*relu.pth is not the linearMSE aesthetic head")
    bad = {k: v[..., :-1].float() if k == "layers.4.weight" else v.float() for k, v in head.state_dict().items()}
    torch.save(bad, tmp_path / "bad.pth")
    one_line(convert.main, ["aesthetic", str(tmp_path / "bad.pth"), str(tmp_path / "out")],
             match=r"layers.4 has weight \(64, 127\) and bias \(64,\), expected \(64, 128\)")
    one_line(convert.main, ["aesthetic", str(tmp_path / "missing.pth"), str(tmp_path / "out")],
             match="^error: file not found")


# ---- hpsv2: a tiny open_clip ViT CLIP ----

VISION = dict(width=32, layers=2, heads=4, patch=8, image=32)
TEXT = dict(width=24, layers=3, heads=4, context=77, vocab=514)  # other widths and depths than the vision tower's
EMBED = 16


def openclip_state(seed=0):
    """A random state dict in open_clip's key layout for a ViT CLIP (VisionTransformer + text transformer)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    def norm(prefix, w):
        return {f"{prefix}.weight": 1 + rnd(w, scale=0.1), f"{prefix}.bias": rnd(w, scale=0.1)}

    def blocks(prefix, w, n):
        sd = {}
        for i in range(n):
            p = f"{prefix}.resblocks.{i}"
            sd |= norm(f"{p}.ln_1", w) | norm(f"{p}.ln_2", w)
            sd |= {f"{p}.attn.in_proj_weight": rnd(3 * w, w, scale=w ** -0.5),
                   f"{p}.attn.in_proj_bias": rnd(3 * w, scale=0.1),
                   f"{p}.attn.out_proj.weight": rnd(w, w, scale=w ** -0.5),
                   f"{p}.attn.out_proj.bias": rnd(w, scale=0.1),
                   f"{p}.mlp.c_fc.weight": rnd(4 * w, w, scale=w ** -0.5),
                   f"{p}.mlp.c_fc.bias": rnd(4 * w, scale=0.1),
                   f"{p}.mlp.c_proj.weight": rnd(w, 4 * w, scale=(4 * w) ** -0.5),
                   f"{p}.mlp.c_proj.bias": rnd(w, scale=0.1)}
        return sd

    v, t = VISION, TEXT
    grid = v["image"] // v["patch"]
    sd = {"visual.conv1.weight": rnd(v["width"], 3, v["patch"], v["patch"], scale=0.1),
          "visual.class_embedding": rnd(v["width"], scale=0.5),
          "visual.positional_embedding": rnd(grid * grid + 1, v["width"], scale=0.5),
          "visual.proj": rnd(v["width"], EMBED, scale=v["width"] ** -0.5),
          "token_embedding.weight": rnd(t["vocab"], t["width"], scale=0.5),
          "positional_embedding": rnd(t["context"], t["width"], scale=0.5),
          "text_projection": rnd(t["width"], EMBED, scale=t["width"] ** -0.5),
          "logit_scale": torch.tensor(math.log(100.0))}
    sd |= norm("visual.ln_pre", v["width"]) | norm("visual.ln_post", v["width"]) | norm("ln_final", t["width"])
    sd |= blocks("visual.transformer", v["width"], v["layers"]) | blocks("transformer", t["width"], t["layers"])
    return sd


def _ln(x, sd, p):
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * sd[f"{p}.weight"] + sd[f"{p}.bias"]


def _resblocks(x, sd, prefix, n, heads, mask):
    """open_clip's ResidualAttentionBlock: x + attn(ln_1(x)), then x + mlp(ln_2(x)); attention written out."""
    B, L, W = x.shape
    d = W // heads
    for i in range(n):
        p = f"{prefix}.resblocks.{i}"
        qkv = _ln(x, sd, f"{p}.ln_1") @ sd[f"{p}.attn.in_proj_weight"].T + sd[f"{p}.attn.in_proj_bias"]
        q, k, v = (t.reshape(B, L, heads, d).transpose(1, 2) for t in qkv.split(W, dim=-1))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + mask, dim=-1) @ v
        att = att.transpose(1, 2).reshape(B, L, W)
        x = x + att @ sd[f"{p}.attn.out_proj.weight"].T + sd[f"{p}.attn.out_proj.bias"]
        h = _ln(x, sd, f"{p}.ln_2") @ sd[f"{p}.mlp.c_fc.weight"].T + sd[f"{p}.mlp.c_fc.bias"]
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU (open_clip's nn.GELU)
        x = x + h @ sd[f"{p}.mlp.c_proj.weight"].T + sd[f"{p}.mlp.c_proj.bias"]
    return x


def openclip_image_features(sd, pixels):
    """open_clip VisionTransformer.forward: patches, class token, positions, ln_pre, blocks, ln_post(class) @ proj."""
    sd = {k: v.double() for k, v in sd.items()}
    x = F.conv2d(pixels.double(), sd["visual.conv1.weight"], stride=VISION["patch"])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], dim=1)
    x = x + sd["visual.positional_embedding"]
    x = _resblocks(_ln(x, sd, "visual.ln_pre"), sd, "visual.transformer", VISION["layers"], VISION["heads"], 0.0)
    return _ln(x[:, 0], sd, "visual.ln_post") @ sd["visual.proj"]


def openclip_text_features(sd, ids):
    """open_clip encode_text: tokens + positions, causal blocks, ln_final, the feature at argmax(ids) @ projection."""
    sd = {k: v.double() for k, v in sd.items()}
    L = ids.shape[1]
    causal = torch.full((L, L), float("-inf"), dtype=torch.float64).triu(1)
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][:L]
    x = _ln(_resblocks(x, sd, "transformer", TEXT["layers"], TEXT["heads"], causal), sd, "ln_final")
    return x[torch.arange(len(ids)), ids.argmax(-1)] @ sd["text_projection"]


def openclip_tokens(tok, prompts, context=77):
    """open_clip's tokenize: [sot] + BPE + [eot], cut to `context` with eot last, zero-padded."""
    out = torch.zeros(len(prompts), context, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids = [tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = ids[:context]
        ids[-1] = tok.eos_token_id
        out[i, :len(ids)] = torch.tensor(ids)
    return out


@pytest.fixture(scope="module")
def hps(tmp_path_factory):
    """(folder, open_clip state dict): the random checkpoint saved as HPS ships it (a pickle, the state dict under
    'state_dict', here with DDP's 'module.' prefix), converted by `python -m rewards.convert hpsv2`."""
    d = tmp_path_factory.mktemp("hps")
    sd = openclip_state()
    tiny_processor().save_pretrained(d / "processor")
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 1}, d / "HPS_tiny.pt")
    convert.main(["hpsv2", str(d / "HPS_tiny.pt"), str(d / "hf"), "--processor", str(d / "processor"),
                  "--vision-heads", str(VISION["heads"]), "--text-heads", str(TEXT["heads"])])
    return str(d / "hf"), sd


@pytest.fixture(scope="module")
def hps_set(hps):
    return load_rewards(["hpsv2"], paths={"hpsv2": hps[0]})


def test_hps_key_mapping_gives_open_clip_features(hps):
    """The converted transformers model computes open_clip's image and text features (float64, to rounding)."""
    from transformers import CLIPModel

    folder, sd = hps
    model = CLIPModel.from_pretrained(folder, dtype=torch.float64).eval()
    tok = tiny_processor().tokenizer
    pixels = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    ids = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        txt = model.text_projection(model.text_model(**ids).pooler_output)
    want_img, want_txt = openclip_image_features(sd, pixels), openclip_text_features(sd, openclip_tokens(tok, PROMPTS))
    assert img.shape == want_img.shape == (3, EMBED) and txt.shape == want_txt.shape == (3, EMBED)
    assert torch.allclose(img, want_img, atol=1e-12, rtol=1e-10)
    assert torch.allclose(txt, want_txt, atol=1e-12, rtol=1e-10)
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))
    cfg = model.config
    assert (cfg.vision_config.hidden_act, cfg.text_config.hidden_act) == ("gelu", "gelu")
    assert cfg.text_config.eos_token_id == tok.eos_token_id == 513


def test_hps_score_is_the_cosine_by_hand(hps, hps_set):
    folder, sd = hps
    assert REGISTRY["hpsv2"] == "rewards.hpsv2:HPSv2"
    images = grid_images(3, seed=1)
    s = hps_set.score(images, PROMPTS, [{}] * 3)["hpsv2"]
    img = openclip_image_features(sd, by_hand(images))
    txt = openclip_text_features(sd, openclip_tokens(tiny_processor().tokenizer, PROMPTS))
    want = F.cosine_similarity(img, txt, dim=-1)  # no logit scale
    assert s.dtype == torch.float32 and s.shape == (3,)
    assert torch.allclose(s.double(), want, atol=1e-6, rtol=0), (s, want)
    assert len(set(s.tolist())) == 3


def test_hps_input_pads_instead_of_cropping(hps_set):
    reward = hps_set.rewards["hpsv2"]
    black = (0 - MEAN) / STD  # padding is black before normalisation
    # 16 high, 32 wide: the long side is already 32, so no resize; 8 rows of padding above and below
    wide = grid_images(2, 16, 32, seed=2)
    px = reward.pixels(wide).double()
    assert px.shape == (2, 3, 32, 32)
    assert torch.allclose(px[:, :, 8:24], by_hand(wide), atol=1e-6)
    assert torch.allclose(px[:, :, :8], black.expand(2, 3, 8, 32), atol=1e-6)
    assert torch.allclose(px[:, :, 24:], black.expand(2, 3, 8, 32), atol=1e-6)
    # 64 x 128 of one colour: resized to 16 x 32 (the colour kept), then padded the same way
    colour = torch.tensor([0.2, 0.5, 0.9]).view(1, 3, 1, 1)
    px = reward.pixels(colour.expand(1, 3, 64, 128)).double()
    assert torch.allclose(px[:, :, 8:24], ((colour.double() - MEAN) / STD).expand(1, 3, 16, 32), atol=1e-5)
    assert torch.allclose(px[:, :, :8], black.expand(1, 3, 8, 32), atol=1e-6)
    # 15 x 9, enlarged: 32 x round(9 * 32 / 15) = 32 x 19, padded 6 left and 7 right
    px = reward.pixels(colour.expand(1, 3, 15, 9)).double()
    assert torch.allclose(px[..., 6:25], ((colour.double() - MEAN) / STD).expand(1, 3, 32, 19), atol=1e-5)
    assert torch.allclose(px[..., :6], black.expand(1, 3, 32, 6), atol=1e-6)
    assert torch.allclose(px[..., 25:], black.expand(1, 3, 32, 7), atol=1e-6)


def test_hps_errors_are_one_line(tmp_path):
    msg = one_line(load_rewards, ["hpsv2"], match="reward 'hpsv2': no folder given for its converted weights")
    assert "python -m rewards.convert hpsv2 HPS_v2.1_compressed.pt FOLDER" in msg and "xswu/HPSv2" in msg
    sd = openclip_state()
    del sd["visual.proj"]
    torch.save(sd, tmp_path / "broken.pt")
    one_line(convert.main, ["hpsv2", str(tmp_path / "broken.pt"), str(tmp_path / "out")],
             match=r"^error: not an open_clip ViT CLIP state dict: no 'visual.proj'")
    sd = openclip_state() | {"visual.transformer.resblocks.0.ls_1.gamma": torch.ones(VISION["width"])}
    torch.save(sd, tmp_path / "layer_scale.pt")
    one_line(convert.main, ["hpsv2", str(tmp_path / "layer_scale.pt"), str(tmp_path / "out")],
             match=r"1 key\(s\) left unmapped, e.g. \['visual.transformer.resblocks.0.ls_1.gamma'\]")
    torch.save(openclip_state(), tmp_path / "clean.pt")
    one_line(convert.main, ["hpsv2", str(tmp_path / "clean.pt"), str(tmp_path / "out"), "--text-heads", "5"],
             match="text width 24 is not divisible by 5 heads")


# ---- both ----

@pytest.fixture(scope="module")
def both(aesthetic, hps):
    return load_rewards(["aesthetic", "hpsv2:0.5"], paths={"aesthetic": aesthetic[0], "hpsv2": hps[0]})


def test_videos_score_the_frame_mean(both):
    video = torch.rand(2, 3, 3, 40, 48)  # not the model's size: both resize (aesthetic crops, hps pads)
    prompts = ["a cat", "a dog"]
    s = both.score(video, prompts, [{}, {}])
    for name, reward in both.rewards.items():
        frames = torch.stack([reward(video[:, f], prompts, [{}, {}]) for f in range(3)], 1)
        assert s[name].shape == (2,) and torch.allclose(s[name], frames.mean(1), atol=1e-6), name


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_servers_give_the_in_process_scores(both, aesthetic, hps, tmp_path):
    with contextlib.ExitStack() as stack:
        urls = {name: stack.enter_context(reward_server(name, tmp_path / f"{name}.log", "--reward-path", folder))
                for name, folder in (("aesthetic", aesthetic[0]), ("hpsv2", hps[0]))}
        remote = load_rewards([f"{name}={url}" for name, url in urls.items()])
        images = grid_images(2, seed=3)
        got, want = remote.score(images, PROMPTS[:2], [{}, {}]), both.score(images, PROMPTS[:2], [{}, {}])
        for name in urls:
            assert torch.allclose(got[name], want[name], atol=1e-6, rtol=0), (name, got[name], want[name])
        video = (torch.randint(0, 256, (1, 2, 3, 24, 40)).float() / 255)  # a non-square video, uint8 grid
        got, want = remote.score(video, ["a cat"], [{}]), both.score(video, ["a cat"], [{}])
        for name in urls:
            assert torch.allclose(got[name], want[name], atol=1e-6, rtol=0), (name, got[name], want[name])
