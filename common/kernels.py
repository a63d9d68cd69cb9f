"""Which kernels the transformer runs, chosen once before training: its attention and its compilation.

With no --attention-backend, diffusers calls torch's scaled-dot-product attention (SDPA), which picks a kernel per
call. On CUDA it may pick cuDNN's, whose backward crashes FLUX.1-dev training inside gradient-checkpointed attention
(torch 2.11 + cuDNN 9.19 on an H200: `mha_graph.execute(...).is_good()`, reported as an illegal memory access), so
there SDPA is left the flash, memory-efficient and math kernels. A named --attention-backend (diffusers' registry:
flash, _native_cudnn, sage, ...) is used as given.
"""
import torch


def choose_attention(modules, backend: str | None) -> str:
    """Set the attention of `modules` (the trained transformer, its reference copy) and return the one line the run
    prints about it."""
    if backend:
        for m in modules:
            m.set_attention_backend(backend)
        return f"attention: diffusers backend {backend!r} (--attention-backend)"
    if not torch.cuda.is_available():
        return "attention: torch scaled-dot-product attention"
    torch.backends.cuda.enable_cudnn_sdp(False)  # process-wide: every forward of the run, evaluation included
    return ("attention: torch scaled-dot-product attention, flash / memory-efficient / math kernels (cuDNN's is off: "
            "its backward crashes FLUX.1 training; --attention-backend _native_cudnn brings it back)")


def compile_transformer(module, regional: bool):
    """torch.compile in place (parameter names, LoRA export and checkpoints unchanged): the whole forward, or
    (`regional`) each repeated transformer block: diffusers' `_repeated_blocks`, else every block of the model's
    top-level block lists (SD3.5). Identical blocks share one compiled graph, so regional compilation takes a
    fraction of the time; Wan2.2-A14B compiles each expert."""
    if not regional:
        module.compile()
        return
    for net in getattr(module, "experts", {"": module}).values():
        if getattr(net, "_repeated_blocks", None):
            net.compile_repeated_blocks()
            continue
        for blocks in (c for c in net.children() if isinstance(c, torch.nn.ModuleList)):
            for block in blocks:
                block.compile()
