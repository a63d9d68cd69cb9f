"""OCR reward (the formula of Flow-GRPO and DiffusionNFT): how closely the text read in the image matches the text
the prompt asks for.

target = the text between the first pair of double quotes (") in the prompt, or the dataset row's `text` key when it
has one; whitespace is removed from the target and from the recognised text, and both are lower-cased. The distance
d is 0 when the target occurs in the recognised text, else min(Levenshtein(recognised, target), len(target)), and
reward = 1 - d / len(target), in [0, 1]. An image where nothing is read scores 0.

The engine is RapidOCR on ONNX Runtime, on the CPU whatever the run's device: its wheel ships the PP-OCR detection
and recognition models, so nothing is downloaded. An optional install: `pip install -r requirements-extras.txt`.
Videos score the mean over their frames.
"""
import re

import numpy as np
import torch

from rewards.base import Reward, RewardError, over_frames

EXTRAS = "pip install -r requirements-extras.txt (rapidocr, onnxruntime, rapidfuzz)"
QUOTED = re.compile(r'"(.*?)"', re.S)


def normalise(text: str) -> str:
    """Whitespace removed, lower-cased: the form both sides are compared in."""
    return "".join(text.split()).lower()


def target_text(prompt: str, metadata: dict | None = None) -> str:
    """The text an image for `prompt` should show (normalised): the row's `text` key (unless null), else the
    prompt's first double-quoted text. RewardError (one line naming the prompt) when there is neither, or it is
    empty."""
    raw = (metadata or {}).get("text")  # a null text is no text key
    if raw is not None:
        where = "its row's 'text' key"
        if not isinstance(raw, str):
            raise RewardError(f"reward 'ocr': the 'text' key of prompt {prompt!r} is a {type(raw).__name__}, "
                              "expected a string")
    else:
        m = QUOTED.search(prompt)
        if m is None:
            raise RewardError(f"reward 'ocr': prompt {prompt!r} has no text in double quotes (and its row no 'text' "
                              'key); write the text to render as "..." in the prompt or give the row a \'text\' key')
        raw, where = m.group(1), "its quoted text"
    target = normalise(raw)
    if not target:
        raise RewardError(f"reward 'ocr': prompt {prompt!r}: {where} is empty (after removing whitespace)")
    return target


def text_score(recognised: str, target: str, distance) -> float:
    """1 - d / len(target) for a normalised target; `distance(a, b)` is the Levenshtein distance."""
    recognised = normalise(recognised)
    d = 0 if target in recognised else min(distance(recognised, target), len(target))
    return 1.0 - d / len(target)


class OcrReward(Reward):
    name = "ocr"
    # detector input: the longest side brought down to 960 px when larger, never enlarged (PaddleOCR 2.x's defaults,
    # which Flow-GRPO and DiffusionNFT run with); RapidOCR's own default enlarges a 512 px image to 736 px
    det_params = {"Det.limit_type": "max", "Det.limit_side_len": 960}

    def __init__(self, path=None, device="cpu", dtype=torch.float32):
        """path: not taken (the models ship in the rapidocr wheel); device, dtype: ignored, ONNX Runtime runs on the
        CPU in float32."""
        if path is not None:
            raise RewardError("reward 'ocr' takes no path override: its models ship in the rapidocr package")
        try:
            import onnxruntime  # noqa: F401  (rapidocr imports it only when it first scores)
            from rapidfuzz.distance import Levenshtein
            from rapidocr import RapidOCR
        except ImportError as e:
            raise RewardError(f"reward 'ocr' needs optional packages ({e.name or e} is missing): {EXTRAS}") from None
        self.distance = Levenshtein.distance
        # no text-direction classifier (use_angle_cls=False in the reference code); lines read with confidence
        # under 0.5 are dropped (RapidOCR's text_score, PaddleOCR's drop_score)
        # ONNX Runtime gets the threads torch has in this process (a run gives each rank its share of the cores)
        threads = torch.get_num_threads()
        self.engine = RapidOCR(params={"Global.log_level": "error", "Global.use_cls": False, **self.det_params,
                                       "EngineConfig.onnxruntime.intra_op_num_threads": threads})
        self.read(np.full((64, 64, 3), 255, np.uint8))  # loads the models now (RapidOCR loads them at first use)

    def read(self, image: np.ndarray) -> str:
        """An (H, W, 3) uint8 RGB image -> every line of text read in it, joined (reading order)."""
        out = self.engine(np.ascontiguousarray(image[..., ::-1]))  # RapidOCR takes arrays as BGR
        return "".join(out.txts or ())

    def score_images(self, images: torch.Tensor, targets: list[str]) -> torch.Tensor:
        arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return torch.tensor([text_score(self.read(a), t, self.distance) for a, t in zip(arr, targets)],
                            dtype=torch.float32)

    @torch.no_grad()
    def __call__(self, images, prompts, metadata):
        metadata = metadata if metadata is not None else [{}] * len(prompts)
        targets = [target_text(p, m) for p, m in zip(prompts, metadata)]  # every prompt checked before any OCR
        return over_frames(self.score_images, images, targets)
