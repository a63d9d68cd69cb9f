"""The imagereward reward on a tiny random ImageReward (BLIP ViT + BERT with cross-attention + MLP) written in
upstream's checkpoint layout (a pickled state dict, keys blip.visual_encoder.*, blip.text_encoder.*, mlp.layers.*) and
converted by `python -m rewards.convert imagereward`. The reference is a plain-torch float64 forward of upstream's
layout written here (BLIP's timm ViT, BLIP's BERT with cross-attention, the MLP, the normalisation), so the BLIP ->
transformers key mapping is checked on the first-token feature and on the score. Also: [CLS] (not [ENC]) first, 35
tokens, the resize-and-crop input, videos as the frame mean, the one-line errors, and a reward server giving the
in-process scores."""
import math

import pytest
import torch
import torch.nn.functional as F

from rewards import REGISTRY, load_rewards
from rewards import convert
from tests.helpers import reward_server
from tests.test_clip_rewards import MEAN, STD, by_hand, grid_images, one_line  # OpenAI CLIP's mean and std

VISION = dict(width=32, layers=2, heads=4, patch=8, image=32)
TEXT = dict(width=768, layers=2, heads=12, inter=64, positions=40)  # 768: the MLP's input, as BERT-base's
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cat", "blue", "dog", "on", "the", "moon", "x"]
PROMPTS = ["a red cat", "a blue dog on the moon", "x " * 100]  # the last one is truncated to 35 tokens


def bert_tokenizer():
    """A tiny BERT WordPiece tokenizer with BLIP's two added tokens, as upstream's init_tokenizer."""
    from transformers import BertTokenizer

    tok = BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def upstream_state(seed=0):
    """A random ImageReward state dict in upstream's key layout (BLIP_Pretrain under blip., the MLP under mlp.)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    def lin(p, n_in, n_out):
        return {f"{p}.weight": rnd(n_out, n_in, scale=n_in ** -0.5), f"{p}.bias": rnd(n_out, scale=0.1)}

    def norm(p, w):
        return {f"{p}.weight": 1 + rnd(w, scale=0.1), f"{p}.bias": rnd(w, scale=0.1)}

    v, t, vw = VISION, TEXT, VISION["width"]
    vit = "blip.visual_encoder"
    sd = {f"{vit}.patch_embed.proj.weight": rnd(vw, 3, v["patch"], v["patch"], scale=0.1),
          f"{vit}.patch_embed.proj.bias": rnd(vw, scale=0.1), f"{vit}.cls_token": rnd(1, 1, vw, scale=0.5),
          f"{vit}.pos_embed": rnd(1, (v["image"] // v["patch"]) ** 2 + 1, vw, scale=0.5)}
    sd |= norm(f"{vit}.norm", vw)
    for i in range(v["layers"]):
        b = f"{vit}.blocks.{i}"
        sd |= norm(f"{b}.norm1", vw) | norm(f"{b}.norm2", vw) | lin(f"{b}.attn.qkv", vw, 3 * vw)
        sd |= lin(f"{b}.attn.proj", vw, vw) | lin(f"{b}.mlp.fc1", vw, 4 * vw) | lin(f"{b}.mlp.fc2", 4 * vw, vw)
    te, tw = "blip.text_encoder", t["width"]
    sd |= {f"{te}.embeddings.word_embeddings.weight": rnd(len(WORDS) + 2, tw, scale=0.5),
           f"{te}.embeddings.position_embeddings.weight": rnd(t["positions"], tw, scale=0.5),
           f"{te}.embeddings.position_ids": torch.arange(t["positions"]).expand(1, -1)}  # med's persistent buffer
    sd |= norm(f"{te}.embeddings.LayerNorm", tw)
    for i in range(t["layers"]):
        p = f"{te}.encoder.layer.{i}"
        for att, kv_in in (("attention", tw), ("crossattention", vw)):
            sd |= lin(f"{p}.{att}.self.query", tw, tw) | lin(f"{p}.{att}.self.key", kv_in, tw)
            sd |= lin(f"{p}.{att}.self.value", kv_in, tw) | lin(f"{p}.{att}.output.dense", tw, tw)
            sd |= norm(f"{p}.{att}.output.LayerNorm", tw)
        sd |= lin(f"{p}.intermediate.dense", tw, t["inter"]) | lin(f"{p}.output.dense", t["inter"], tw)
        sd |= norm(f"{p}.output.LayerNorm", tw)
    sd |= lin("blip.vision_proj", vw, 256) | lin("blip.text_proj", tw, 256)
    for i, n_in, n_out in ((0, 768, 1024), (2, 1024, 128), (4, 128, 64), (6, 64, 16), (7, 16, 1)):
        sd |= lin(f"mlp.layers.{i}", n_in, n_out)
    return sd


def _ln(x, sd, p, eps):
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * sd[f"{p}.weight"] + sd[f"{p}.bias"]


def _gelu(x):  # exact GELU (nn.GELU of BLIP's ViT, "gelu" of its BERT)
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _attend(q, k, v, heads, mask=0.0):
    B, Lq, W = q.shape
    d = W // heads
    q, k, v = (t.reshape(B, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + mask, dim=-1) @ v
    return att.transpose(1, 2).reshape(B, Lq, W)


def _linear(x, sd, p):
    return x @ sd[f"{p}.weight"].T + sd[f"{p}.bias"]


def upstream_vit(sd, pixels):
    """BLIP's VisionTransformer.forward: patches, cls token, positions, pre-norm blocks (LayerNorm eps 1e-6), norm."""
    vit = "blip.visual_encoder"
    x = F.conv2d(pixels, sd[f"{vit}.patch_embed.proj.weight"], sd[f"{vit}.patch_embed.proj.bias"],
                 stride=VISION["patch"]).flatten(2).transpose(1, 2)
    x = torch.cat([sd[f"{vit}.cls_token"].expand(len(x), 1, -1), x], 1) + sd[f"{vit}.pos_embed"]
    for i in range(VISION["layers"]):
        b = f"{vit}.blocks.{i}"
        q, k, v = _linear(_ln(x, sd, f"{b}.norm1", 1e-6), sd, f"{b}.attn.qkv").chunk(3, dim=-1)
        x = x + _linear(_attend(q, k, v, VISION["heads"]), sd, f"{b}.attn.proj")
        h = _gelu(_linear(_ln(x, sd, f"{b}.norm2", 1e-6), sd, f"{b}.mlp.fc1"))
        x = x + _linear(h, sd, f"{b}.mlp.fc2")
    return _ln(x, sd, f"{vit}.norm", 1e-6)


def upstream_first_token(sd, ids, mask, image_embeds):
    """BLIP's med BertModel in multimodal mode: per layer self-attention (padding masked with -10000), cross-attention
    to every image token, feed-forward, each post-norm (eps 1e-12); the last hidden state at position 0."""
    te = "blip.text_encoder"
    x = sd[f"{te}.embeddings.word_embeddings.weight"][ids] + sd[f"{te}.embeddings.position_embeddings.weight"][
        :ids.shape[1]]
    x = _ln(x, sd, f"{te}.embeddings.LayerNorm", 1e-12)
    pad = (1.0 - mask.double())[:, None, None, :] * -10000.0
    for i in range(TEXT["layers"]):
        p = f"{te}.encoder.layer.{i}"
        for att, kv, m in (("attention", x, pad), ("crossattention", image_embeds, 0.0)):
            q, k, v = (_linear(src, sd, f"{p}.{att}.self.{n}") for src, n in ((x, "query"), (kv, "key"), (kv, "value")))
            x = _ln(_linear(_attend(q, k, v, TEXT["heads"], m), sd, f"{p}.{att}.output.dense") + x, sd,
                    f"{p}.{att}.output.LayerNorm", 1e-12)
        h = _linear(_gelu(_linear(x, sd, f"{p}.intermediate.dense")), sd, f"{p}.output.dense")
        x = _ln(h + x, sd, f"{p}.output.LayerNorm", 1e-12)
    return x[:, 0]


def upstream_score(sd, pixels, prompts):
    sd = {k: v.double() for k, v in sd.items()}
    text = bert_tokenizer()(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    h = upstream_first_token(sd, text["input_ids"], text["attention_mask"], upstream_vit(sd, pixels.double()))
    for i in (0, 2, 4, 6, 7):  # nn.Sequential without activations; the dropouts are identities at inference
        h = _linear(h, sd, f"mlp.layers.{i}")
    return (h.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072




@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(folder, upstream state dict, conversion flags): the pickle converted by the command line, with the tiny
    tokenizer's folder as --tokenizer."""
    from transformers import BertTokenizer

    d = tmp_path_factory.mktemp("imagereward")
    BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(d / "bert")
    sd = upstream_state()
    torch.save(sd, d / "ImageReward.pt")
    flags = ["--tokenizer", str(d / "bert"), "--vision-heads", str(VISION["heads"]), "--text-heads", str(TEXT["heads"])]
    convert.main(["imagereward", str(d / "ImageReward.pt"), str(d / "hf"), *flags])
    return str(d / "hf"), sd, flags


@pytest.fixture(scope="module")
def rewards(converted):
    return load_rewards(["imagereward"], paths={"imagereward": converted[0]})


def test_key_mapping_gives_upstream_features(converted):
    """The converted transformers model computes upstream's first-token feature (float64, to rounding); the tokens
    start with [CLS] (upstream scores the plain tokenizer output, no [ENC] swap) and stop at 35."""
    from transformers import AutoTokenizer, BlipForImageTextRetrieval

    folder, sd, _ = converted
    model = BlipForImageTextRetrieval.from_pretrained(folder, dtype=torch.float64).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    text = tok(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    want_text = bert_tokenizer()(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert torch.equal(text["input_ids"], want_text["input_ids"]) and text["input_ids"].shape == (3, 35)
    assert (text["input_ids"][:, 0] == WORDS.index("[CLS]")).all() and text["attention_mask"][2].all()
    assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(WORDS), len(WORDS) + 1]
    pixels = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        img = model.vision_model(pixel_values=pixels).last_hidden_state
        h = model.text_encoder(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                               encoder_hidden_states=img).last_hidden_state[:, 0]
    sd64 = {k: v.double() for k, v in sd.items()}
    want_img = upstream_vit(sd64, pixels)
    want_h = upstream_first_token(sd64, want_text["input_ids"], want_text["attention_mask"], want_img)
    assert torch.allclose(img, want_img, atol=1e-12, rtol=1e-10)
    assert torch.allclose(h, want_h, atol=1e-10, rtol=1e-10)
    assert model.config.vision_config.layer_norm_eps == 1e-6 and model.config.text_config.layer_norm_eps == 1e-12
    assert not model.itm_head.weight.any()  # not part of ImageReward


def test_score_equals_upstream_by_hand(converted, rewards):
    folder, sd, _ = converted
    assert REGISTRY["imagereward"] == "rewards.imagereward:ImageReward"
    images = grid_images(3, seed=1)
    s = rewards.score(images, PROMPTS, [{}] * 3)["imagereward"]
    want = upstream_score(sd, by_hand(images), PROMPTS)
    assert s.dtype == torch.float32 and s.shape == (3,)
    assert torch.allclose(s.double(), want, atol=1e-5, rtol=0), (s, want)
    assert len(set(s.tolist())) == 3
    # the prompt matters (cross-attention from the prompt's tokens), and so does the image
    other = rewards.score(images, ["a cat"] * 3, [{}] * 3)["imagereward"]
    assert torch.allclose(other.double(), upstream_score(sd, by_hand(images), ["a cat"] * 3), atol=1e-5, rtol=0)
    assert (other - s).abs().min() > 1e-4


def test_input_resizes_the_short_side_and_crops_the_centre(rewards):
    reward = rewards.rewards["imagereward"]
    wide = grid_images(2, 32, 48, seed=2)  # the short side is already 32: only the crop, columns 8 to 40
    assert torch.allclose(reward.pixels(wide).double(), by_hand(wide[..., 8:40]), atol=1e-6)
    colour = torch.tensor([51.0, 128.0, 230.0]).view(1, 3, 1, 1) / 255  # on the uint8 grid, as everything scored
    px = reward.pixels(colour.expand(1, 3, 96, 64)).double()  # resized to 48 x 32, then cropped
    assert px.shape == (1, 3, 32, 32)
    assert torch.allclose(px, ((colour.double() - MEAN) / STD).expand(1, 3, 32, 32), atol=1e-5)


def test_errors_are_one_line(converted, tmp_path):
    from transformers import BertTokenizer

    msg = one_line(load_rewards, ["imagereward"],
                   match="reward 'imagereward': no folder given for its converted weights")
    assert "python -m rewards.convert imagereward ImageReward.pt FOLDER --tokenizer bert-base-uncased" in msg
    assert "THUDM/ImageReward" in msg and "--reward-paths imagereward=FOLDER" in msg
    one_line(load_rewards, ["imagereward"], paths={"imagereward": str(tmp_path)},
             match="has no imagereward_mlp.safetensors; convert ImageReward.pt")
    _, sd, flags = converted

    def refused(state, match, *extra):
        torch.save(state, tmp_path / "bad.pt")
        one_line(convert.main, ["imagereward", str(tmp_path / "bad.pt"), str(tmp_path / "out"), *flags, *extra],
                 match=match)

    refused({k: v for k, v in sd.items() if k != "blip.visual_encoder.cls_token"},
            r"^error: not an ImageReward \(BLIP\) state dict: no 'blip.visual_encoder.cls_token'")
    refused(sd | {"blip.itm_head.weight": torch.zeros(2, 768)},
            r"1 key\(s\) left unmapped, e.g. \['blip.itm_head.weight'\]")
    refused({k: v[:, :-1] if k == "mlp.layers.2.weight" else v for k, v in sd.items()},
            r"reward 'imagereward': the checkpoint's mlp.\*: layers.2 has weight \(128, 1023\)")
    other_mlp = {k: v for k, v in sd.items() if not k.startswith("mlp.")} | {"mlp.layers.3.weight": torch.zeros(1)}
    refused(other_mlp, r"is not ImageReward's MLP \(keys missing: \['layers.0.bias'")
    BertTokenizer(vocab={w: i for i, w in enumerate(WORDS[:5])}).save_pretrained(tmp_path / "small")
    refused(sd, r"^error: the tokenizer .* has 7 tokens with BLIP's \[DEC\] and \[ENC\], the checkpoint's text "
                r"encoder 16", "--tokenizer", str(tmp_path / "small"))  # the last --tokenizer wins
    assert not (tmp_path / "out").exists()  # nothing written by a refused conversion
    # a checkpoint without BLIP's contrastive projections (unused by the score) converts, with zeros in their place
    no_proj = {k: v for k, v in sd.items() if not k.startswith(("blip.vision_proj.", "blip.text_proj."))}
    torch.save(no_proj, tmp_path / "no_proj.pt")
    convert.main(["imagereward", str(tmp_path / "no_proj.pt"), str(tmp_path / "no_proj"), *flags])
    images = grid_images(2, seed=5)
    rs = load_rewards(["imagereward"], paths={"imagereward": str(tmp_path / "no_proj")})
    s = rs.score(images, PROMPTS[:2], [{}] * 2)["imagereward"]
    assert torch.allclose(s.double(), upstream_score(sd, by_hand(images), PROMPTS[:2]), atol=1e-5, rtol=0)


def test_videos_and_server_give_the_in_process_scores(converted, rewards, tmp_path):
    video = grid_images(2 * 3, 40, 48, seed=3).view(2, 3, 3, 40, 48)  # not the model's size: resized and cropped
    prompts = ["a red cat", "a dog"]
    s = rewards.score(video, prompts, [{}, {}])["imagereward"]
    reward = rewards.rewards["imagereward"]
    frames = torch.stack([reward(video[:, f], prompts, [{}, {}]) for f in range(3)], 1)
    assert s.shape == (2,) and torch.allclose(s, frames.mean(1), atol=1e-6)
    with reward_server("imagereward", tmp_path / "server.log", "--reward-path", converted[0]) as url:
        remote = load_rewards([f"imagereward={url}"])
        images = grid_images(3, seed=4)
        got = remote.score(images, PROMPTS, [{}] * 3)["imagereward"]
        want = rewards.score(images, PROMPTS, [{}] * 3)["imagereward"]
        assert torch.allclose(got, want, atol=1e-6, rtol=0), (got, want)
        assert torch.allclose(remote.score(video, prompts, [{}, {}])["imagereward"], s, atol=1e-6, rtol=0)
