"""MindEye2 shared-subject pretraining, one-session fine-tuning and training from scratch: `train(cfg)`,
the work behind mindeye-train (offline_training/train.py, the command, which loads this module only when
it runs, so that its --help answers without torch).

Global batches. Each optimizer step consumes one global batch: `batch_per_subject` training trials of every
subject, subject-major; an epoch is as many steps as the largest subject's training set fills. What a batch
holds and all its randomness (trial order, mixup, the prior's timesteps, noise and dropped conditions) come
from (seed, epoch, step) alone, and process r of P takes rows [r b/P, (r+1) b/P) of every subject's block.
The contrastive loss gathers the brain embeddings of all processes with their gradient, so it scores the
whole global batch; the prior and low-level losses are per-row means, which DDP's gradient averaging makes
global means. A P-process run thus follows the one-process run with the same global batch up to float
rounding; only dropout draws from each process's own generator.

out_dir receives: checkpoint/ (mindeye.models.load_checkpoint reads it; calibration.safetensors beside the
weights holds each subject's z-score statistics as `subjXX.mean` / `subjXX.std`, readout.safetensors the token
readouts fitted when the run ends, mindeye.models.readout), train_state/ (optimizer, scheduler, RNG and progress,
for resume=true), run_config.yaml, log.jsonl (one line per epoch), training.png.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list, set_seed
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm.auto import tqdm

from mindeye.cli import require_checkpoint
from mindeye.errors import ConfigValueError, MissingFileError, OutDirInUse
from mindeye.metrics import retrieval_top1
from mindeye.models import MindEye2, build_model, count_parameters, load_checkpoint, save_calibration, save_checkpoint
from mindeye.models.prior import check_sampler, draw_noise
from mindeye.models.readout import TokenReadout, fit_token_readout, save_readouts
from mindeye.targets import TargetRows, build_target_cache
from offline_training.data import SubjectData, betas_units, hold_out_fold, load_subject
from offline_training.evaluate import predict_test_set
from offline_training.losses import (ContrastiveSchedule, Mixup, low_level_loss, mixco_loss, sample_mixup,
                                     soft_clip_loss, unit_rows)
from offline_training.plots import plot_training_log

logger = logging.getLogger(__name__)
MODES = ("pretrain", "finetune", "scratch")
FREEZABLE = ("aligner", "backbone", "retrieval_head", "low_level_head", "prior")
STATE_DIR, CHECKPOINT_DIR = "train_state", "checkpoint"
RESUME_IGNORED_KEYS = ("out_dir", "resume", "progress", "train.stop_after_epoch")  # may differ on resume


# --- data ----------------------------------------------------------------------------------------------

class TargetTable:
    """CLIP tokens and low-level latents of the images a run uses. Held in memory (as stored, float16) when
    they take at most `memory_budget_mb`, else read from the target cache batch by batch
    (`mindeye.targets.TargetRows`), so memory per process does not grow with the number of images
    (full NSD's bigG tokens are ~50 GB). Random rows from the chunked hdf5 cost ~10 % of a small-world step."""

    def __init__(self, rows: TargetRows, memory_budget_mb: float = 0.0):
        self.rows = rows
        self.held = rows.read_all() if rows.stored_bytes() <= memory_budget_mb * 2**20 else None

    def get(self, image_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (n, L, D) and (n, C, S, S) for `image_ids` (any order, repeats allowed)."""
        if self.held is None:
            tokens, low_level = self.rows.read(image_ids)
        else:
            at = self.rows.positions(np.asarray(image_ids))
            tokens, low_level = (held[at].astype(np.float32) for held in self.held)
        return torch.from_numpy(tokens), torch.from_numpy(low_level)


def load_targets(data_cfg: DictConfig, image_ids: np.ndarray, accelerator: Accelerator,
                 progress: bool) -> tuple[TargetTable, tuple[int, int], tuple[int, int, int]]:
    """The targets of `image_ids`, computed into the on-disk cache by one process after another (writing
    takes the hdf5 file's lock), then read per batch by each; logs each process's peak memory after."""
    ids = np.unique(image_ids)
    for rank in range(accelerator.num_processes):
        if rank == accelerator.process_index:
            cache = build_target_cache(data_cfg)
            cache.compute(ids, progress=progress and accelerator.is_main_process)
            shapes = (tuple(cache.token_shape), tuple(cache.low_level_shape))
        accelerator.wait_for_everyone()
    table = TargetTable(cache.rows(ids), data_cfg.targets_in_memory_mb)
    logger.info("process %d: targets of %d images %s %s; peak memory so far %.0f MB", accelerator.process_index,
                len(ids), "read per batch from" if table.held is None else "held in memory from", cache.path,
                peak_rss_mb())
    return table, *shapes


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


class BatchPlan:
    """Which trials of each subject make global batch `step` of `epoch`, and which rows this process takes."""

    def __init__(self, train_sizes: list[int], batch_per_subject: int, num_processes: int, process_index: int,
                 seed: int, samples_per_epoch: int | None = None):
        if batch_per_subject < 1 or batch_per_subject % num_processes:
            raise ValueError(f"train.batch_per_subject={batch_per_subject} must be a positive multiple of the "
                             f"number of processes ({num_processes}): each process takes an equal share")
        if min(train_sizes) < batch_per_subject:
            raise ValueError(f"train.batch_per_subject={batch_per_subject} exceeds a subject's training set "
                             f"(sizes {train_sizes})")
        self.sizes, self.batch, self.seed = train_sizes, batch_per_subject, seed
        # An epoch: `samples_per_epoch` trials over all subjects (the official code's 750 x sessions), or, without
        # it, one pass over the largest subject's training set.
        global_batch = batch_per_subject * len(train_sizes)
        if samples_per_epoch is not None and samples_per_epoch < global_batch:
            raise ValueError(f"train.samples_per_epoch={samples_per_epoch} is less than one global batch "
                             f"({global_batch} trials)")
        self.steps_per_epoch = (samples_per_epoch // global_batch if samples_per_epoch is not None
                                else max(train_sizes) // batch_per_subject)
        share = batch_per_subject // num_processes

        def rows_of(rank: int) -> np.ndarray:  # a process's rows: its share of every subject's block
            return np.concatenate([s * batch_per_subject + rank * share + np.arange(share)
                                   for s in range(len(train_sizes))])

        self.local_rows = torch.from_numpy(rows_of(process_index))  # this process's rows, in canonical order
        gathered = np.concatenate([rows_of(rank) for rank in range(num_processes)])  # rank-major, as all_gather
        self.canonical_from_gathered = torch.from_numpy(np.argsort(gathered))
        self.local_block = slice(process_index * share, (process_index + 1) * share)  # within each subject's block

    def epoch_order(self, epoch: int) -> list[np.ndarray]:
        """Per subject, the trial indices of the whole epoch: reshuffled passes over its training set."""
        rng = np.random.default_rng([self.seed, 0, epoch])
        needed = self.steps_per_epoch * self.batch
        return [np.concatenate([rng.permutation(n) for _ in range(math.ceil(needed / n))])[:needed]
                for n in self.sizes]

    def step_rng(self, epoch: int, step: int) -> tuple[np.random.Generator, int]:
        """A numpy generator (mixup) and an integer seed (the prior's torch generator) for one global batch."""
        mixup_seeds, prior_seeds = np.random.SeedSequence([self.seed, 1, epoch, step]).spawn(2)
        return np.random.default_rng(mixup_seeds), int(prior_seeds.generate_state(1, np.uint32)[0])


# --- model ---------------------------------------------------------------------------------------------

class TrainingModule(nn.Module):
    """The one module accelerate wraps (DDP, FSDP, DeepSpeed): every use of parameters goes through forward.

    `forward(task, ...)`: "train" (several subjects' voxels -> retrieval tokens, low-level latents, per-row
    prior loss), "encode" (one subject -> MindEyeOutput), "prior_loss" and "sample".
    """

    def __init__(self, model: MindEye2):
        super().__init__()
        self.model = model

    def forward(self, task: str, **inputs: Any) -> Any:
        if task == "train":
            return self._train(**inputs)
        if task == "encode":
            return self.model(inputs["voxels"], inputs["subject"])
        if task == "prior_loss":
            return self.model.prior.loss_per_row(inputs["brain_bnd"], inputs["image_bnd"], inputs["t_b"],
                                                 inputs["noise_bnd"], inputs["keep_b"])
        if task == "sample":
            return self.model.prior.sample(**inputs)
        raise ValueError(f"unknown task {task!r}")

    def _train(self, voxels: list[tuple[str, torch.Tensor]], image_bnd: torch.Tensor, t_b: torch.Tensor,
               noise_bnd: torch.Tensor, keep_b: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Each subject through its own aligner, then all rows together through the shared rest."""
        aligned_bh = torch.cat([self.model.aligner(v, subject) for subject, v in voxels])
        latent_bh, tokens_bnd = self.model.backbone(aligned_bh)
        low_level = self.model.low_level_head(latent_bh) if self.model.low_level_head is not None else None
        return {"retrieval": self.model.retrieval_head(tokens_bnd), "low_level": low_level,
                "prior_b": self.model.prior.loss_per_row(tokens_bnd, image_bnd, t_b, noise_bnd, keep_b)}


def build_run_model(cfg: DictConfig, subjects: list[SubjectData], token_shape: tuple[int, int],
                    low_level_shape: tuple[int, int, int]) -> MindEye2:
    """A fresh model from `cfg.model` (pretrain, scratch) or one initialised from `cfg.init_from` (finetune)."""
    voxels = {s.name: s.n_voxels for s in subjects}
    if cfg.mode != "finetune":
        channels, size, _ = low_level_shape
        return build_model(cfg.model, voxels_per_subject=voxels, clip_tokens=token_shape[0], clip_dim=token_shape[1],
                           low_level={"latent_channels": channels, "latent_size": size})
    return init_from_pretrained(init_checkpoint(cfg.init_from), voxels, token_shape, low_level_shape)


def add_backbone_adapters(model: MindEye2, rank: int) -> MindEye2:
    """The parameter-efficient fine-tune: rank-`rank` LoRA adapters (peft) on the backbone's linears, trained
    with the (fresh) aligners; every other weight frozen."""
    from peft import LoraConfig, inject_adapter_in_model

    model.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=["fc1", "fc2", "to_tokens"]),
                            model.backbone)
    model.aligner.requires_grad_(True)
    return model


def merge_adapters(model: MindEye2) -> MindEye2:
    """`model` as checkpoints hold it: a copy with each LoRA adapter merged into the weight it adapts and the
    plain layer back in its place (the model itself when it has none)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapted = [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    if not adapted:
        return model
    merged = copy.deepcopy(model)
    for name in adapted:
        layer = merged.get_submodule(name)
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(merged.get_submodule(parent), child, layer.get_base_layer())
    return merged


def init_checkpoint(init_from: str) -> Path:
    """The checkpoint `init_from` names: a checkpoint folder or a pretraining run's folder holding one."""
    path = Path(init_from)
    return path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path


def init_from_pretrained(checkpoint_dir: Path, voxels_per_subject: dict[str, int], token_shape: tuple[int, int],
                         low_level_shape: tuple[int, int, int]) -> MindEye2:
    """The pretrained model's shared weights (backbone, heads, prior) for `voxels_per_subject`'s subjects:
    a subject the checkpoint knows keeps its aligner, a new one gets a fresh aligner. Aligners of other
    subjects are left out, so the fine-tuned checkpoint holds only what it was trained for."""
    pretrained = load_checkpoint(checkpoint_dir)
    config = pretrained.config
    if (config.clip_tokens, config.clip_dim) != tuple(token_shape):
        raise ValueError(f"{checkpoint_dir} predicts {config.clip_tokens} x {config.clip_dim} tokens but the data's "
                         f"CLIP encoder gives {token_shape[0]} x {token_shape[1]}")
    if config.low_level.enabled and (config.low_level.latent_channels, config.low_level.latent_size,
                                     config.low_level.latent_size) != tuple(low_level_shape):
        raise ValueError(f"{checkpoint_dir}'s low-level head predicts {config.low_level.latent_channels} x "
                         f"{config.low_level.latent_size}^2 latents but the data's codec gives {low_level_shape}")
    for name, n in voxels_per_subject.items():
        known = config.voxels_per_subject.get(name)
        if known is not None and known != n:
            raise ValueError(f"{checkpoint_dir} has an aligner for {name} with {known} voxels, the data has {n}")
    model = MindEye2(dataclasses.replace(config, voxels_per_subject=voxels_per_subject))  # fresh aligners
    wanted = model.state_dict()
    state = {k: v for k, v in pretrained.state_dict().items() if k in wanted}
    shared_missing = [k for k in wanted if k not in state and not k.startswith("aligner.")]
    if shared_missing:
        raise ValueError(f"{checkpoint_dir} lacks shared weights {shared_missing[:5]}")
    model.load_state_dict(state, strict=False)
    return model.train()


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; biases and the weights of normalisation layers are not decayed."""
    no_decay: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if name == "bias" or isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
                no_decay.add(id(param))
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in no_decay], "weight_decay": weight_decay},
              {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


# --- one epoch -------------------------------------------------------------------------------------------

class _GatherWithGrad(torch.autograd.Function):
    """all_gather along rows whose backward sums every process's gradient for this process's rows."""

    @staticmethod
    def forward(ctx, x_bk: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        parts = [torch.empty_like(x_bk) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(parts, x_bk.contiguous())
        ctx.rows = slice(torch.distributed.get_rank() * len(x_bk), (torch.distributed.get_rank() + 1) * len(x_bk))
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad_gk: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad_gk = grad_gk.clone()
        torch.distributed.all_reduce(grad_gk)  # every process's loss depends on these rows
        return grad_gk[ctx.rows]


def gather_with_grad(x_bk: torch.Tensor, accelerator: Accelerator) -> torch.Tensor:
    """(b, k) of each process -> (P b, k), rank-major; gradients flow back to each process's rows."""
    return _GatherWithGrad.apply(x_bk) if accelerator.num_processes > 1 else x_bk


@dataclass(frozen=True)
class GlobalBatch:
    """One global batch, every row of it (each process holds the whole batch and uses its own rows)."""

    voxels: list[torch.Tensor]  # per subject (batch_per_subject, V_s), mixed during BiMixCo epochs
    tokens_bnd: torch.Tensor  # (B, L, D) CLIP targets, subject-major
    low_level_bcss: torch.Tensor  # (B, C, S, S) low-level targets, mixed like the voxels
    mixup: Mixup | None
    t_b: torch.Tensor  # (B,) the prior's timesteps
    noise_bnd: torch.Tensor  # (B, L, D) the prior's noise
    keep_b: torch.Tensor  # (B,) False where the prior's condition is dropped


def make_global_batch(plan: BatchPlan, order: list[np.ndarray], epoch: int, step: int, subjects: list[SubjectData],
                      targets: TargetTable, train_cfg: DictConfig, prior_config, uses_mixup: bool,
                      device: torch.device) -> GlobalBatch:
    """Batch `step` of `epoch` with all its randomness, the same on every process."""
    b = plan.batch
    trials = [o[step * b:(step + 1) * b] for o in order]
    voxels = [torch.from_numpy(s.train_voxels[t]) for s, t in zip(subjects, trials)]
    tokens_bnd, low_level_bcss = targets.get(np.concatenate([s.train_image_ids[t] for s, t in zip(subjects, trials)]))
    mixup_rng, prior_seed = plan.step_rng(epoch, step)
    mixup = sample_mixup([b] * len(subjects), train_cfg.mixup.beta, train_cfg.mixup.prob, mixup_rng) \
        if uses_mixup else None
    if mixup is not None:
        voxels = [mixup.rows(i * b, (i + 1) * b).mix(v) for i, v in enumerate(voxels)]
        low_level_bcss = mixup.mix(low_level_bcss)  # the blurry target follows the voxels (docs/training.md, deviations)
    generator = torch.Generator(device=device).manual_seed(prior_seed)
    t_b, noise_bnd, keep_b = draw_noise(len(tokens_bnd), *tokens_bnd.shape[1:], prior_config.timesteps,
                                        prior_config.cond_drop_prob, generator=generator)
    return GlobalBatch(voxels, tokens_bnd.to(device), low_level_bcss.to(device), mixup, t_b, noise_bnd, keep_b)


def train_epoch(epoch: int, wrapped: nn.Module, optimizer, scheduler, plan: BatchPlan, subjects: list[SubjectData],
                targets: TargetTable, schedule: ContrastiveSchedule, cfg: DictConfig, prior_config,
                accelerator: Accelerator) -> dict[str, float]:
    """One pass of `plan.steps_per_epoch` global batches; returns the epoch's mean losses over all processes."""
    device, weights = accelerator.device, cfg.train.loss_weights
    order = plan.epoch_order(epoch)
    temperature = schedule.temperature(epoch)
    mine, canonical = plan.local_rows.to(device), plan.canonical_from_gathered.to(device)
    sums = torch.zeros(4, device=device)  # total, prior, contrastive, low-level
    wrapped.train()
    bar = tqdm(range(plan.steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False,
               disable=not (cfg.progress and accelerator.is_main_process))
    for step in bar:
        batch = make_global_batch(plan, order, epoch, step, subjects, targets, cfg.train, prior_config,
                                  schedule.uses_mixup(epoch), device)
        my_voxels = [(s.name, v[plan.local_block].to(device)) for s, v in zip(subjects, batch.voxels)]
        out = wrapped("train", voxels=my_voxels, image_bnd=batch.tokens_bnd[mine], t_b=batch.t_b[mine], noise_bnd=batch.noise_bnd[mine],
                      keep_b=batch.keep_b[mine])
        brain_gk = gather_with_grad(unit_rows(out["retrieval"]), accelerator)[canonical]  # the whole batch
        image_gk = unit_rows(batch.tokens_bnd)
        contrastive = mixco_loss(brain_gk, image_gk, temperature, batch.mixup) if batch.mixup is not None \
            else soft_clip_loss(brain_gk, image_gk, temperature)
        prior = out["prior_b"].mean()
        low_level = low_level_loss(out["low_level"], batch.low_level_bcss[mine]) \
            if out["low_level"] is not None else torch.zeros((), device=device)
        total = weights.prior * prior + weights.contrastive * contrastive + weights.low_level * low_level
        if not torch.isfinite(total):
            raise FloatingPointError(f"non-finite loss at epoch {epoch + 1} step {step}: prior {prior.item()}, "
                                     f"contrastive {contrastive.item()}, low-level {low_level.item()}")

        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(total)
        if cfg.train.grad_clip is not None:
            accelerator.clip_grad_norm_(wrapped.parameters(), cfg.train.grad_clip)
        optimizer.step()
        if not accelerator.optimizer_step_was_skipped:  # fp16: a step with overflowing gradients is skipped
            scheduler.step()
        sums += torch.stack([total, prior, contrastive, low_level]).detach().float()
        bar.set_postfix(loss=f"{total.item():.4f}")
    means = accelerator.reduce(sums / plan.steps_per_epoch, reduction="mean").tolist()
    return dict(zip(("train/loss", "train/prior", "train/contrastive", "train/low_level"), means))


# --- evaluation ------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(wrapped: nn.Module, data: SubjectData, targets: TargetTable, eval_cfg: DictConfig, timesteps: int,
             sample: bool, seed: int, device: torch.device) -> dict[str, float]:
    """Test-set retrieval with outputs averaged over each image's repeats, the prior's loss on the averaged
    backbone tokens (fixed noise, always conditioned) and, if `sample`, retrieval of prior-sampled tokens."""
    wrapped.eval()
    outputs = predict_test_set(lambda voxels, subject: wrapped("encode", voxels=voxels, subject=subject), data,
                               eval_cfg.batch_size, device)
    image_ids, backbone_ind, retrieval_ind = outputs.image_ids, outputs.backbone_tokens, outputs.retrieval_tokens
    tokens_ind, _ = targets.get(image_ids)
    score = retrieval_top1(retrieval_ind, tokens_ind.numpy(), eval_cfg.pool_size, eval_cfg.repeats, seed)
    result = {"image_top1": score.image_top1, "brain_top1": score.brain_top1, "chance": score.chance}

    generator = torch.Generator(device=device).manual_seed(seed)
    prior_losses, sampled = [], []
    for start in range(0, len(image_ids), eval_cfg.batch_size):
        brain_bnd = torch.from_numpy(backbone_ind[start:start + eval_cfg.batch_size]).to(device)
        image_bnd = tokens_ind[start:start + eval_cfg.batch_size].to(device)
        t_b, noise_bnd, keep_b = draw_noise(len(brain_bnd), *brain_bnd.shape[1:], timesteps, 0.0, generator=generator)
        prior_losses.append(wrapped("prior_loss", brain_bnd=brain_bnd, image_bnd=image_bnd, t_b=t_b,
                                    noise_bnd=noise_bnd, keep_b=keep_b).float().cpu())
        if sample:
            sampled.append(wrapped("sample", brain_tokens=brain_bnd, steps=eval_cfg.sample_steps,
                                   sampler=eval_cfg.get("sample_sampler", "ddim"), generator=generator).float().cpu())
    result["prior_loss"] = float(torch.cat(prior_losses).mean())
    if sample:
        score = retrieval_top1(torch.cat(sampled).numpy(), tokens_ind.numpy(), eval_cfg.pool_size,
                               eval_cfg.repeats, seed)
        result |= {"sampled_image_top1": score.image_top1, "sampled_brain_top1": score.brain_top1}
    wrapped.train()
    return result


def evaluate_subjects(wrapped: nn.Module, subjects: list[SubjectData], targets: TargetTable, cfg: DictConfig,
                      timesteps: int, sample: bool, device: torch.device) -> dict[str, float]:
    """`test/<subject>/<metric>` for each subject and `test/<metric>`, their mean."""
    record, per_metric = {}, {}
    for data in subjects:
        for key, value in evaluate(wrapped, data, targets, cfg.train.eval, timesteps, sample, cfg.seed,
                                   device).items():
            record[f"test/{data.name}/{key}"] = value
            per_metric.setdefault(key, []).append(value)
    return record | {f"test/{key}": float(np.mean(values)) for key, values in per_metric.items()}


# --- saving ----------------------------------------------------------------------------------------------

def full_model(accelerator: Accelerator, wrapped: nn.Module) -> MindEye2 | None:
    """The trained MindEye2 with all its weights on the main process (None elsewhere); with sharded
    parameters (FSDP, DeepSpeed) every process must call this, as it gathers them."""
    model = accelerator.unwrap_model(wrapped).model
    if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return model
    state = accelerator.get_state_dict(wrapped)
    if not accelerator.is_main_process:
        return None
    with torch.device("meta"):
        gathered = MindEye2(model.config)
    gathered.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, assign=True)
    return gathered


def save_model(accelerator: Accelerator, wrapped: nn.Module, out_dir: Path, subjects: list[SubjectData],
               extra: dict[str, Any], units: tuple[str, str], readouts: Callable[[MindEye2], dict] | None) -> None:
    """checkpoint/: the model (config.json + model.safetensors), the subjects' calibration statistics, with
    `units` = (units, estimator) of the betas they describe (offline_training.data.betas_units), and the token
    readouts `readouts` fits on the saved model (None: the checkpoint has none, as mid-run ones)."""
    model = full_model(accelerator, wrapped)
    if accelerator.is_main_process:
        model = merge_adapters(model)
        path = save_checkpoint(model, out_dir / CHECKPOINT_DIR, extra=extra)
        save_calibration(path, {s.name: (s.zscore_mean, s.zscore_std) for s in subjects}, units=units[0],
                         estimator=units[1])
        save_readouts(path, readouts(model) if readouts is not None else {})
    accelerator.wait_for_everyone()


def fit_readouts(model: MindEye2, subjects: list[SubjectData], targets: TargetTable, readout_cfg: DictConfig,
                 batch_size: int = 256) -> dict[str, TokenReadout]:
    """Each subject's token readout (mindeye.models.readout) on its training trials, for the subjects with at
    most readout.max_trials of them (its kernel is trials x trials): the one-session subject a run fine-tunes."""
    fitted, was_training = {}, model.training
    device = next(model.parameters()).device
    model.eval()
    for data in subjects:
        n = len(data.train_voxels)
        if n > readout_cfg.max_trials:
            continue
        with torch.no_grad():
            backbone_nld = torch.cat([model(torch.from_numpy(data.train_voxels[start:start + batch_size]).to(device),
                                            data.name).backbone_tokens.float().cpu()
                                      for start in range(0, n, batch_size)])
        fitted[data.name], loo_errors = fit_token_readout(backbone_nld, targets.get(data.train_image_ids)[0],
                                                          list(readout_cfg.alphas))
        logger.info("%s: token readout on %d trials, alpha %g (leave-one-out squared error %s)", data.name, n,
                    fitted[data.name].alpha, ", ".join(f"{a:g}: {e:.4g}" for a, e in loo_errors.items()))
    model.train(was_training)
    return fitted


def save_train_state(accelerator: Accelerator, out_dir: Path, progress: dict[str, Any]) -> None:
    """train_state/: model, optimizer, scheduler and RNG states (accelerate) + progress.json, replaced whole."""
    state_dir, tmp_dir = out_dir / STATE_DIR, out_dir / f"{STATE_DIR}.tmp"
    if accelerator.is_main_process and tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp_dir))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp_dir / "progress.json").write_text(json.dumps(progress))
        if state_dir.exists():
            shutil.rmtree(state_dir)
        tmp_dir.rename(state_dir)
    accelerator.wait_for_everyone()


def write_log(out_dir: Path, log: list[dict[str, Any]]) -> None:
    (out_dir / "log.jsonl").write_text("".join(json.dumps(record) + "\n" for record in log))


# --- the run ---------------------------------------------------------------------------------------------

def check_config(cfg: DictConfig) -> None:
    """Errors for settings that cannot make a run, naming the key, before any data loads."""
    if cfg.mode not in MODES:
        raise ConfigValueError(f"mode must be one of {MODES}, got {cfg.mode!r}")
    if cfg.mode == "finetune" and not cfg.init_from:
        raise ConfigValueError("mode=finetune needs init_from=<a checkpoint folder written by a pretraining run>")
    if cfg.mode != "finetune" and cfg.init_from:
        raise ConfigValueError(f"init_from is only for mode=finetune; mode={cfg.mode} trains from scratch")
    if cfg.mode == "finetune":
        require_checkpoint(init_checkpoint(cfg.init_from), "init_from")
    if cfg.get("adapter_rank") is not None and (cfg.mode != "finetune" or int(cfg.adapter_rank) < 1):
        raise ConfigValueError(f"adapter_rank is a positive rank for mode=finetune, got {cfg.adapter_rank!r} with "
                               f"mode={cfg.mode}")
    freeze = list(cfg.get("freeze") or [])
    if freeze and (cfg.mode != "finetune" or not set(freeze) <= set(FREEZABLE)):
        raise ConfigValueError(f"freeze lists parts of a pretrained model for mode=finetune, among {list(FREEZABLE)}; "
                               f"got {freeze} with mode={cfg.mode}")
    fold = cfg.get("validation_fold")
    if fold is not None and not (len(fold) == 2 and all(isinstance(k, int) for k in fold) and 1 <= fold[0] <= fold[1]
                                 and fold[1] >= 2):
        raise ConfigValueError(f"validation_fold is [k, n], fold k of n >= 2 folds, got {fold}")
    subjects = list(cfg.subjects or [])
    if not subjects or len(set(subjects)) != len(subjects) or not all(isinstance(s, int) for s in subjects):
        raise ConfigValueError(f"subjects must be a list of distinct subject numbers, got {cfg.subjects}")
    eval_subjects = cfg.train.eval.subjects
    if eval_subjects is not None and not set(eval_subjects) <= set(subjects):
        raise ConfigValueError(f"train.eval.subjects {list(eval_subjects)} must be among the trained subjects "
                               f"{subjects}")
    for key in ("epochs", "checkpoint_every"):
        if not isinstance(cfg.train[key], int) or cfg.train[key] < 1:
            raise ConfigValueError(f"train.{key} must be an integer >= 1, got {cfg.train[key]!r}")
    if not isinstance(cfg.train.eval.every, int) or cfg.train.eval.every < 1:
        raise ConfigValueError(f"train.eval.every must be an integer >= 1, got {cfg.train.eval.every!r}")
    check_sampler(cfg.train.eval.get("sample_sampler", "ddim"), "train.eval.sample_sampler")


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}."""
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat |= _flatten(value, f"{prefix}.{key}" if prefix else str(key))
    return flat


def _check_resumable(out_dir: Path, resolved: dict[str, Any]) -> None:
    before = _flatten(OmegaConf.to_container(OmegaConf.load(out_dir / "run_config.yaml")))
    now = _flatten(resolved)
    changed = sorted(k for k in before.keys() | now.keys()
                     if k not in RESUME_IGNORED_KEYS and before.get(k) != now.get(k))
    if changed:
        raise ValueError(f"resume=true with a config that differs from the run in {out_dir} in "
                         f"{[(k, before.get(k), now.get(k)) for k in changed][:8]}")


def train(cfg: DictConfig) -> Path:
    """Run (or resume) one training run as configured; returns out_dir."""
    check_config(cfg)
    accelerator = Accelerator(cpu=cfg.cpu, mixed_precision=cfg.train.mixed_precision)
    out_dir = Path(broadcast_object_list([str(cfg.out_dir)])[0])  # one folder, even if `now` differs
    resolved = OmegaConf.to_container(cfg, resolve=True) | {"out_dir": str(out_dir)}
    state_dir = out_dir / STATE_DIR
    if cfg.resume:
        if not (state_dir / "progress.json").is_file():
            raise MissingFileError(state_dir / "progress.json", "training state",
                                   f"resume=true but {state_dir} holds no training state to resume from; "
                                   f"start a new run without resume=true")
        _check_resumable(out_dir, resolved)
    elif state_dir.exists():
        raise OutDirInUse(f"{out_dir} already holds a run: resume=true continues it, or choose another out_dir")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(resolved), out_dir / "run_config.yaml")

    set_seed(cfg.seed)
    subjects = [load_subject(cfg.data, s, list(cfg.train_sessions) if cfg.train_sessions else None)
                for s in cfg.subjects]
    if cfg.get("validation_fold"):
        fold, folds = cfg.validation_fold
        subjects = [hold_out_fold(s, folds, fold) for s in subjects]
    image_ids = np.concatenate([np.concatenate([s.train_image_ids, s.test_image_ids]) for s in subjects])
    targets, token_shape, low_level_shape = load_targets(cfg.data, image_ids, accelerator, cfg.progress)
    model = build_run_model(cfg, subjects, token_shape, low_level_shape)
    if cfg.get("adapter_rank"):
        if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise ConfigValueError("adapter_rank runs without FSDP or DeepSpeed (its checkpoint merges the adapters "
                                   "of an unsharded model): use DDP or one process")
        model = add_backbone_adapters(model, int(cfg.adapter_rank))
    for part in cfg.get("freeze") or []:
        getattr(model, part).requires_grad_(False)
    prior_config = model.config.prior
    optimizer = make_optimizer(model, cfg.train.lr, cfg.train.weight_decay)
    plan = BatchPlan([len(s.train_voxels) for s in subjects], cfg.train.batch_per_subject,
                     accelerator.num_processes, accelerator.process_index, cfg.seed,
                     cfg.train.get("samples_per_epoch"))
    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # it cannot infer this without a DataLoader
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = len(plan.local_rows)
    wrapped, optimizer = accelerator.prepare(TrainingModule(model), optimizer)
    # Made after prepare (DeepSpeed may swap the optimizer) and kept out of it (accelerate would step it
    # once per process per global batch).
    epochs = cfg.train.epochs
    total_steps = epochs * plan.steps_per_epoch
    if total_steps < 3:  # OneCycleLR's warm-up and annealing phases need a step each past the first
        raise ConfigValueError(f"train.epochs={epochs} x {plan.steps_per_epoch} step(s) an epoch = {total_steps} "
                               f"optimizer step(s), too few for the one-cycle schedule: raise train.epochs to "
                               f"{-(-3 // plan.steps_per_epoch)} or more")
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.train.lr, total_steps=total_steps,
        pct_start=max(min(cfg.train.warmup_epochs / epochs, 0.5), 2 / total_steps),
        final_div_factor=cfg.train.final_div_factor)
    accelerator.register_for_checkpointing(scheduler)
    schedule = ContrastiveSchedule(epochs, cfg.train.mixup.fraction, cfg.train.mixup.temperature,
                                   cfg.train.softclip.temperature_start, cfg.train.softclip.temperature_end)

    progress: dict[str, Any] = {"epoch": 0, "log": []}
    if cfg.resume:
        accelerator.load_state(str(state_dir))
        progress = json.loads((state_dir / "progress.json").read_text())
    eval_names = set(cfg.train.eval.subjects or cfg.subjects)
    eval_subjects = [s for s in subjects if s.subject in eval_names]
    accelerator.print(f"{cfg.mode}: {[s.name for s in subjects]} ({[len(s.train_voxels) for s in subjects]} trials), "
                      f"{plan.steps_per_epoch} steps of {plan.batch * len(subjects)} per epoch, "
                      f"{accelerator.num_processes} process(es) on {accelerator.device}; parameters "
                      f"{count_parameters(model)}, trainable {sum(p.numel() for p in model.parameters() if p.requires_grad)}"
                      f"; starting at epoch {progress['epoch'] + 1}/{epochs}")

    for epoch in range(progress["epoch"], epochs):
        started = time.time()
        record: dict[str, Any] = {"epoch": epoch + 1, "step": (epoch + 1) * plan.steps_per_epoch,
                                  "contrastive": "bimixco" if schedule.uses_mixup(epoch) else "softclip",
                                  "temperature": schedule.temperature(epoch)}
        record |= train_epoch(epoch, wrapped, optimizer, scheduler, plan, subjects, targets, schedule, cfg,
                              prior_config, accelerator)
        record["lr"] = scheduler.get_last_lr()[0]
        last = epoch + 1 == epochs
        if last or (epoch + 1) % cfg.train.eval.every == 0:
            sample = cfg.train.eval.sample_every > 0 and (last or (epoch + 1) % cfg.train.eval.sample_every == 0)
            record |= evaluate_subjects(wrapped, eval_subjects, targets, cfg, prior_config.timesteps, sample,
                                        accelerator.device)
        record["seconds"] = time.time() - started
        progress = {"epoch": epoch + 1, "log": progress["log"] + [record]}
        accelerator.print(_summary(record))
        stop = cfg.train.stop_after_epoch is not None and epoch + 1 >= cfg.train.stop_after_epoch
        if last or stop or (epoch + 1) % cfg.train.checkpoint_every == 0:
            readouts = ((lambda model: fit_readouts(model, subjects, targets, cfg.readout))
                        if last or stop else None)  # fitted once, on the weights a run ends with
            save_model(accelerator, wrapped, out_dir, subjects,
                       extra={"mode": cfg.mode, "epochs_done": epoch + 1, "run": resolved}, units=betas_units(cfg.data),
                       readouts=readouts)
            save_train_state(accelerator, out_dir, progress)
        if accelerator.is_main_process:
            write_log(out_dir, progress["log"])
            if last or stop:
                plot_training_log(progress["log"], out_dir / "training.png")
        if stop:
            break
    accelerator.wait_for_everyone()
    return out_dir


def _summary(record: dict[str, Any]) -> str:
    text = (f"epoch {record['epoch']}: loss {record['train/loss']:.4f} (prior {record['train/prior']:.4f}, "
            f"{record['contrastive']} {record['train/contrastive']:.4f}, low-level {record['train/low_level']:.4f})")
    if "test/image_top1" in record:
        text += (f"; test top-1 image {record['test/image_top1']:.1%} brain {record['test/brain_top1']:.1%} "
                 f"(chance {record['test/chance']:.1%}), prior {record['test/prior_loss']:.4f}")
    if "test/sampled_image_top1" in record:
        text += f", sampled image {record['test/sampled_image_top1']:.1%}"
    return text

