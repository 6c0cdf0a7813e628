"""Diffusion prior: backbone tokens -> CLIP image tokens, DALL-E 2 style.

A non-causal transformer reads [brain tokens (n), timestep token (1), noisy image tokens (n)]
and predicts the clean image tokens (x_start) from its last n outputs; 100-step cosine schedule
(Nichol & Dhariwal); brain tokens are swapped for learned null tokens with probability
`cond_drop_prob` in training, which enables classifier-free guidance when sampling. Sampling runs
through diffusers schedulers (DDIM or DPM-Solver++, `PRIOR_SAMPLERS`), chosen by name.

The layer layout is the official MindEye2 prior's (lucidrains' dalle2-pytorch `PriorNetwork`), so its
weights import one to one: pre-norm blocks of multi-query attention (one key/value head shared by all
query heads, plus a learned null key/value) with cosine-similarity logits x 16, rotary embeddings on
the first `rotary_dim` features of each head and a T5-style relative position bias, then a SwiGLU
feed-forward; LayerNorms without bias. The learned positional embedding is added to the noisy image
tokens only: brain tokens are already position-specific (each comes from its own rows of the token
linear) and the rotary embedding and relative bias give every token its place in the sequence.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import nn

from mindeye.errors import ConfigValueError
from mindeye.models.config import PriorConfig

COSINE_SIM_SCALE = 16.0  # attention logits = 16 * cos(q, k): the official prior's temperature


def cosine_alphas_cumprod(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """alpha-bar_t for t = 0..T-1 (float64, CPU), cosine schedule with betas clipped at 0.999."""
    x = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64)
    f = torch.cos((x / timesteps + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(0, 0.999)
    return torch.cumprod(1 - betas, dim=0)


PRIOR_SAMPLERS = {  # name -> (diffusers scheduler, its options, options of its step())
    "ddim": (DDIMScheduler, {"clip_sample": False, "set_alpha_to_one": True}, {"eta": 0.0}),
    "dpmpp": (DPMSolverMultistepScheduler,
              {"algorithm_type": "dpmsolver++", "solver_order": 2, "final_sigmas_type": "zero"}, {}),
}


def check_sampler(sampler: str, setting: str | None = None) -> str:
    """`sampler` if it names a PRIOR_SAMPLERS entry, else a ConfigValueError listing them (and naming the
    config `setting` it came from)."""
    if sampler not in PRIOR_SAMPLERS:
        where = f"{setting}: " if setting else ""
        raise ConfigValueError(f"{where}unknown prior sampler {sampler!r}; choose one of {', '.join(PRIOR_SAMPLERS)}")
    return sampler


def prior_scheduler(sampler: str, timesteps: int) -> tuple[SchedulerMixin, dict]:
    """A fresh diffusers scheduler for the prior (they keep per-run state) and the options of its step().

    The schedule is diffusers' "squaredcos_cap_v2", whose alphas_cumprod equal `cosine_alphas_cumprod`
    (to float32 rounding, ~1e-7); the model predicts x_start ("sample"), nothing is clipped.
    Timesteps are "trailing": round(T - k * T / steps) - 1 for k = 0..steps-1, so sampling always starts
    from pure noise at t = T - 1 and, when steps divides T, the steps are evenly spaced and end at
    T / steps - 1, whose x_start is the sample. (The hand-written DDIM this replaced used
    round(linspace(T - 1, 0, steps)), which ends at t = 0; diffusers' DDIM cannot step between unevenly
    spaced timesteps, so only steps = 1 and steps = T give the same timesteps as before. When steps does
    not divide T, diffusers' DDIM moves x to the noise level of t - T // steps while the next listed
    timestep may be one lower, which costs quality (DiffusionPrior.sample warns); DPM-Solver++ steps
    between the listed timesteps exactly.)
    """
    scheduler_class, options, step_options = PRIOR_SAMPLERS[check_sampler(sampler)]
    scheduler = scheduler_class(num_train_timesteps=timesteps, beta_schedule="squaredcos_cap_v2",
                                prediction_type="sample", timestep_spacing="trailing", **options)
    return scheduler, dict(step_options)


def rotary_cos_sin(n: int, rotary_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency, each (n, rotary_dim); feature pairs (2i, 2i+1) share frequency i."""
    freqs = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) / rotary_dim)
    angles_nr = (torch.arange(n, device=device, dtype=torch.float32)[:, None] * freqs).repeat_interleave(2, dim=-1)
    return angles_nr.cos(), angles_nr.sin()


def apply_rotary(x_bhnd: torch.Tensor, cos_nr: torch.Tensor, sin_nr: torch.Tensor) -> torch.Tensor:
    """Rotate each feature pair (2i, 2i+1) of the first rotary_dim features by its position's angle."""
    r = cos_nr.shape[-1]
    x_rot, x_pass = x_bhnd[..., :r], x_bhnd[..., r:]
    even, odd = x_rot[..., 0::2], x_rot[..., 1::2]
    x_swapped = torch.stack((-odd, even), dim=-1).flatten(-2)  # (x0, x1) -> (-x1, x0)
    x_rot = x_rot * cos_nr.to(x_rot.dtype) + x_swapped * sin_nr.to(x_rot.dtype)
    return torch.cat((x_rot, x_pass), dim=-1)


def relative_position_buckets(n_queries: int, n_keys: int, buckets: int, max_distance: int,
                              device: torch.device) -> torch.Tensor:
    """(n_queries, n_keys) bucket ids, as dalle2-pytorch computes them for its prior.

    Keys are indexed with the null key first (sequence position p is key p + 1) and the distance is
    max(query - key index, 0): only tokens two or more places back are told apart, the query itself,
    the token before it and all later ones share bucket 0. Exact below buckets / 2, then log-spaced
    up to max_distance.
    """
    key_positions = torch.arange(n_keys, device=device)
    query_positions = torch.arange(n_queries, device=device)
    distance = (query_positions[:, None] - key_positions[None, :]).clamp(min=0)
    exact = buckets // 2
    log_ratio = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (buckets - exact)).long()).clamp(max=buckets - 1)
    return torch.where(distance < exact, distance, far)


class MaxScaledLayerNorm(nn.LayerNorm):
    """LayerNorm of x / max(x) over features, the official prior's output norm: same result up to eps,
    and the variance stays finite in fp16. (max, not |max|, as in the original.)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x / x.amax(dim=-1, keepdim=True).detach())


class PriorBlock(nn.Module):
    """x + Attention(x); x + SwiGLU-FF(x). Shapes: (b, L, d) -> (b, L, d)."""

    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.attn_norm = nn.LayerNorm(dim, bias=False)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim_head, bias=False)  # one key/value head shared by all heads
        self.null_kv = nn.Parameter(torch.randn(2, dim_head))  # a key/value every query may attend to
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.attn_out_norm = nn.LayerNorm(dim, bias=False)
        self.ff_norm = nn.LayerNorm(dim, bias=False)
        self.ff_in = nn.Linear(dim, 2 * ff_mult * dim, bias=False)  # value and gate
        self.ff_out = nn.Linear(ff_mult * dim, dim, bias=False)

    def forward(self, x_bld: torch.Tensor, bias_1hlm: torch.Tensor, cos_lr: torch.Tensor,
                sin_lr: torch.Tensor) -> torch.Tensor:
        b, length, _ = x_bld.shape
        h_bld = self.attn_norm(x_bld)
        q_bhld = self.to_q(h_bld).unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2)
        k_b1ld, v_b1ld = self.to_kv(h_bld).unsqueeze(1).chunk(2, dim=-1)
        q_bhld, k_b1ld = apply_rotary(q_bhld, cos_lr, sin_lr), apply_rotary(k_b1ld, cos_lr, sin_lr)
        null_k, null_v = self.null_kv.to(x_bld.dtype).unbind(0)  # (d_head,) each
        k_b1md = torch.cat((null_k.expand(b, 1, 1, -1), k_b1ld), dim=2)  # m = L + 1 keys
        v_b1md = torch.cat((null_v.expand(b, 1, 1, -1), v_b1ld), dim=2)
        q_bhld, k_b1md = F.normalize(q_bhld, dim=-1), F.normalize(k_b1md, dim=-1)
        heads = (b, self.heads, length + 1, self.dim_head)
        out_bhld = F.scaled_dot_product_attention(q_bhld, k_b1md.expand(heads), v_b1md.expand(heads),
                                                  attn_mask=bias_1hlm.to(q_bhld.dtype), scale=COSINE_SIM_SCALE)
        x_bld = x_bld + self.attn_out_norm(self.to_out(out_bhld.transpose(1, 2).flatten(2)))
        value, gate = self.ff_in(self.ff_norm(x_bld)).chunk(2, dim=-1)
        return x_bld + self.ff_out(value * F.silu(gate))


def draw_noise(batch: int, n_tokens: int, dim: int, timesteps: int, cond_drop_prob: float, *,
               generator: torch.Generator | None = None, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The randomness of one diffusion-loss evaluation: timestep t (b,), noise (b, n, d) and which rows keep
    their brain tokens (b,), drawn in that order (on the generator's device unless `device` is given)."""
    device = device if device is not None else (generator.device if generator is not None else None)
    t_b = torch.randint(0, timesteps, (batch,), device=device, generator=generator)
    noise_bnd = torch.randn((batch, n_tokens, dim), device=device, generator=generator)
    keep_b = torch.rand(batch, device=device, generator=generator) >= cond_drop_prob
    return t_b, noise_bnd, keep_b


class DiffusionPrior(nn.Module):
    """Predicts clean image tokens (b, n, d) from noisy ones, a timestep and brain tokens (b, n, d)."""

    def __init__(self, n_tokens: int, dim: int, config: PriorConfig):
        super().__init__()
        self.n_tokens, self.dim, self.config = n_tokens, dim, config
        self.time_mlp = nn.Sequential(  # sinusoidal embedding of t -> token
            nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))
        self.image_pos_emb = nn.Parameter(torch.randn(n_tokens, dim) * dim ** -0.5)
        self.null_brain_tokens = nn.Parameter(torch.randn(n_tokens, dim))
        self.rel_pos_bias = nn.Embedding(config.rel_pos_buckets, config.heads)
        self.blocks = nn.ModuleList(
            [PriorBlock(dim, config.heads, config.dim_head, config.ff_mult) for _ in range(config.depth)])
        self.final_norm = MaxScaledLayerNorm(dim, bias=False)
        self.project_out = nn.Linear(dim, dim, bias=False)

    def time_embedding(self, t_b: torch.Tensor) -> torch.Tensor:
        """Integer timesteps (b,) -> (b, 1, d)."""
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t_b.device) * (-math.log(10000) / (half - 1)))
        angles_bh = t_b.float()[:, None] * freqs[None, :]
        features_bd = torch.cat((angles_bh.sin(), angles_bh.cos()), dim=-1).to(self.time_mlp[0].weight.dtype)
        return self.time_mlp(features_bd).unsqueeze(1)

    def forward(self, noisy_image_bnd: torch.Tensor, t_b: torch.Tensor, brain_bnd: torch.Tensor,
                brain_keep_b: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted x_start (b, n, d); where `brain_keep_b` (bool, (b,)) is False, null tokens replace the brain's."""
        n, d = self.n_tokens, self.dim
        for name, tokens in (("noisy image tokens", noisy_image_bnd), ("brain tokens", brain_bnd)):
            if tokens.ndim != 3 or tuple(tokens.shape[1:]) != (n, d):
                raise ValueError(f"prior {name} must be (batch, {n}, {d}), got {tuple(tokens.shape)}")
        if brain_keep_b is not None:
            brain_bnd = torch.where(brain_keep_b[:, None, None], brain_bnd, self.null_brain_tokens.to(brain_bnd.dtype))
        tokens_bld = torch.cat((brain_bnd, self.time_embedding(t_b).to(brain_bnd.dtype),
                                noisy_image_bnd + self.image_pos_emb.to(noisy_image_bnd.dtype)), dim=1)  # L = 2n + 1
        length, device = tokens_bld.shape[1], tokens_bld.device
        buckets_lm = relative_position_buckets(length, length + 1, self.config.rel_pos_buckets,
                                               self.config.rel_pos_max_distance, device)
        bias_1hlm = self.rel_pos_bias(buckets_lm).permute(2, 0, 1).unsqueeze(0)
        cos_lr, sin_lr = rotary_cos_sin(length, self.config.rotary_dim, device)
        for block in self.blocks:
            tokens_bld = block(tokens_bld, bias_1hlm, cos_lr, sin_lr)
        return self.project_out(self.final_norm(tokens_bld[:, -self.n_tokens:]))

    def loss_per_row(self, brain_tokens: torch.Tensor, image_tokens: torch.Tensor, t_b: torch.Tensor,
                     noise_bnd: torch.Tensor, keep_b: torch.Tensor) -> torch.Tensor:
        """MSE per row (b,) between the predicted and true clean tokens, the image tokens noised to t_b with
        `noise_bnd` and the brain tokens dropped where `keep_b` is False. Training draws the randomness per
        global batch (`draw_noise`), so the loss does not depend on how a batch is split across processes."""
        alpha_bar_b11 = cosine_alphas_cumprod(self.config.timesteps).to(image_tokens.device, image_tokens.dtype)[t_b]
        alpha_bar_b11 = alpha_bar_b11[:, None, None]
        noisy_bnd = alpha_bar_b11.sqrt() * image_tokens + (1 - alpha_bar_b11).sqrt() * noise_bnd.to(image_tokens)
        predicted_bnd = self(noisy_bnd, t_b, brain_tokens, keep_b)
        return (predicted_bnd.float() - image_tokens.float()).pow(2).mean(dim=(1, 2))

    def loss(self, brain_tokens: torch.Tensor, image_tokens: torch.Tensor, *,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Diffusion loss: MSE between predicted and true clean image tokens at a random timestep per row."""
        noise = draw_noise(len(image_tokens), self.n_tokens, self.dim, self.config.timesteps,
                           self.config.cond_drop_prob, generator=generator, device=image_tokens.device)
        return self.loss_per_row(brain_tokens, image_tokens, *noise).mean()

    @torch.no_grad()
    def sample(self, brain_tokens: torch.Tensor, steps: int = 20, cond_scale: float = 1.0,
               generator: torch.Generator | None = None, sampler: str = "ddim") -> torch.Tensor:
        """Image tokens (b, n, d) sampled from Gaussian noise with a diffusers scheduler over `steps` timesteps.

        `sampler` names an entry of PRIOR_SAMPLERS ("ddim": deterministic DDIM; "dpmpp": DPM-Solver++(2M));
        both run over the training schedule (`cosine_alphas_cumprod`) with "trailing" timesteps (see
        `prior_scheduler`). Each step predicts x_start, which the scheduler turns into the next, less
        noisy x; the last step's x_start is the sample (where both schedulers' last step lands when it
        goes to alpha-bar = 1, as it does whenever steps divides T). cond_scale != 1 applies
        classifier-free guidance: x_start = uncond + cond_scale * (cond - uncond), uncond from the null
        brain tokens. The noise is drawn from `generator`, so equal seeds give equal samples.
        """
        timesteps = self.config.timesteps
        if not 1 <= steps <= timesteps:
            raise ValueError(f"steps must be in [1, {timesteps}], got {steps}")
        scheduler, step_options = prior_scheduler(sampler, timesteps)
        if sampler == "ddim" and timesteps % steps:
            warnings.warn(f"ddim with {steps} steps: diffusers' DDIM moves x by {timesteps} // {steps} = "
                          f"{timesteps // steps} timesteps a step while its timesteps are {timesteps / steps:.2f} "
                          "apart, so the model is told timesteps off by one from x's noise level; use steps that "
                          f"divide {timesteps} or the dpmpp sampler", stacklevel=2)
        scheduler.set_timesteps(steps)
        x_bnd = torch.randn(brain_tokens.shape, device=brain_tokens.device, dtype=brain_tokens.dtype,
                            generator=generator)
        for i, t in enumerate(scheduler.timesteps):
            x_start = guided_x_start(self, x_bnd, int(t), brain_tokens, self.null_brain_tokens, cond_scale)
            if i < steps - 1:
                x_bnd = scheduler.step(x_start, t, x_bnd, **step_options).prev_sample.to(brain_tokens.dtype)
        return x_start


def guided_x_start(denoise, x_bnd: torch.Tensor, t: int, brain_bnd: torch.Tensor,
                   null_brain_nd: torch.Tensor | None, cond_scale: float) -> torch.Tensor:
    """The denoiser's x_start at timestep t, guided: uncond + cond_scale * (cond - uncond), the unconditional
    branch being the same denoiser given the null brain tokens (what the prior's forward puts in place of a
    dropped condition), both in one batched call. `denoise(x, t_b, brain)`: the prior, or its exported graph."""
    b, device = x_bnd.shape[0], x_bnd.device
    if cond_scale == 1.0:
        return denoise(x_bnd, torch.full((b,), t, device=device), brain_bnd)
    if null_brain_nd is None:
        raise ValueError("prior guidance (cond_scale != 1) needs the prior's null brain tokens")
    null_bnd = null_brain_nd.to(brain_bnd).expand_as(brain_bnd)
    both = denoise(torch.cat((x_bnd, x_bnd)), torch.full((2 * b,), t, device=device), torch.cat((brain_bnd, null_bnd)))
    cond, uncond = both.chunk(2)
    return uncond + cond_scale * (cond - uncond)
