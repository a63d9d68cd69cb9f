"""Conditioning encoded once (`--encode-once`, the default): before training, every prompt a process will see (its
rows of every remaining epoch's plan, and its evaluation rows) is encoded once, with its negative prompt and
condition-image latents, and kept on the CPU; the text and image encoders then leave the accelerator. Batches are
assembled from the cached rows, so the hot loop never runs a text encoder.

Rows are encoded one chunk at a time by `Conditioning.encode_now`, the per-batch encoder; a cached row is the
adapter's batch-first output sliced to that row. Tensors whose length varies per prompt (Qwen and Z-Image pad
their embeddings to the longest prompt of a batch, with a mask or lengths) are zero-padded to the batch's longest
again when a batch is assembled, which is what the adapters do. The key of a row is its source (file:line) and the
size it was encoded for (image-to-video conditions depend on it).
"""
import torch

from common import data
from common.args import height_width
from common.errors import ConfigError
from common.models.base import pad_cat
from common.tracking import with_conditions


def _key(item, state):
    return item.source, state.get("height"), state.get("width"), state.get("num_frames", 1)


def _available_bytes():
    """MemAvailable of /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class ConditionCache:
    """encode(items, state) -> batch-first cond dict (the per-batch encoder); chunk: rows per encode call."""

    def __init__(self, encode, chunk=1, max_fraction_of_memory=0.5):
        self.encode, self.chunk, self.max_fraction = encode, max(1, chunk), max_fraction_of_memory
        self.rows, self.bytes = {}, 0

    def fill(self, items, state):
        """Encode every row of `items` not cached yet, for `state`; stop in one line before host memory runs out."""
        todo = list({_key(it, state): it for it in items if _key(it, state) not in self.rows}.values())
        for start in range(0, len(todo), self.chunk):
            batch = todo[start:start + self.chunk]
            cond = self.encode(batch, state)
            for i, it in enumerate(batch):
                row = {k: (v[i:i + 1].detach().cpu() if torch.is_tensor(v) else v) for k, v in cond.items()}
                self.bytes += sum(v.numel() * v.element_size() for v in row.values() if torch.is_tensor(v))
                self.rows[_key(it, state)] = row
            if start == 0:  # estimate the whole cache from the first chunk
                self._check_memory(len(todo), len(batch))

    def _check_memory(self, n_rows, n_done):
        per_row = self.bytes / max(1, len(self.rows))
        need, free = per_row * (n_rows - n_done), _available_bytes()
        if free is not None and need > self.max_fraction * free:
            raise ConfigError(f"encoding the {n_rows} prompts this process will see once needs {need / 2**30:.1f} GB "
                              f"of host memory ({per_row / 2**20:.2f} MB per prompt), more than half of the "
                              f"{free / 2**30:.1f} GB available; pass --no-encode-once (encode per batch) or train "
                              "on fewer prompts")

    def get(self, items, state, device):
        """The cond dict of a batch of cached rows, on `device`."""
        rows = []
        for it in items:
            key = _key(it, state)
            if key not in self.rows:  # every row a process sees is filled before training: a miss is a bug
                raise KeyError(f"{it.source}: not encoded before training (size {key[1:]})")
            rows.append(self.rows[key])
        out = {}
        for k, first in rows[0].items():
            if not torch.is_tensor(first):  # batch-level facts, the same in every row
                out[k] = first
                continue
            vals = [r[k] for r in rows]  # per-prompt lengths (dim 1): zero-padded to the longest
            out[k] = (pad_cat(vals) if first.dim() >= 2 else torch.cat(vals)).to(device)
        return out

    def summary(self, seconds):
        n = max(1, len(self.rows))
        return (f"encoded {len(self.rows)} prompts once in {seconds:.2f} s: {self.bytes / 2**20:.2f} MB on the CPU "
                f"({self.bytes / n / 2**10:.1f} KB per prompt); the text encoders left the accelerator")


def rows_seen(group_sampler, train_items, rank, epochs):
    """The train rows this rank samples in `epochs` (the plans are deterministic, the same on every rank)."""
    idx = sorted({i for e in epochs for batch, _ in group_sampler.local_batches(e, rank) for i in batch})
    return [train_items[i] for i in idx]


class Conditioning:
    """What a batch of dataset rows conditions the model on: its prompts, its negative prompts (every row gets one
    when any row or --negative-prompt gives one: CFG on for all) and its condition images; encoded by the adapter
    per batch, or assembled from the rows encoded once (`encode_once`, --encode-once)."""

    def __init__(self, adapter, args, items, device):
        self.adapter, self.device, self.cache = adapter, device, None
        self.negative_prompt, self.max_sequence_length = args.negative_prompt, args.max_sequence_length
        self.negatives = args.negative_prompt is not None or any(it.negative_prompt for it in items)

    def encode_now(self, items, state) -> dict:
        """The adapter's batch-first conditioning of `items` at the size of `state`."""
        images = None if self.adapter.condition_images == "none" else [[data.load_image(p) for p in it.images]
                                                                       for it in items]
        negatives = [it.negative_prompt or self.negative_prompt or "" for it in items] if self.negatives else None
        return self.adapter.encode_prompt([it.prompt for it in items], negatives, self.max_sequence_length, images,
                                          state)

    def encode(self, items, state) -> dict:
        """A batch's conditioning on the device: from the rows encoded once, or now."""
        return self.cache.get(items, state, self.device) if self.cache is not None else self.encode_now(items, state)

    def shown(self, items, images) -> list:
        """Sample-grid images: an edit model's condition images beside its output."""
        return with_conditions(images, [it.images if self.adapter.condition_images != "none" else [] for it in items])

    def encode_once(self, args, group_sampler, train_items, test_items, rank, world, epochs) -> ConditionCache:
        """Fill the cache: this rank's train rows of `epochs` at the training size and its evaluation rows at the
        evaluation size; then the adapter's text and image encoders move off the accelerator. Condition-image models
        encode one row per call (the pipelines encode their images one per call, so a cached row does not depend on
        the rows it was encoded with)."""
        self.cache = ConditionCache(self.encode_now, args.batch_size if self.adapter.condition_images == "none" else 1)
        self.cache.fill(rows_seen(group_sampler, train_items, rank, epochs),
                        self.adapter.make_state(*height_width(args.resolution), args.num_frames))
        if args.eval_every:
            self.cache.fill([test_items[i] for i in data.rank_rows(len(test_items), rank, world)],
                            self.adapter.make_state(*height_width(args.eval_resolution), args.eval_num_frames))
        self.adapter.offload_encoders()
        return self.cache
