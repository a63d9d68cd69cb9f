"""Download-free tiny components shared by the tiny model builds (docs/models.md section 5).

Every interface number of the real models is kept (VAE x8 compression, 16 latent channels, token-id
conventions); only widths and depths shrink, so the adapters run the same code path as real weights.
"""
import string

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

_BYTES = list(bytes_to_unicode().values())  # 256 printable stand-ins, one per byte


def clip_tokenizer(max_length=77, words=()):
    """Byte-level BPE, one token per byte ('</w>' marks a word end); each of `words` (lower-case ASCII)
    also becomes one token through a chain of merges."""
    vocab = {c: i for i, c in enumerate(_BYTES)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(_BYTES)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    merges = []
    # longest words first: BPE applies the lowest-ranked merge first, so a longer word's chain
    # ("t r", "tr i", ...) is not cut by a shorter word's merge ("a n" of "and" inside "triangle")
    for word in sorted(set(words), key=lambda w: (-len(w), w)):
        parts, merged = list(word[:-1]) + [word[-1] + "</w>"], word[0]
        for part in parts[1:]:
            if (merged, part) not in merges:
                merges.append((merged, part))
            merged += part
            vocab.setdefault(merged, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def t5_tokenizer(max_length=512, words=()):
    """Unigram vocab: specials, the word-boundary piece, printable characters with and without it; each of
    `words` is also one piece, scored above any spelling of it in characters."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for ch in string.ascii_letters + string.digits + string.punctuation:
        pieces += [(ch, -3.0), ("\u2581" + ch, -2.5)]
    pieces += [("\u2581" + w, -1.0) for w in sorted(set(words))]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def clip_text_encoder(tok, hidden=32, seed=0, cls=CLIPTextModel, **extra):
    torch.manual_seed(seed)
    # pooling takes the first eos id, so eos must be the tokenizer's own (513), not CLIP's legacy 2
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                         hidden_act="quick_gelu", bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **extra)
    return cls(cfg).eval()


def t5_encoder(tok, d_model=32, seed=0):
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=len(tok), d_model=d_model, d_kv=d_model // 4, d_ff=2 * d_model, num_layers=2,
                   num_heads=4, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   decoder_start_token_id=tok.pad_token_id)
    return T5EncoderModel(cfg).eval()


def kl_vae_8x(scaling_factor, shift_factor, latent_channels=16, width=8, seed=0):
    """AutoencoderKL with 4 levels, so vae_scale_factor is 8 as in the real FLUX/SD3 VAEs."""
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(width,) * 4,
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4, sample_size=64,
                         use_quant_conv=False, use_post_quant_conv=False, scaling_factor=scaling_factor,
                         shift_factor=shift_factor).eval()


QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
# a small Qwen chat template: string or [{type: text|image}] content, and the enable_thinking switch
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }}{% else %}<|vision_start|><|image_pad|><|vision_end|>{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def qwen2_tokenizer(max_length=32768):
    """Byte-level Qwen2 tokenizer (one token per byte) with the Qwen special tokens and a chat template."""
    from transformers import Qwen2Tokenizer
    tok = Qwen2Tokenizer(vocab={c: i for i, c in enumerate(_BYTES)}, merges=[], model_max_length=max_length)
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS})
    tok.add_tokens(["<think>", "</think>"])
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{% for c in m['content'] %}{{ c['text'] }}{% endfor %}"
    "[/SYSTEM_PROMPT]{% else %}[INST]{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
    "{% else %}[IMG]{% endif %}{% endfor %}[/INST]{% endif %}{% endfor %}")


def mistral_tokenizer(max_length=131072):
    """Byte-level fast tokenizer with Mistral's control tokens and a chat template (FLUX.2's text encoder)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    t = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(_BYTES)}, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    t.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, model_max_length=max_length, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": ["[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                                                          "[IMG]"]})
    tok.chat_template = MISTRAL_CHAT_TEMPLATE
    return tok
