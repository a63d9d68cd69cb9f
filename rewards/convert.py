"""One-off conversions of reward weights that upstream ships only as pickles into the safetensors folders the rewards
load (no reward unpickles anything). Run once, where the files are, then point runs or servers at the folder:

    python -m rewards.convert aesthetic sac+logos+ava1-l14-linearMSE.pth FOLDER [--clip openai/clip-vit-large-patch14]
    python -m rewards.convert hpsv2 HPS_v2.1_compressed.pt FOLDER [--processor laion/CLIP-ViT-H-14-laion2B-s32B-b79K]
    python -m rewards.convert imagereward ImageReward.pt FOLDER [--tokenizer bert-base-uncased]
    accelerate launch grpo.py --reward hpsv2 --reward-paths hpsv2=FOLDER ...

aesthetic: writes FOLDER/aesthetic_head.safetensors (the MLP head, keys as upstream); --clip (a hub id or a local
folder) also saves that CLIP model and processor into FOLDER, so that the reward needs no hub access.
hpsv2: maps open_clip's state dict of a ViT CLIP (HPS's ViT-H-14) onto transformers' CLIPModel layout and writes FOLDER
as a transformers model (config.json, model.safetensors, in the checkpoint's dtype); --processor (a hub id or a local
folder; the laion ViT-H-14 one for HPSv2) saves the processor beside it, which the reward needs.
imagereward: maps ImageReward.pt's BLIP (ViT and BERT with cross-attention) onto transformers'
BlipForImageTextRetrieval and writes FOLDER as that model, its MLP as FOLDER/imagereward_mlp.safetensors, BLIP's
tokenizer (--tokenizer, a hub id or a local folder, plus BLIP's [DEC] and [ENC]) and upstream's image processor.
The pickle is read with torch.load(weights_only=True): tensors and plain containers only, no code runs.
"""
import argparse
import math
import os
import sys

import torch

from rewards.base import RewardError


def load_pickled_state_dict(path: str) -> dict:
    """A torch checkpoint -> its state dict (under 'state_dict' when it holds one; a 'module.' prefix dropped)."""
    if not os.path.isfile(path):
        raise RewardError(f"file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or it holds objects weights_only refuses
        raise RewardError(f"cannot read {path} as a torch checkpoint: {' '.join(str(e).split())[:300]}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise RewardError(f"{path} holds no state dict (a dict of tensors, or one under 'state_dict')")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def convert_aesthetic(src: str, out: str, clip: str | None = None) -> None:
    from safetensors.torch import save_file

    from rewards.aesthetic import HEAD_FILE, check_head

    state = load_pickled_state_dict(src)
    check_head(state, src)
    os.makedirs(out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out, HEAD_FILE), metadata={"format": "pt"})
    if clip is not None:
        from transformers import AutoModel, AutoProcessor

        AutoProcessor.from_pretrained(clip).save_pretrained(out)
        AutoModel.from_pretrained(clip).save_pretrained(out)


# open_clip residual block -> transformers CLIPEncoderLayer (in_proj, the stacked q, k, v, is split apart)
_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def _tower(sd: dict, src: str, dst: str, out: dict) -> int:
    """Map the residual blocks under `src` (e.g. 'visual.transformer.resblocks.') to `dst`; their number."""
    n = 0
    while f"{src}{n}.ln_1.weight" in sd:
        for kind in ("weight", "bias"):
            q, k, v = sd.pop(f"{src}{n}.attn.in_proj_{kind}").chunk(3)
            for name, t in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[f"{dst}{n}.self_attn.{name}.{kind}"] = t
            for old, new in _BLOCK.items():
                out[f"{dst}{n}.{new}.{kind}"] = sd.pop(f"{src}{n}.{old}.{kind}")
        n += 1
    return n


def openclip_to_transformers(state: dict, vision_heads: int = 16, text_heads: int = 16,
                             eos_token_id: int | None = None, bos_token_id: int | None = None):
    """open_clip's state dict of a ViT CLIP (no layer scale, attention pooling or custom text tower: ViT-H-14 and the
    like) -> (transformers CLIPConfig, CLIPModel state dict). The numbers of attention heads are not in the weights
    (ViT-H-14: 16 and 16); the rest of the config is read from the shapes. eos_token_id: the tokenizer's end-of-text
    id (default: the vocabulary's last id, CLIP BPE's <|endoftext|>), where the text feature is taken."""
    from transformers import CLIPConfig

    sd = dict(state)
    sd.pop("attn_mask", None)  # open_clip's causal mask buffer (saved by some versions); transformers builds its own
    out = {}
    try:
        n_vis = _tower(sd, "visual.transformer.resblocks.", "vision_model.encoder.layers.", out)
        n_txt = _tower(sd, "transformer.resblocks.", "text_model.encoder.layers.", out)
        conv = sd.pop("visual.conv1.weight")
        pos = sd.pop("visual.positional_embedding")
        out.update({
            "vision_model.embeddings.patch_embedding.weight": conv,
            "vision_model.embeddings.class_embedding": sd.pop("visual.class_embedding"),
            "vision_model.embeddings.position_embedding.weight": pos,
            "vision_model.pre_layrnorm.weight": sd.pop("visual.ln_pre.weight"),
            "vision_model.pre_layrnorm.bias": sd.pop("visual.ln_pre.bias"),
            "vision_model.post_layernorm.weight": sd.pop("visual.ln_post.weight"),
            "vision_model.post_layernorm.bias": sd.pop("visual.ln_post.bias"),
            # open_clip projects with x @ proj, transformers with a bias-free nn.Linear: x @ weight.T
            "visual_projection.weight": sd.pop("visual.proj").T,
            "text_model.embeddings.token_embedding.weight": sd.pop("token_embedding.weight"),
            "text_model.embeddings.position_embedding.weight": sd.pop("positional_embedding"),
            "text_model.final_layer_norm.weight": sd.pop("ln_final.weight"),
            "text_model.final_layer_norm.bias": sd.pop("ln_final.bias"),
            "text_projection.weight": sd.pop("text_projection").T,
        })
    except KeyError as e:
        raise RewardError(f"not an open_clip ViT CLIP state dict: no {e.args[0]!r}") from None
    # CLIP's initial value where a checkpoint has none (the HPS score does not use it)
    out["logit_scale"] = sd.pop("logit_scale", torch.tensor(math.log(1 / 0.07))).reshape(())
    if sd:
        raise RewardError(f"not an open_clip ViT CLIP of the plain layout: {len(sd)} key(s) left unmapped, e.g. "
                          f"{sorted(sd)[:4]}")
    if n_vis == 0 or n_txt == 0:
        raise RewardError("not an open_clip ViT CLIP state dict: no residual blocks found")
    width, patch = conv.shape[0], conv.shape[-1]
    grid = math.isqrt(pos.shape[0] - 1)
    vocab, text_width = out["text_model.embeddings.token_embedding.weight"].shape
    eos = vocab - 1 if eos_token_id is None else eos_token_id
    bos = eos - 1 if bos_token_id is None else bos_token_id
    vision = dict(hidden_size=width, intermediate_size=out["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                  num_hidden_layers=n_vis, num_attention_heads=vision_heads, image_size=grid * patch,
                  patch_size=patch, hidden_act="gelu")  # open_clip's ViT-H-14 uses nn.GELU (exact), not QuickGELU
    text = dict(hidden_size=text_width, intermediate_size=out["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                num_hidden_layers=n_txt, num_attention_heads=text_heads, vocab_size=vocab,
                max_position_embeddings=out["text_model.embeddings.position_embedding.weight"].shape[0],
                hidden_act="gelu", bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    for w, heads, what in ((width, vision_heads, "vision"), (text_width, text_heads, "text")):
        if w % heads:
            raise RewardError(f"{what} width {w} is not divisible by {heads} heads; give the right number of heads")
    config = CLIPConfig(vision_config=vision, text_config=text, projection_dim=out["visual_projection.weight"].shape[0],
                        logit_scale_init_value=out["logit_scale"].item())
    return config, {k: v.clone().contiguous() for k, v in out.items()}  # clone: q, k, v must not share storage


def _check_layout(config, state: dict, model_cls=None) -> None:
    """The mapped keys and shapes are exactly those of a `model_cls` (default CLIPModel) of `config` (built on the meta
    device: no memory)."""
    from transformers import CLIPModel

    model_cls = model_cls or CLIPModel
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in model_cls(config).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if want != got:
        bad = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
        raise RewardError(f"the converted state dict does not fit transformers' {model_cls.__name__}: {bad[:4]} "
                          f"(expected {[want.get(k) for k in bad[:4]]}, got {[got.get(k) for k in bad[:4]]})")


def convert_hpsv2(src: str, out: str, processor: str | None = None, vision_heads: int = 16,
                  text_heads: int = 16) -> None:
    from safetensors.torch import save_file

    state = load_pickled_state_dict(src)
    tok = None
    if processor is not None:
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(processor)
        tok = proc.tokenizer
    config, mapped = openclip_to_transformers(state, vision_heads, text_heads,
                                              tok.eos_token_id if tok else None, tok.bos_token_id if tok else None)
    _check_layout(config, mapped)
    os.makedirs(out, exist_ok=True)
    config.dtype = str(mapped["vision_model.embeddings.patch_embedding.weight"].dtype).removeprefix("torch.")
    config.save_pretrained(out)
    save_file(mapped, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    if processor is not None:
        proc.save_pretrained(out)


# BLIP's ViT block (timm layout) -> transformers BlipEncoderLayer (qkv stays stacked in the same order)
_VIT_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
              "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def imagereward_to_transformers(state: dict, vision_heads: int = 16, text_heads: int = 12, tokenizer=None):
    """ImageReward.pt's state dict -> (transformers BlipConfig, BlipForImageTextRetrieval state dict, MLP state dict
    keyed layers.*). The numbers of attention heads are not in the weights (ViT-L/16: 16, BERT-base: 12); the rest of
    the config is read from the shapes, the special token ids from `tokenizer` (BLIP's) when given."""
    from transformers import BlipConfig

    from rewards.imagereward import check_mlp

    sd = dict(state)
    mlp = {k.removeprefix("mlp."): sd.pop(k) for k in list(sd) if k.startswith("mlp.")}
    check_mlp(mlp, "the checkpoint's mlp.*")
    # BLIP's BERT keeps an arange position_ids buffer in its state dict; transformers builds its own
    sd.pop("blip.text_encoder.embeddings.position_ids", None)
    out, vit = {}, "blip.visual_encoder."
    try:
        n_vis = 0
        while f"{vit}blocks.{n_vis}.norm1.weight" in sd:
            for old, new in _VIT_BLOCK.items():
                for kind in ("weight", "bias"):
                    dst, src = f"vision_model.encoder.layers.{n_vis}.{new}.{kind}", f"{vit}blocks.{n_vis}.{old}.{kind}"
                    out[dst] = sd.pop(src)
            n_vis += 1
        conv = sd.pop(f"{vit}patch_embed.proj.weight")
        pos = sd.pop(f"{vit}pos_embed")
        out.update({
            "vision_model.embeddings.patch_embedding.weight": conv,
            "vision_model.embeddings.patch_embedding.bias": sd.pop(f"{vit}patch_embed.proj.bias"),
            "vision_model.embeddings.class_embedding": sd.pop(f"{vit}cls_token"),
            "vision_model.embeddings.position_embedding": pos,
            "vision_model.post_layernorm.weight": sd.pop(f"{vit}norm.weight"),  # BLIP's ViT returns norm(all tokens)
            "vision_model.post_layernorm.bias": sd.pop(f"{vit}norm.bias"),
        })
        # BLIP's text encoder already has transformers' BlipTextModel names (both come from BERT)
        for k in [k for k in sd if k.startswith("blip.text_encoder.")]:
            out["text_encoder." + k.removeprefix("blip.text_encoder.")] = sd.pop(k)
        words = out["text_encoder.embeddings.word_embeddings.weight"]
        inter = out["text_encoder.encoder.layer.0.intermediate.dense.weight"]
    except KeyError as e:
        raise RewardError(f"not an ImageReward (BLIP) state dict: no {e.args[0]!r}") from None
    if n_vis == 0:
        raise RewardError("not an ImageReward (BLIP) state dict: no ViT blocks found")
    vocab, text_width = words.shape
    width, patch = conv.shape[0], conv.shape[-1]
    n_txt = 0
    while f"text_encoder.encoder.layer.{n_txt}.attention.self.query.weight" in out:
        n_txt += 1
    # BLIP_Pretrain has no image-text matching head, transformers' retrieval model has one: zeros, never used
    out["itm_head.weight"] = words.new_zeros(2, text_width)
    out["itm_head.bias"] = words.new_zeros(2)
    # BLIP's contrastive projections (to 256): kept when the checkpoint has them, else zeros; the score never uses them
    for proj, n_in in (("vision_proj", width), ("text_proj", text_width)):
        weight, bias = sd.pop(f"blip.{proj}.weight", None), sd.pop(f"blip.{proj}.bias", None)
        out[f"{proj}.weight"] = words.new_zeros(256, n_in) if weight is None else weight
        out[f"{proj}.bias"] = words.new_zeros(256) if bias is None else bias
    if sd:
        raise RewardError(f"not an ImageReward (BLIP) state dict of the known layout: {len(sd)} key(s) left unmapped, "
                          f"e.g. {sorted(sd)[:4]}")
    vision = dict(hidden_size=width, intermediate_size=out["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                  num_hidden_layers=n_vis, num_attention_heads=vision_heads, patch_size=patch,
                  image_size=math.isqrt(pos.shape[1] - 1) * patch,
                  hidden_act="gelu", layer_norm_eps=1e-6)  # BLIP's ViT: nn.GELU (exact), LayerNorm(eps=1e-6)
    ids = {}
    if tokenizer is not None:
        ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   sep_token_id=tokenizer.sep_token_id, eos_token_id=tokenizer.sep_token_id)
    # is_decoder=True only makes transformers build the cross-attention of every layer (BLIP's med config:
    # add_cross_attention); the prompt's self-attention stays bidirectional unless forward is given is_decoder=True
    text = dict(vocab_size=vocab, hidden_size=text_width, intermediate_size=inter.shape[0], num_hidden_layers=n_txt,
                num_attention_heads=text_heads, hidden_act="gelu", layer_norm_eps=1e-12, is_decoder=True,
                max_position_embeddings=out["text_encoder.embeddings.position_embeddings.weight"].shape[0], **ids)
    for w, heads, what in ((width, vision_heads, "vision"), (text_width, text_heads, "text")):
        if w % heads:
            raise RewardError(f"{what} width {w} is not divisible by {heads} heads; give the right number of heads")
    proj = out["vision_proj.weight"].shape[0]
    config = BlipConfig(vision_config=vision, text_config=text, image_text_hidden_size=proj, projection_dim=proj)
    config.architectures = ["BlipForImageTextRetrieval"]
    return config, {k: v.contiguous() for k, v in out.items()}, {k: v.contiguous() for k, v in mlp.items()}


def convert_imagereward(src: str, out: str, tokenizer: str = "bert-base-uncased", vision_heads: int = 16,
                        text_heads: int = 12) -> None:
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, BlipForImageTextRetrieval, CLIPImageProcessor
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    from rewards.imagereward import MLP_FILE

    state = load_pickled_state_dict(src)
    tok = AutoTokenizer.from_pretrained(tokenizer)
    # BLIP's tokenizer: bert-base-uncased plus a [DEC] bos token and an [ENC] token (ids 30522 and 30523)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    config, mapped, mlp = imagereward_to_transformers(state, vision_heads, text_heads, tok)
    if len(tok) != config.text_config.vocab_size:
        raise RewardError(f"the tokenizer {tokenizer!r} has {len(tok)} tokens with BLIP's [DEC] and [ENC], the "
                          f"checkpoint's text encoder {config.text_config.vocab_size}; ImageReward's is "
                          "bert-base-uncased")
    _check_layout(config, mapped, BlipForImageTextRetrieval)
    os.makedirs(out, exist_ok=True)
    config.dtype = str(mapped["vision_model.embeddings.patch_embedding.weight"].dtype).removeprefix("torch.")
    config.save_pretrained(out)
    save_file(mapped, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    save_file(mlp, os.path.join(out, MLP_FILE), metadata={"format": "pt"})
    tok.save_pretrained(out)
    # upstream's transform: shortest side to the ViT's size (bicubic), centre crop, OpenAI CLIP mean and std
    size = config.vision_config.image_size
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                       image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD).save_pretrained(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m rewards.convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("aesthetic", help="LAION aesthetic head (.pth) -> FOLDER/aesthetic_head.safetensors")
    a.add_argument("src"), a.add_argument("out")
    a.add_argument("--clip", help="also save this CLIP model and processor (hub id or folder) into the folder")
    h = sub.add_parser("hpsv2", help="HPSv2(.1) open_clip checkpoint (.pt) -> transformers CLIPModel folder")
    h.add_argument("src"), h.add_argument("out")
    h.add_argument("--processor", help="save this CLIP processor (hub id or folder) into the folder; HPSv2's is "
                                       "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    h.add_argument("--vision-heads", type=int, default=16, help="attention heads of the image tower (ViT-H-14: 16)")
    h.add_argument("--text-heads", type=int, default=16, help="attention heads of the text tower (ViT-H-14: 16)")
    r = sub.add_parser("imagereward", help="ImageReward.pt (BLIP + MLP) -> transformers BlipForImageTextRetrieval "
                                           "folder")
    r.add_argument("src"), r.add_argument("out")
    r.add_argument("--tokenizer", default="bert-base-uncased", help="BERT tokenizer (hub id or folder) that BLIP's "
                                                                    "[DEC] and [ENC] are added to (bert-base-uncased)")
    r.add_argument("--vision-heads", type=int, default=16, help="attention heads of the ViT (ViT-L/16: 16)")
    r.add_argument("--text-heads", type=int, default=12, help="attention heads of the text encoder (BERT-base: 12)")
    args = p.parse_args(argv)
    try:
        if args.what == "aesthetic":
            convert_aesthetic(args.src, args.out, args.clip)
        elif args.what == "hpsv2":
            convert_hpsv2(args.src, args.out, args.processor, args.vision_heads, args.text_heads)
        else:
            convert_imagereward(args.src, args.out, args.tokenizer, args.vision_heads, args.text_heads)
    except (OSError, ValueError) as e:  # RewardError, or a processor or CLIP model that cannot be loaded
        sys.exit(f"error: {' '.join(str(e).split())}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
