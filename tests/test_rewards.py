"""Tests for rewards/: specs, registry, JPEG, PickScore / CLIP through their real loading path, RewardSet."""
import pytest
import torch

from rewards import REGISTRY, RewardError, RewardSet, check_specs, load_rewards, parse_spec
from rewards.pickscore import PickScoreRank


# ---- custom rewards, reached by dotted path (tests.test_rewards.X) ----

class ConstReward:
    """Duck-typed custom reward (not a Reward subclass): constant 1."""

    def __call__(self, images, prompts, metadata):
        return torch.ones(images.shape[0])

    def group_transform(self, scores):
        return scores


class NanReward(ConstReward):
    def __call__(self, images, prompts, metadata):
        s = torch.ones(images.shape[0])
        s[1] = float("nan")
        return s


class WrongShapeReward(ConstReward):
    def __call__(self, images, prompts, metadata):
        return torch.ones(images.shape[0], 2)


def brightness(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3))


def make_const():
    return ConstReward()


NOT_CALLABLE = 3


def one_line_error(fn, *args, match, **kwargs):
    with pytest.raises(RewardError, match=match) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


# ---- specs ----

def test_parse_spec():
    assert parse_spec("pickscore") == ("pickscore", 1.0)
    assert parse_spec(" PickScore_Rank:0.5 ") == ("pickscore_rank", 0.5)
    assert parse_spec("clip:-2") == ("clip", -2.0)
    assert parse_spec("tests.test_rewards.ConstReward:3") == ("tests.test_rewards.ConstReward", 3.0)
    assert parse_spec("tests.test_rewards.ConstReward") == ("tests.test_rewards.ConstReward", 1.0)
    assert parse_spec("tests.test_rewards:ConstReward") == ("tests.test_rewards:ConstReward", 1.0)
    for bad in ["pickscore:abc", "pickscore:", "clip:nan", "clip:inf"]:
        one_line_error(parse_spec, bad, match="bad weight")
    for bad in ["", "  ", ":1"]:
        one_line_error(parse_spec, bad, match="empty")


def test_check_specs_ok():
    check_specs(["PickScore", "clip:0.5", "JPEG_compressibility:2", "tests.test_rewards.ConstReward:0.1",
                 "tests.test_rewards.brightness", "tests.test_rewards:make_const"])


def test_check_specs_errors():
    msg = one_line_error(check_specs, ["foo"], match="unknown reward 'foo'")
    assert "known: " + ", ".join(sorted(REGISTRY)) in msg and "dotted path" in msg
    one_line_error(check_specs, ["pickscore", "PickScore:2"], match="given twice")
    one_line_error(check_specs, ["pickscore:x"], match="bad weight")
    one_line_error(check_specs, ["nosuch_pkg.mod.Reward"], match="cannot import module 'nosuch_pkg.mod'")
    one_line_error(check_specs, ["tests.test_rewards.Nope"], match="no attribute 'Nope'")
    one_line_error(check_specs, ["tests.test_rewards.NOT_CALLABLE"], match="not callable")
    one_line_error(check_specs, [], match="no reward")


# ---- JPEG ----

def test_jpeg_flat_beats_noise_and_video_is_frame_mean():
    torch.manual_seed(0)
    flat, noise = torch.full((1, 3, 64, 64), 0.5), torch.rand(1, 3, 64, 64)
    images = torch.cat([flat, noise])
    rs = load_rewards(["jpeg_compressibility", "jpeg_incompressibility:0.5"])
    s = rs.score(images, ["a", "b"], [{}, {}])
    comp, incomp = s["jpeg_compressibility"], s["jpeg_incompressibility"]
    assert comp.dtype == torch.float32 and comp.shape == (2,)
    assert comp[0] > comp[1] and torch.equal(incomp, -comp) and (incomp > 0).all()
    assert rs.weights == {"jpeg_compressibility": 1.0, "jpeg_incompressibility": 0.5}
    assert not rs.is_groupwise("jpeg_compressibility")
    video = torch.stack([torch.stack([flat[0], noise[0]]), torch.stack([noise[0], noise[0]])])  # (2, F=2, 3, H, W)
    v = rs.rewards["jpeg_compressibility"](video, ["a", "b"], [{}, {}])
    assert torch.allclose(v, torch.stack([(comp[0] + comp[1]) / 2, comp[1]]))


# ---- PickScore / CLIP with a tiny random CLIP saved to disk ----

@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    text = dict(common, vocab_size=514, max_position_embeddings=77,
                bos_token_id=512, eos_token_id=513, pad_token_id=513)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=dict(common, image_size=32, patch_size=8),
                                 projection_dim=16))
    d = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(d)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def clip_set(tiny_clip_dir):
    return load_rewards(["pickscore", "clip:0.5"], paths={"PickScore": tiny_clip_dir, "clip": tiny_clip_dir})


def reference_logits(reward, images, prompts):
    """logit_scale.exp() * cos(image, text) per pair, via CLIPModel.forward on the loaded model."""
    proc = reward.processor
    pixels = proc(images=images, do_rescale=False, return_tensors="pt")["pixel_values"]
    text = proc.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = reward.model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=pixels)
    return out.logits_per_image.diagonal(), reward.model.logit_scale.exp().item()


def test_pickscore_and_clip_match_reference(clip_set):
    torch.manual_seed(1)
    images, prompts = torch.rand(3, 3, 40, 48), ["a red cat", "a blue dog on the moon", "x " * 100]
    s = clip_set.score(images, prompts, [{}] * 3)
    assert clip_set.names == ["pickscore", "clip"] and clip_set.weights == {"pickscore": 1.0, "clip": 0.5}
    for name in clip_set.names:
        assert s[name].shape == (3,) and s[name].dtype == torch.float32
    logits, scale = reference_logits(clip_set.rewards["pickscore"], images, prompts)
    assert torch.allclose(s["pickscore"], logits / 26, atol=1e-5)
    logits, scale = reference_logits(clip_set.rewards["clip"], images, prompts)
    assert torch.allclose(s["clip"], logits / scale, atol=1e-5)
    assert (s["clip"].abs() <= 1).all() and len(set(s["clip"].tolist())) == 3


def test_clip_video_is_frame_mean(clip_set):
    torch.manual_seed(2)
    video, prompts = torch.rand(2, 3, 3, 32, 32), ["a cat", "a dog"]
    for name, reward in clip_set.rewards.items():
        v = reward(video, prompts, [{}, {}])
        frames = torch.stack([reward(video[:, f], prompts, [{}, {}]) for f in range(3)], 1)
        assert v.shape == (2,) and torch.allclose(v, frames.mean(1), atol=1e-5), name


def test_hub_load_failure_names_reward_id_and_path_override(monkeypatch):
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", offline)
    msg = one_line_error(load_rewards, ["pickscore"], match="reward 'pickscore'")
    assert "laion/CLIP-ViT-H-14-laion2B-s32B-b79K" in msg and "path override" in msg
    one_line_error(load_rewards, ["clip"], paths={"clip": "/nonexistent/folder"}, match="not a folder")
    one_line_error(load_rewards, ["clip"], paths={"clipp": "/x"}, match="path override for unknown reward 'clipp'")


# ---- PickScore_Rank ----

def test_pickscore_rank_group_transform():
    rank = PickScoreRank.__new__(PickScoreRank)  # group_transform needs no weights
    assert rank.groupwise
    torch.manual_seed(3)
    G, K = 5, 8
    scores = torch.randn(G, K)
    r = rank.group_transform(scores)
    assert torch.equal(r.sort(dim=1).values, (torch.arange(K) / K).expand(G, K))
    for g in range(G):  # ranks order the samples exactly as the scores do
        assert torch.equal(r[g].argsort(), scores[g].argsort())
    rs = RewardSet({"pickscore_rank": rank}, {"pickscore_rank": 1.0})
    assert rs.is_groupwise("pickscore_rank") and torch.equal(rs.group_transform("pickscore_rank", scores), r)


# ---- RewardSet with custom rewards ----

def test_custom_rewards_and_weights():
    rs = load_rewards(["tests.test_rewards.ConstReward:0.25", "tests.test_rewards.brightness:2",
                       "tests.test_rewards:make_const"])
    assert rs.weights == {"tests.test_rewards.ConstReward": 0.25, "tests.test_rewards.brightness": 2.0,
                          "tests.test_rewards:make_const": 1.0}
    images = torch.rand(2, 3, 8, 8)
    s = rs.score(images, ["a", "b"], [{}, {}])
    assert torch.equal(s["tests.test_rewards.ConstReward"], torch.ones(2))
    assert torch.allclose(s["tests.test_rewards.brightness"], images.mean(dim=(1, 2, 3)))
    scores = torch.randn(3, 4)
    assert torch.equal(rs.group_transform("tests.test_rewards.brightness", scores), scores)
    assert not any(rs.is_groupwise(n) for n in rs.names)


def test_reward_set_rejects_bad_scores():
    images, prompts = torch.rand(3, 3, 8, 8), ["ok", "the bad one", "ok too"]
    rs = load_rewards(["tests.test_rewards.NanReward"])
    msg = one_line_error(rs.score, images, prompts, [{}] * 3,
                         match="reward 'tests.test_rewards.NanReward' returned non-finite values for prompts")
    assert "the bad one" in msg and "ok too" not in msg
    rs = load_rewards(["tests.test_rewards.WrongShapeReward"])
    one_line_error(rs.score, images, prompts, [{}] * 3, match=r"returned shape \(3, 2\), expected \(3,\)")
