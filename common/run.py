"""The run: what every algorithm script sets up identically, and the plumbing of its epochs, in one plain object.

A script builds one `Run` and drives its own loop with it (grpo.py, nft.py):

    run = Run(args, SCRIPT, trained_steps=...)  # checks, accelerator, data, model, rewards, optimizer, EMA, resume
    old = run.checkpointed_ema("old_ema", ...)  # an algorithm's own state: checkpointed, resumed
    run.start()                                 # output folder, config, trackers; prompts encoded once; base eval
    for epoch in run.epochs():
        samples = run.rollout(epoch, window, store=("latents", "log_probs"))  # per micro-batch: what it stores
        raw, advantages = run.advantages(samples, epoch)                     # each sample gets its "adv"
        for inner, b, s in run.train_batches(samples, epoch):
            with run.accumulate(grad_accum):    # the optimizer steps on the last micro-step of each accumulation
                loss = ...                      # the algorithm
                run.backward(loss)
        run.end_epoch(epoch, stats, raw, advantages, window)  # evaluation EMA, metrics, evaluation, checkpoint
    run.finish()                                # export, summary, every process ends

The run has no loop of its own, no hooks and no callbacks: it never calls into a script.
"""
import concurrent.futures
import contextlib
import copy
import dataclasses
import json
import math
import os
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from tqdm.auto import tqdm

import rewards
from common import checkpoint, checks, data, evaluation, models, sampler, sharding, tracking
from common import launch
from common.advantages import epoch_advantages
from common.args import height_width
from common.conditioning import Conditioning
from common.ema import EMA
from common.errors import ConfigError, TrainingError, writing
from common.kernels import choose_attention, compile_transformer
from common.launch import end_processes, set_cpu_threads
from common.lock import OutputLock

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}
STORABLE = {"latents", "log_probs", "means", "x0"}  # what a rollout may keep of each sample (Run.rollout)


def lr_factor(schedule: str, epoch: int, num_epochs: int) -> float:
    """The share of --learning-rate that epoch `epoch` trains with: 1, or linear / cosine decay from 1 at epoch 0
    to 1 / num_epochs (linear) or near 0 (cosine) at the last epoch."""
    if schedule == "constant":
        return 1.0
    t = epoch / num_epochs
    return 1.0 - t if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))


class Run:
    def __init__(self, args, script: str, trained_steps=None, trained_sigmas=None, time_sampler=None,
                 reference=False, whole_groups=False):
        """Everything before the first write: the checks (then the data), the accelerator, seeds and threads, the
        model with LoRA (or full fine-tuning), attention, compile, checkpointing, the reference copy and FSDP; the
        rewards and their probe; the optimizer, the evaluation EMA and a resumed checkpoint. `script` is recorded
        in checkpoints. Wan2.2-A14B's expert check needs what trains: rollout steps (`trained_steps`) or training
        sigmas (`trained_sigmas`, a closed interval, drawn by `time_sampler`). `reference`: the algorithm needs the
        reference model (run.reference_velocity) whatever --kl-beta is (a full fine-tuning run then keeps a frozen
        copy; a LoRA run's reference is the model with its adapters off, always there). `whole_groups`: the algorithm
        compares the members of a group, so each process holds whole groups (a configuration where that cannot hold
        is refused before the model loads; data.GroupSampler)."""
        self.args, self.script, self.wants_reference = args, script, reference
        adapter_cls = models.adapter_class(args.model, args.variant)
        ddp = DistributedDataParallelKwargs(
            find_unused_parameters=adapter_cls.find_unused_parameters(args.variant, args.train_experts))
        # cpu=True without CUDA: `accelerate launch --multi_gpu --num_processes N` then runs N CPU processes over gloo
        self.accelerator = acc = Accelerator(mixed_precision=args.mixed_precision, cpu=not torch.cuda.is_available(),
                                             log_with=None if args.log_with == "none" else args.log_with,
                                             project_dir=args.output_dir, kwargs_handlers=[ddp])
        self.rank, self.world, self.device = acc.process_index, acc.num_processes, acc.device
        self.autocast = acc.autocast
        reach = dict(steps=trained_steps) if trained_steps is not None else dict(sigma_range=trained_sigmas,
                                                                                  time_sampler=time_sampler)
        checked = checks.check_run(args, self.world, script, whole_groups=whole_groups, **reach)
        self.train_items, self.test_items, self.groups = checked.train, checked.test, checked.groups
        self.resume, self.n_batches = checked.resume, checked.groups.num_batches
        self.lock = OutputLock(args.output_dir)
        if acc.is_main_process:
            self.lock.check()  # another run writing there: refused before the model loads
        if self.device.type == "cpu":
            set_cpu_threads(self.world, args.cpu_threads)
        set_seed(args.seed, device_specific=True)
        self.storage_dtype = DTYPES[args.latent_storage_dtype]
        self.adapter = models.load(args.model, args.model_path, tiny=args.tiny, device=self.device,
                                   dtype=DTYPES[args.mixed_precision], variant=args.variant,
                                   condition_max_pixels=args.condition_max_pixels, train_experts=args.train_experts,
                                   guidance_scale_2=args.guidance_scale_2)
        transformer = self._prepare_model()
        self.params = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
        self.reward_set = rewards.load_rewards(checked.reward_specs, checked.reward_paths, device=self.device,
                                               frame_stride=args.reward_frame_stride)
        checks.check_rewards(self.reward_set, self.adapter, args, self.train_items)  # a broken reward stops here
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=args.learning_rate, weight_decay=args.weight_decay)
        self.ema = EMA(self.params.values(), interval=args.ema_interval, schedule="power", decay=args.ema_decay,
                       device="cpu" if args.ema_on_cpu else None)
        if args.fsdp:  # a sharded module stays out of accelerator.prepare, which would wrap it in DDP
            self.optimizer = acc.prepare(self.optimizer)
        else:
            self.adapter.transformer, self.optimizer = acc.prepare(transformer, self.optimizer)
        self.start_epoch, self.global_step, self.grad_norm, self.algo_state = 0, 0, None, {}
        if self.resume:
            state = (checkpoint.load_sharded if args.fsdp else checkpoint.load)(self.resume, self.params,
                                                                                  self.optimizer, self.ema)
            self.start_epoch, self.global_step = state["epoch"] + 1, state["step"]
            for group in self.optimizer.param_groups:  # the schedule's flags are this command's (checks.resume_changes)
                group.update(lr=args.learning_rate, weight_decay=args.weight_decay)
            acc.print(f"resumed from {self.resume} at epoch {self.start_epoch}" + "".join(
                f"\n  --{k.replace('_', '-')} {old} -> {new}" for k, (old, new) in checked.changes.items()))
            if self.start_epoch >= args.num_epochs:
                acc.print(f"the run is complete: {self.start_epoch} of {args.num_epochs} epochs trained (raise "
                          "--num-epochs to train on)")
        elif args.resume_from:  # `latest` with no checkpoint yet: the same command starts the run
            acc.print(f"--resume-from {args.resume_from}: no checkpoint in {args.output_dir}; starting fresh")
        self.state = self.adapter.make_state(*height_width(args.resolution), args.num_frames)  # the training size
        self.sigmas = self.adapter.sigmas(args.num_steps, self.state).to(self.device)
        self.conditioning = Conditioning(self.adapter, args, self.train_items + self.test_items, self.device)
        self.reward_pool = concurrent.futures.ThreadPoolExecutor(1) if args.async_rewards else None  # one at a time
        self.metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
        self.timer, self.base_eval, self._micro, self._accumulation = tracking.Timer(self.device), None, 0, 1
        self._nonfinite = torch.zeros(2, dtype=torch.bool, device=self.device)  # the epoch's loss, gradient norm
        self.resume_changes, self._saved = checked.changes, (self.global_step, self.resume)  # the last checkpoint
        self.merge_lora = args.finetune == "lora" and (args.lora_merged_sampling if args.lora_merged_sampling is not None
                                                      else self.device.type == "cuda" and not args.fsdp
                                                      and args.compile == "none")

    def _prepare_model(self):
        """The trained module (the transformer; Wan2.2-A14B: its trained experts as one module), made trainable; the
        frozen reference copy of a full fine-tuning run with a KL (before sharding); FSDP2 sharding last."""
        args, adapter = self.args, self.adapter
        transformer = adapter.trained_module()
        self.accelerator.print(choose_attention([transformer], args.attention_backend))
        if args.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        if args.compile != "none":  # compiled in place: parameter names, LoRA export and checkpoints are unchanged
            compile_transformer(transformer, regional=args.compile == "blocks")
        if args.finetune == "lora":
            n_lora = adapter.add_lora(args.lora_rank, args.lora_alpha, args.lora_targets or None)
            for p in transformer.parameters():
                if p.requires_grad:
                    p.data = p.data.float()  # trainable weights in fp32 under mixed precision
            self.accelerator.print(f"LoRA rank {args.lora_rank} on {n_lora} modules")
        else:
            transformer.requires_grad_(True)
        self.ref_model = self._ref_adapter = None
        if (args.kl_beta > 0 or self.wants_reference) and args.finetune == "full":
            self.ref_model = copy.deepcopy(transformer).requires_grad_(False).to(args.ref_device or self.device)
            self._ref_adapter = adapter.with_transformer(self.ref_model)
        if args.fsdp:  # torch's fully_shard on the blocks and roots, over accelerate's process group (after LoRA)
            sharding.shard_module(transformer, args.mixed_precision)
        return transformer

    def checkpointed_ema(self, name: str, **schedule) -> EMA:
        """An EMA of the trained weights that the algorithm keeps (NFT's old policy, AWM's anchor): saved in every
        checkpoint as <name>.safetensors and, when the run resumes, loaded from it now."""
        ema = EMA(self.params.values(), **schedule)
        self.algo_state[name] = ema
        if self.resume:
            sharding.load_full_into(ema.state_dict(), checkpoint.load_extra(self.resume, name, self.script))
        return ema

    # ---- outputs, encoding, the base model ---------------------------------------------------------------------------
    def start(self):
        """Only now is anything written (every check passed, the model and a resume have loaded): the output folder
        (--overwrite clears the old run's outputs here), config.json, trackers and metrics.jsonl (a resumed run's cut
        back to its checkpoint); every prompt encoded once (--encode-once); the base model's evaluation."""
        args, acc = self.args, self.accelerator
        self.stop_if_asked(self.start_epoch - 1)  # a signal while the model loaded: stop before anything is written
        if acc.is_main_process:
            with writing("the output folder", args.output_dir):
                os.makedirs(args.output_dir, exist_ok=True)
            self.lock.acquire()  # held until the process ends
            if args.overwrite and not self.resume:
                checkpoint.clear_run(args.output_dir)
            self._write_config()
            if not self.resume and os.path.exists(self.metrics_path):
                os.remove(self.metrics_path)  # a fresh run starts a fresh log; a resumed run appends
            elif self.resume:  # after the lines of epochs the checkpoint does not hold
                tracking.keep_epochs_before(self.metrics_path, self.start_epoch)
        if args.log_with != "none":
            acc.init_trackers(args.exp_name, config={k: str(v) for k, v in dataclasses.asdict(args).items()})
        if args.encode_once:  # every prompt this process will see, once, kept on the CPU; then the encoders move off
            with self.timer("encode"):
                cache = self.conditioning.encode_once(args, self.groups, self.train_items, self.test_items, self.rank,
                                                      self.world, range(self.start_epoch, args.num_epochs))
            acc.print(cache.summary(self.timer.seconds["encode"]))
            self.stop_if_asked(self.start_epoch - 1)
        if args.eval_before and self.start_epoch == 0 and args.eval_every > 0:
            with self.timer("eval"):
                self.base_eval, self.base_images, self.base_audio = self.evaluate(-1)
            if acc.is_main_process:
                tracking.append_jsonl(self.metrics_path, {"epoch": -1, **self.base_eval, **self.timer.pop(),
                                                          **tracking.peak_memory_gb(self.device)})
            self.stop_if_asked(self.start_epoch - 1)

    def _write_config(self):
        """config.json: this command's flags, and (resumed) each resume's epoch and the flags it changed."""
        path = os.path.join(self.args.output_dir, "config.json")
        resumed = []
        if self.resume:
            if checkpoint.is_run_config(path):
                with open(path) as f:
                    resumed = json.load(f).get("resumed", [])
            elif os.path.exists(path):  # torn by a crash of an older version: the resume history is lost, not the run
                print(f"warning: {path} is not a run's config (empty or torn); written anew, without the history "
                      "of earlier resumes", file=sys.stderr, flush=True)
            resumed.append({"epoch": self.start_epoch, "checkpoint": self.resume,
                            "changed": {k: list(v) for k, v in self.resume_changes.items()}})
        config = {**dataclasses.asdict(self.args), **({"resumed": resumed} if resumed else {})}
        with writing("the run's config", path), tracking.atomic_path(path) as tmp, open(tmp, "w") as f:
            json.dump(config, f, indent=1)  # written whole, then renamed: never torn

    def epochs(self):
        """The epochs left to train, under the whole run's progress bar (with its estimate)."""
        return tqdm(range(self.start_epoch, self.args.num_epochs), desc="epochs", initial=self.start_epoch,
                    total=self.args.num_epochs, disable=not self.accelerator.is_local_main_process)

    def evaluate(self, epoch):
        """Held-out ODE samples with the EMA weights: ({"eval/...": value}, the grid's images, the grid's sound or
        None)."""
        with self.ema.swapped_in(), self.autocast(), self._sampling(merged_ok=True):
            return evaluation.evaluate(self.accelerator, self.adapter, self.conditioning, self.reward_set,
                                       self.test_items, self.args, epoch)

    def _sampling(self, merged_ok):
        """The context of sampling forwards: the LoRA merged into the weights (--lora-merged-sampling) where allowed."""
        return self.adapter.lora_merged() if merged_ok and self.merge_lora else contextlib.nullcontext()

    # ---- sampling and advantages -------------------------------------------------------------------------------------
    def rollout(self, epoch, sde_window, store=("latents", "log_probs")) -> list[dict]:
        """This process's samples of the epoch, one dict per training micro-batch: its conditioning ("cond"), its
        reward "scores" (a future under --async-rewards), each row's identity ("item": its dataset row, "group": its
        group's index in the epoch, "member": its index in the group; tuples of ints, the same on any layout) and what `store` names: "latents"
        (the SDE window's, by position), "log_probs" and "means" (per window step), "x0" (the final latents). Noise is
        seeded per global micro-batch, so a wide rollout (--rollout-batch-size) draws what narrow ones would."""
        args, acc = self.args, self.accelerator
        if set(store) - STORABLE:
            raise ValueError(f"run.rollout stores {sorted(STORABLE)}, not {sorted(set(store) - STORABLE)}")
        samples, batches = [], self.groups.local_batches(epoch, self.rank)
        plan = self.groups.plan(epoch)  # each row's identity: dataset row, group, member (the same on every layout)
        identity = [data.local_slice(v, self.rank, self.world) for v in (plan.items, plan.groups, plan.members())]
        merged_ok = not {"log_probs", "means"} & set(store)  # GRPO's log-probabilities are the unmerged policy's
        self.adapter.transformer.eval()
        per = (args.rollout_batch_size or args.batch_size) // args.batch_size  # micro-batches per rollout forward
        for c in tqdm(range(0, len(batches), per), desc=f"epoch {epoch} rollout",
                      disable=not acc.is_local_main_process, leave=False):
            chunk = batches[c:c + per]
            items = [self.train_items[i] for idx, _ in chunk for i in idx]
            gens = [torch.Generator().manual_seed(  # per global micro-batch: the same noise at any width
                args.seed * 1_000_003 + epoch * 10_007 + self.rank * self.n_batches + b)
                for b in range(c, c + len(chunk))]
            with self.timer("rollout"), self.autocast(), self._sampling(merged_ok=merged_ok):
                cond = self.conditioning.encode(items, self.state)
                z = self._initial_noise(epoch, chunk, gens)
                traj = sampler.rollout(lambda x, i: self.velocity(x, self.sigmas[i], cond), z, self.sigmas,
                                       sde_window, args.noise_level, args.dynamics,
                                       keep=None if "latents" in store else set(), keep_means="means" in store,
                                       generator=[torch.Generator(self.device).manual_seed(g.initial_seed() + 1)
                                                  for g in gens], storage_dtype=self.storage_dtype)
            with self.timer("decode"), self.autocast():  # after the denoising loop; VAE memory as at --batch-size
                images = torch.cat([self.adapter.decode(traj.final[r], self.state, self.adapter.select(cond, r))
                                    for r in sampler.micro_batches(len(items), args.batch_size)])
                sound = self._decode_audio(traj.final, self.state, cond, len(items))
            for b, rows in enumerate(sampler.micro_batches(len(items), args.batch_size), start=c):
                s = self._sample(epoch, b, items[rows], images[rows], self.adapter.select(cond, rows), traj.rows(rows),
                                 store, None if sound is None else (sound[0][rows], sound[1]))
                first = b * args.batch_size  # this micro-batch's first row among the process's rows of the epoch
                s["item"], s["group"], s["member"] = (tuple(v[first:first + len(items[rows])])
                                                      for v in identity)  # plain ints: nothing moved to the device
                samples.append(s)
        self.stop_if_asked(epoch - 1)  # a signal during the rollout: the weights are still epoch - 1's
        return samples

    def _initial_noise(self, epoch, chunk, gens):
        """The rollout's starting noise: from each micro-batch's generator, or (--same-noise-in-group) one draw per
        group of the epoch, the same on every rank and micro-batch holding a member of the group."""
        args, size = self.args, height_width(self.args.resolution)
        if not args.same_noise_in_group:
            return torch.cat([self.adapter.prepare_noise(len(idx), *size, g, args.num_frames)
                              for (idx, _), g in zip(chunk, gens)])
        return torch.cat([self.adapter.prepare_noise(1, *size, torch.Generator().manual_seed(
            (args.seed * 1_000_003 + epoch * 10_007) * 8_191 + group), args.num_frames)
            for _, groups in chunk for group in groups])

    def _decode_audio(self, z, state, cond, n):
        """(waveforms (n, C, N) on the device, sample rate) of a model that generates sound (adapter.audio), decoded
        --batch-size rows at a time as the videos are; None for every other model (nothing runs)."""
        if not self.adapter.audio:
            return None
        return (torch.cat([self.adapter.decode_audio(z[r], state, self.adapter.select(cond, r))
                           for r in sampler.micro_batches(n, self.args.batch_size)]), self.adapter.audio_sample_rate())

    def _sample(self, epoch, b, items, images, cond, traj, store, audio=None) -> dict:
        """One micro-batch's sample dict; `audio`: its rows' (waveforms, sample rate), or None (no sound)."""
        args = self.args
        with self.timer("reward"):  # --async-rewards: a future, scored while the next micro-batch rolls out
            scores = (self.reward_pool.submit(data.score, self.reward_set, items, images, audio) if self.reward_pool
                      else data.score(self.reward_set, items, images, audio))
        s = {"cond": cond, **{k: getattr(traj, k) for k in store if k != "x0"}, "scores": scores}
        if "x0" in store:
            s["x0"] = traj.final.to(self.storage_dtype)
        if args.offload_samples:  # back to the device one micro-batch at a time in training
            s = sampler.to_device(s, "cpu")
        if b == 0 and self.accelerator.is_main_process and args.eval_every and (epoch + 1) % args.eval_every == 0:
            tracking.save_samples(self.accelerator, os.path.join(args.output_dir, "samples"), f"train_epoch{epoch:04d}",
                                  self.conditioning.shown(items, images.cpu()), [it.prompt for it in items], epoch,
                                  fps=self.adapter.frame_rate, audio=audio)
        return s

    def advantages(self, samples, epoch):
        """The epoch's group-relative advantages (common/advantages.py) from every process's rewards: background
        scoring joined in rollout order, raw scores gathered over processes (the plan's global order, so a group may
        span ranks), ranked within groups for a groupwise reward. Each sample gets its rows' "adv"; returns (raw
        scores, every advantage of the epoch) for the log."""
        with self.timer("reward"):
            for s in samples if self.reward_pool else ():
                s["scores"] = s["scores"].result()
            raw = {k: self.accelerator.gather(torch.cat([s["scores"][k] for s in samples]).to(self.device)).cpu()
                   for k in self.reward_set.names}
            raw, adv = epoch_advantages(raw, self.reward_set, self.groups.plan(epoch).groups, self.args)
            mine = data.local_slice(adv, self.rank, self.world).to(self.device)
            for s, a in zip(samples, mine.split(self.args.batch_size)):
                s["adv"] = a
        return raw, adv

    def by_group(self, samples, keys) -> list[dict]:
        """The process's samples regrouped: one dict per group, in the order the groups first appear, holding
        "group", "item" (its dataset row) and, for each of `keys` (per-row tensors such as "x0", "adv"), its K
        members' rows stacked in member order. Needs whole groups on the process (Run(..., whole_groups=True))."""
        rows = {}  # group -> {member: (sample index, row)}
        for i, s in enumerate(samples):
            for r, (g, m) in enumerate(zip(s["group"], s["member"])):
                rows.setdefault(g, {})[m] = (i, r, s["item"][r])
        out = []
        for g, members in rows.items():
            if len(members) != self.args.group_size:
                raise ValueError(f"group {g} has {len(members)} of {self.args.group_size} members on process "
                                 f"{self.rank}: build the Run with whole_groups=True to compare a group's members")
            order = [members[m] for m in range(len(members))]
            out.append({"group": g, "item": order[0][2],
                        **{k: torch.stack([samples[i][k][r] for i, r, _ in order]) for k in keys}})
        return out

    def gather(self, samples, key) -> torch.Tensor:
        """Every process's rows of a per-row tensor (e.g. "adv", "x0"), in the plan's global order: row n is the
        sample of group `run.groups.plan(epoch).groups[n]`. The way to see whole groups without whole_groups."""
        return self.accelerator.gather(torch.cat([s[key] for s in samples]).to(self.device))

    def sde_window(self, epoch) -> list[int]:
        """The epoch's stochastic rollout steps (decision 2): --sde-window-size consecutive steps, the start drawn in
        --sde-window-range from the seed and the epoch alone; none for ODE rollouts."""
        args = self.args
        if args.dynamics == "ODE":
            return []
        return sampler.draw_sde_window(args.num_steps, args.sde_window_size, *args.sde_window_range,
                                       seed=args.seed * 100_003 + epoch)

    def generator(self, *key) -> torch.Generator:
        """A CPU generator for the draws of what `key` names, e.g. ("noise", epoch, inner, group, member, timestep):
        seeded by --seed and the key, not by process or batch, so a layout change moves no number."""
        return sampler.keyed_generator(self.args.seed, *key)

    def encode(self, items) -> dict:
        """The conditioning of dataset rows (indices into the training rows; prompts encoded once at start)."""
        return self.conditioning.encode([self.train_items[i] for i in items], self.state)

    # ---- training ---------------------------------------------------------------------------------------------------
    def train_batches(self, samples, epoch):
        """(inner epoch, batch index, sample on the device) over --num-inner-epochs passes: the first keeps the
        rollout's order (its first micro-batch is exactly on-policy), later ones are shuffled by seed. `samples`: the
        rollout's, or any list of dicts of tensors an algorithm builds from them (pairs, groups)."""
        self.adapter.transformer.train()
        self._micro = 0
        for p in self.params.values():  # an epoch starts from no gradient, whatever came before
            p.grad = None
        for group in self.optimizer.param_groups:  # --lr-schedule, by epoch (a resume recomputes it)
            group["lr"] = self.args.learning_rate * lr_factor(self.args.lr_schedule, epoch, self.args.num_epochs)
        with self.timer("train"):
            for inner in range(self.args.num_inner_epochs):
                order = list(range(len(samples))) if inner == 0 else torch.randperm(len(samples), generator=(
                    torch.Generator().manual_seed(self.args.seed * 1000 + epoch * 10 + inner))).tolist()
                for b in tqdm(order, desc=f"epoch {epoch} train", disable=not self.accelerator.is_local_main_process,
                              leave=False):
                    yield inner, b, sampler.to_device(samples[b], self.device)  # a no-op unless --offload-samples

    def velocity(self, z, sigma, cond, guided=True, adapter=None):
        """The policy's velocity at the training size: with the rollouts' guidance, or guidance-free (guided=False,
        the adapter's `unguided` scales: NFT's and AWM's training forward). `adapter`: another view of the model."""
        adapter = adapter or self.adapter
        scales = (self.args.guidance_scale, self.args.true_cfg_scale) if guided else adapter.unguided
        return adapter.predict(z, sigma, cond, self.state, *scales)

    @torch.no_grad()
    def reference_velocity(self, z, sigma, cond, guided=True):
        """The reference policy's velocity (the KL's): LoRA runs predict with their adapters off; full fine-tuning
        predicts with the frozen copy taken before training (on the accelerator for the call, kept on --ref-device),
        which a run keeps when --kl-beta > 0 or its script asked for it (Run(..., reference=True))."""
        if self.ref_model is None and self.args.finetune == "full":
            raise ConfigError("run.reference_velocity: this full fine-tuning run keeps no reference model; build the "
                              "Run with reference=True (or train with --kl-beta > 0)")
        if self.ref_model is None:
            with self.adapter.lora_disabled():
                return self.velocity(z, sigma, cond, guided)
        self.ref_model.to(self.device)
        try:
            return self.velocity(z, sigma, cond, guided, adapter=self._ref_adapter)
        finally:
            self.ref_model.to(self.args.ref_device or self.device)

    @contextlib.contextmanager
    def accumulate(self, steps: int):
        """One micro-step of an optimizer step made of `steps` micro-steps (accelerate's `accumulate` idiom, for DDP
        and FSDP2 modules alike): gradients are reduced over processes only in the last one, which then clips them
        (--max-grad-norm), steps the optimizer and clears them."""
        sync, self._accumulation = (self._micro + 1) % steps == 0, steps
        with contextlib.nullcontext() if sync else sharding.no_sync(self.adapter.transformer):
            yield
        if sync:
            clip = sharding.clip_grad_norm_ if self.args.fsdp else self.accelerator.clip_grad_norm_
            self.grad_norm = clip(self.params.values(), self.args.max_grad_norm)
            if torch.is_tensor(self.grad_norm):  # on the device: read once, at the epoch's end
                self._nonfinite[1] |= ~torch.isfinite(self.grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.global_step += 1
        self._micro += 1

    def backward(self, loss):
        """The micro-step's share of the optimizer step's mean loss, backpropagated (inside `accumulate`)."""
        self._nonfinite[0] |= ~torch.isfinite(loss.detach()).all()
        self.accelerator.backward(loss / self._accumulation)

    # ---- after each epoch, and at the end ----------------------------------------------------------------------------
    def end_epoch(self, epoch, stats, raw, adv, sde_window, scalars=None):
        """The evaluation EMA steps; the epoch's record (rewards, advantages, training statistics, the algorithm's
        per-epoch `scalars` as train/<name> (numbers, the main process's), the evaluation when due, timings, peak
        memory) goes to metrics.jsonl and the trackers; a checkpoint when due."""
        args, acc = self.args, self.accelerator
        if self._micro % self._accumulation:  # its gradients would be dropped, or carried into the next epoch
            raise ConfigError(f"epoch {epoch}: {self._micro} training micro-steps do not fill optimizer steps of "
                              f"{self._accumulation} (run.accumulate): make the micro-steps of an epoch a multiple of "
                              "the accumulation")
        self._stop_if_nonfinite(epoch)
        self.ema.step(epoch)
        record = {"epoch": epoch, "step": self.global_step, "samples": len(adv), "sde_window": sde_window,
                  "lr": self.optimizer.param_groups[0]["lr"],
                  "grad_norm": float(self.grad_norm) if self.global_step else None,
                  **tracking.epoch_stats(acc, raw, adv, stats),
                  **{f"train/{k}": float(v) for k, v in (scalars or {}).items()}}
        last = epoch == args.num_epochs - 1
        if args.eval_every and ((epoch + 1) % args.eval_every == 0 or last):
            with self.timer("eval"):
                final_eval, self.final_images, self.final_audio = self.evaluate(epoch)
                record.update(final_eval)
        record.update(self.timer.pop())
        record.update(tracking.peak_memory_gb(self.device))
        if acc.is_main_process:
            tracking.log_epoch(acc, self.metrics_path, record)
        if (epoch + 1) % args.save_every == 0 or last:
            self._save(epoch)
        self.stop_if_asked(epoch)

    def _stop_if_nonfinite(self, epoch):
        """Training that went NaN or infinite (the loss, the gradient norm, or the weights after the optimizer's
        steps) stops the run here, before the EMA, the evaluation or a checkpoint take it in: every process agrees
        (one small collective per epoch), nothing more is written, nothing is exported, the last checkpoint stays the
        last good one (TrainingError: one line naming the epoch and what went non-finite)."""
        weights = torch.stack([~torch.isfinite(sharding.local(p)).all() for p in self.params.values()]).any()
        flags = sharding.any_rank(torch.cat([self._nonfinite, weights.view(1)])).tolist()
        self._nonfinite.zero_()
        bad = [what for what, flag in zip(("the loss", "the gradient norm", "the weights"), flags) if flag]
        if not bad:
            return
        bad = ", ".join(bad[:-1]) + " and " + bad[-1] if len(bad) > 1 else bad[0]
        kept = f"the last checkpoint, {self._saved[1]}, is intact" if self._saved[1] else "no checkpoint was written"
        raise TrainingError(f"epoch {epoch}: {bad} became non-finite (NaN or inf); the run stopped "
                            f"without saving or exporting ({kept}); lower --learning-rate or --max-grad-norm, or "
                            "check the reward and the model's dtype")

    def _save(self, epoch):
        """A checkpoint of the state after `epoch` (COLLECTIVE: sharded, every rank gathers; rank 0 writes)."""
        args, acc = self.args, self.accelerator
        acc.wait_for_everyone()
        path = os.path.join(args.output_dir, "checkpoints", f"checkpoint-{self.global_step}")
        if args.fsdp or acc.is_main_process:
            path = (checkpoint.save_sharded if args.fsdp else checkpoint.save)(
                os.path.join(args.output_dir, "checkpoints"), self.global_step, self.params, self.optimizer,
                self.ema, meta={"epoch": epoch, "script": self.script, "config": dataclasses.asdict(args)},
                total_limit=args.checkpoints_total_limit,
                extra={name: s.state_dict() for name, s in self.algo_state.items()}) or path
        self._saved = (self.global_step, path)

    def stop_if_asked(self, done_epoch):
        """A stop asked by a signal (SIGTERM, Ctrl-C, ...: common/launch.py) on any process ends the run here, at a
        phase's end: every process agrees (one small collective per phase, never per step), the state after
        `done_epoch` is checkpointed unless the last checkpoint holds it, one line says how to go on, and every
        process exits 128 + the signal's number. Bound: the rest of the phase the signal came in (loading the model,
        encoding the prompts, the base evaluation, the epoch's rollout, or its training and evaluation) and one
        checkpoint."""
        asked = launch.stop_signal() or 0
        if self.world > 1:
            asked = int(self.accelerator.gather(torch.tensor([asked], device=self.device)).max())
        if not asked:
            return
        acc = self.accelerator
        if self.global_step != self._saved[0]:
            self._save(done_epoch)
        name, path = launch.signal_name(asked), self._saved[1]
        if acc.is_main_process:
            launch.clear_bars()  # the line is the last one the run prints
            print(f"{name}: stopped before the first optimizer step; the same command starts again" if path is None
                  else f"{name}: stopped after epoch {done_epoch} with the checkpoint {path}; the same command with "
                       "--resume-from latest goes on from there", file=sys.stderr, flush=True)
            self.lock.release()
        end_processes(acc, code=128 + asked)

    def finish(self):
        """The EMA weights exported in diffusers format (lora/ or transformer/; sharded: gathered by every rank; also
        redone by a resumed run whose export was interrupted), the before/after grid, the summary of the trained
        model against the base as the last lines; then every process ends (none hangs in teardown)."""
        args, acc = self.args, self.accelerator
        acc.wait_for_everyone()
        trained = self.start_epoch < args.num_epochs  # --num-epochs 0: evaluate only, no export
        if trained or (self.resume and not checkpoint.export_done(self.adapter, args.finetune, args.output_dir)):
            with self.ema.swapped_in():
                checkpoint.export(self.adapter, args.finetune, args.output_dir)
        if acc.is_main_process and trained:
            acc.print(f"saved to {args.output_dir}")
            if self.base_eval is not None and args.eval_every:
                sound = None if self.base_audio is None else (self.base_audio[0] + self.final_audio[0],
                                                              self.base_audio[1])
                tracking.save_samples(acc, os.path.join(args.output_dir, "samples"), "before_after",
                                      self.base_images + self.final_images, ["base"] * len(self.base_images)
                                      + ["trained"] * len(self.final_images), args.num_epochs,
                                      fps=self.adapter.frame_rate, audio=sound)
            acc.print(tracking.run_summary(self.metrics_path))  # the result, as the last lines: trained vs base
        self.lock.release()
        end_processes(acc)
