"""PyTorch reference for D-DiT, following ../shared/design/ddit-model.md.

The transformer is diffusers' SD3Transformer2DModel with the D-DiT changes:
no pooled-text embedder, every joint block keeps its text stream (no
`context_pre_only`), an image head (`image_norm_out`, `image_proj_out`), a text
head (`text_norm_out`, `text_proj_out`) and `null_image_embd`.

This module is the numerical ground truth for the Rust exporter and worker. It is
never imported by the Rust build or tests; its outputs are committed as fixtures.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from diffusers import SD3Transformer2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.normalization import AdaLayerNormContinuous


class DDiTTimeEmbed(nn.Module):
    """`time_text_embed` without SD3's pooled-text part: sinusoid(256) -> MLP."""

    def __init__(self, dim: int):
        super().__init__()
        self.time_proj = Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.timestep_embedder = TimestepEmbedding(in_channels=256, time_embed_dim=dim)

    def forward(self, timestep: torch.Tensor) -> torch.Tensor:
        proj = self.time_proj(timestep).to(dtype=self.timestep_embedder.linear_1.weight.dtype)
        return self.timestep_embedder(proj)


class DualDiffSD3Transformer2DModel(SD3Transformer2DModel):
    """SD3 MM-DiT with the D-DiT changes (see ddit-model.md, "Transformer")."""

    @register_to_config
    def __init__(
        self,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        num_layers: int = 24,
        attention_head_dim: int = 64,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        caption_projection_dim: int = 1536,
        pooled_projection_dim: int = 2048,
        out_channels: int = 16,
        pos_embed_max_size: int = 192,
        dual_attention_layers: tuple = (),
        qk_norm: str | None = None,
        vocab_size: int = 32100,
    ):
        super().__init__(
            sample_size=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            num_layers=num_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=joint_attention_dim,
            caption_projection_dim=caption_projection_dim,
            pooled_projection_dim=pooled_projection_dim,
            out_channels=out_channels,
            pos_embed_max_size=pos_embed_max_size,
            dual_attention_layers=dual_attention_layers,
            qk_norm=qk_norm,
        )
        dim = self.inner_dim
        assert caption_projection_dim == dim, "D-DiT projects T5 states to the hidden size"
        self.time_text_embed = DDiTTimeEmbed(dim)
        # Every block keeps its text stream, including the last one.
        self.transformer_blocks = nn.ModuleList(
            [
                JointTransformerBlock(
                    dim=dim,
                    num_attention_heads=num_attention_heads,
                    attention_head_dim=attention_head_dim,
                    context_pre_only=False,
                    qk_norm=None,
                    use_dual_attention=False,
                )
                for _ in range(num_layers)
            ]
        )
        del self.norm_out
        del self.proj_out
        self.image_norm_out = AdaLayerNormContinuous(dim, dim, elementwise_affine=False, eps=1e-6)
        self.image_proj_out = nn.Linear(dim, patch_size * patch_size * self.out_channels, bias=True)
        self.text_norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.text_proj_out = nn.Linear(dim, vocab_size, bias=True)
        self.null_image_embd = nn.Parameter(torch.randn(1, 8, dim) * 0.02)

    # --- segments, in the same cut as the exporter -----------------------------------------
    def embed_time(self, timestep: torch.Tensor) -> torch.Tensor:
        return self.time_text_embed(timestep)

    def embed_image(self, latents: torch.Tensor) -> torch.Tensor:
        return self.pos_embed(latents)

    def embed_context(self, t5_hidden: torch.Tensor) -> torch.Tensor:
        return self.context_embedder(t5_hidden)

    def run_blocks(self, x, y, temb, start: int = 0, end: int | None = None):
        for block in self.transformer_blocks[start:end]:
            y, x = block(hidden_states=x, encoder_hidden_states=y, temb=temb)
        return x, y

    def image_head(self, x, temb, h: int, w: int) -> torch.Tensor:
        p = self.config.patch_size
        c = self.out_channels
        x = self.image_proj_out(self.image_norm_out(x, temb))
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def text_head(self, y) -> torch.Tensor:
        return self.text_proj_out(self.text_norm_out(y))

    def forward(self, latents, t5_hidden, timestep):
        """Velocity [B,C,H,W] and logits [B,L,V]. `latents=None` uses `null_image_embd`."""
        temb = self.embed_time(timestep)
        y = self.embed_context(t5_hidden)
        if latents is None:
            x = self.null_image_embd.expand(y.shape[0], -1, -1)
            x, y = self.run_blocks(x, y, temb)
            return None, self.text_head(y)
        p = self.config.patch_size
        h, w = latents.shape[-2] // p, latents.shape[-1] // p
        x = self.embed_image(latents)
        x, y = self.run_blocks(x, y, temb)
        return self.image_head(x, temb, h, w), self.text_head(y)


def t5_bucket_table(num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bucket of every relative position in [-max_distance, max_distance], as transformers computes it."""
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-max_distance, max_distance + 1, dtype=torch.long)
    return T5Attention._relative_position_bucket(rel, True, num_buckets, max_distance)


def flow_match_sigmas(steps: int, shift: float, num_train_timesteps: int) -> tuple[list[float], list[float]]:
    """Sigmas (with the final 0) and timesteps of FlowMatchEulerDiscreteScheduler, via diffusers itself."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)
    sched.set_timesteps(steps)
    return sched.sigmas.tolist(), sched.timesteps.tolist()


def vae_encode_mean_logvar(vae, image: torch.Tensor):
    dist = vae.encode(image).latent_dist
    return dist.mean, dist.logvar


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
