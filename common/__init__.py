"""What the four algorithm scripts share: the run (common/run.py), its flags, checks and launch, model adapters, sampler,
data, conditioning, checkpoints, logging."""
import logging as _logging


class _TorchvisionFallbackNotice(_logging.Filter):
    """transformers falls back to its PIL image processors when torchvision is missing (it has no CPU wheel for our
    torch): the processors the tiny builds use anyway. Its two-line notice would open every run; drop only it."""

    def filter(self, record):
        return "requires torchvision (not installed)" not in record.getMessage()


_logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallbackNotice())
