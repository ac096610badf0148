"""The Mamba language model (Gu & Dao 2023), baseline and polarized (Wang et al. 2025), in plain PyTorch.

Read top to bottom: RMSNorm -> MambaMixer (one selective-SSM layer) -> MambaBlock (pre-norm residual)
-> MambaLM (embedding, blocks, final norm, tied head, loss; recurrent decoding from
:mod:`models.generation`). Parameter names follow transformers' ``MambaForCausalLM`` so state dicts move
between the two without renaming. The conv, the scan, the residual add + norm and the loss go through
:mod:`kernels.dispatch`, which picks the fastest backend for the device (fused CUDA/Triton kernels on
GPU, PyTorch on CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import dispatch
from models.config import ModelConfig
from models.generation import Generation
from models.hub import HubMixin


class RMSNorm(nn.Module):
    """Residual add + RMSNorm: normalised in fp32, cast to the stream dtype, times the weight (as
    transformers' MambaRMSNorm); also returns the new residual stream x + residual in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return dispatch.add_rmsnorm(x, residual, self.weight, self.eps)


class AddLayerNorm(nn.LayerNorm):
    """Residual add + LayerNorm with RMSNorm's interface: the final norm of the polarization paper's MQAR
    model (``model.final_norm: layernorm``; zoology's ``ln_f``), applied to the fp32 stream."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        stream = x.float() if residual is None else x.float() + residual.float()
        return super().forward(stream).to(x.dtype), stream


@dataclass
class LayerState:
    """Recurrent state of one mixer: the last d_conv-1 conv inputs and the SSM state (fp32)."""

    conv: torch.Tensor  # (batch, d_inner, d_conv - 1)
    ssm: torch.Tensor  # (batch, d_inner, d_state_total)

    def repeat(self, n: int) -> LayerState:
        """Each sequence's state n times in a row (to score n continuations of one prompt)."""
        return LayerState(self.conv.repeat_interleave(n, 0), self.ssm.repeat_interleave(n, 0))


class MambaMixer(nn.Module):
    """One selective SSM layer: in_proj -> causal conv + SiLU -> x_proj -> Δ, B, C -> scan -> gate -> out_proj."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, di, k = cfg.d_model, cfg.d_inner, cfg.ssm.d_conv
        self.n_ones, self.n_zeros = cfg.polarize.ones, cfg.polarize.zeros
        self.in_proj = nn.Linear(d, 2 * di, bias=cfg.ssm.proj_bias)
        self.conv1d = nn.Conv1d(di, di, k, groups=di, padding=k - 1, bias=cfg.ssm.conv_bias)
        self.x_proj = nn.Linear(di, cfg.dt_rank + 2 * cfg.d_state_total, bias=False)
        self.dt_proj = nn.Linear(cfg.dt_rank, di, bias=True)
        # A = -exp(A_log) for the N learned channels only; polar channels have no parameter.
        self.A_log = nn.Parameter(torch.empty(di, cfg.ssm.d_state))
        self.D = nn.Parameter(torch.empty(di))
        self.out_proj = nn.Linear(di, d, bias=cfg.ssm.proj_bias)
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """mamba_ssm's S4D-real and Δ initialisation (Gu & Dao 2023, §3.6)."""
        s = self.cfg.ssm
        std = self.cfg.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(
            torch.rand(self.cfg.d_inner) * (math.log(s.dt_max) - math.log(s.dt_min)) + math.log(s.dt_min)
        ).clamp(min=s.dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log.copy_(torch.log(torch.arange(1, s.d_state + 1, dtype=torch.float32)).repeat(self.cfg.d_inner, 1))
        self.D.fill_(1.0)

    def _ssm_inputs(self, x: torch.Tensor):
        """From conv output x (b, L, d_inner): Δ before bias (b, d_inner, L), B and C (b, N_total, L)."""
        dt, B, C = self.x_proj(x).split([self.cfg.dt_rank, self.cfg.d_state_total, self.cfg.d_state_total], -1)
        dt = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # the bias is added in fp32 by the scan
        return dt, B.transpose(1, 2), C.transpose(1, 2)

    def _scan_kwargs(self):
        return dict(
            A=-torch.exp(self.A_log.float()),
            D=self.D.float(),
            n_ones=self.n_ones,
            n_zeros=self.n_zeros,
            zero_mode=self.cfg.polarize.zero_mode,
        )

    def forward(self, hidden: torch.Tensor, state: LayerState | None = None) -> torch.Tensor:
        """hidden: (b, L, d_model). With ``state``, a single token (L == 1) is one recurrent step and a
        longer input is a parallel prefill that continues from ``state`` and leaves its final state there
        (so a long prompt can be prefilled chunk by chunk in constant memory)."""
        L = hidden.shape[1]
        # (b, d_inner, L) views of in_proj's (b, L, 2 d_inner) output; split on the last dim so the backward
        # joins the two gradients into one contiguous (b, L, 2 d_inner) tensor for in_proj (no transpose copy)
        x, z = (t.transpose(1, 2) for t in self.in_proj(hidden).chunk(2, dim=-1))
        if state is not None and L == 1:
            return self.out_proj(self._step(x[..., 0], z[..., 0], state)[:, None])
        h0 = None
        if state is not None:  # the conv continues from the cached inputs; a zero state adds nothing to the scan
            k = self.cfg.ssm.d_conv
            x = torch.cat([state.conv.to(x.dtype), x], dim=-1)
            state.conv.copy_(x[..., -(k - 1) :])
            h0 = state.ssm if bool(state.ssm.any()) else None
        x = dispatch.causal_conv1d(x, self.conv1d.weight[:, 0], self.conv1d.bias, activation="silu")
        if state is not None:
            x = x[..., k - 1 :]
        dt, B, C = self._ssm_inputs(x.transpose(1, 2))
        out = dispatch.selective_scan(
            x, dt, B=B, C=C, z=z, delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
            return_last_state=state is not None, initial_state=h0, **self._scan_kwargs(),
        )
        if state is not None:
            out, state.ssm = out
        return self.out_proj(out.transpose(1, 2))

    def _step(self, x: torch.Tensor, z: torch.Tensor, state: LayerState) -> torch.Tensor:
        """One token: x, z (b, d_inner). Updates ``state`` in place; returns y (b, d_inner)."""
        window = torch.cat([state.conv, x[..., None]], dim=-1)  # (b, d_inner, d_conv)
        state.conv.copy_(window[..., 1:])
        x = (window * self.conv1d.weight[:, 0]).sum(-1)
        if self.conv1d.bias is not None:
            x = x + self.conv1d.bias
        x = F.silu(x)
        dt, B, C = self._ssm_inputs(x[:, None])
        y, state.ssm = dispatch.selective_step(
            state.ssm, x, dt[..., 0], B=B[..., 0], C=C[..., 0], z=z,
            dt_bias=self.dt_proj.bias.float(), dt_softplus=True, **self._scan_kwargs(),
        )
        return y

    def new_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> LayerState:
        di = self.cfg.d_inner
        return LayerState(
            conv=torch.zeros(batch, di, self.cfg.ssm.d_conv - 1, device=device, dtype=dtype),
            ssm=torch.zeros(batch, di, self.cfg.d_state_total, device=device, dtype=torch.float32),
        )


class MambaBlock(nn.Module):
    """Pre-norm residual block in mamba_ssm's fused add-norm form: it takes (hidden, residual), adds them
    into the new residual stream, and returns (mixer(norm(stream)), stream). The stream is fp32 when
    ``residual_in_fp32``, else it keeps the dtype hidden + residual would have. ``mixer`` is the
    sequence-mixing layer's class (Mamba-2's block is this one with models.mamba2.Mamba2Mixer)."""

    def __init__(self, cfg: ModelConfig, mixer: type[nn.Module] = MambaMixer):
        super().__init__()
        self.residual_in_fp32 = cfg.residual_in_fp32
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = mixer(cfg)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None,
                state: LayerState | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        normed, stream = self.norm(hidden, residual)
        if not self.residual_in_fp32:
            stream = stream.to(hidden.dtype if residual is None else torch.promote_types(hidden.dtype, residual.dtype))
        return self.mixer(normed, state), stream


class Backbone(nn.Module):
    """Embedding, ``n_layer`` blocks of one kind (MambaBlock here, TransformerBlock for the baseline) passing
    (hidden, residual), final norm."""

    def __init__(self, cfg: ModelConfig, block: type[nn.Module]):
        super().__init__()
        self.embeddings = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = (AddLayerNorm if cfg.final_norm == "layernorm" else RMSNorm)(cfg.d_model, cfg.norm_eps)

    def forward(self, input_ids: torch.Tensor, states: list | None = None) -> torch.Tensor:
        """Final normalised hidden states (b, L, d_model); with ``states`` (one per layer), continuing them."""
        hidden, residual = self.embeddings(input_ids), None
        for i, layer in enumerate(self.layers):
            hidden, residual = layer(hidden, residual, None if states is None else states[i])
        return self.norm_f(hidden, residual)[0]


class LMOutput(NamedTuple):
    """A named tuple, so wrappers that hook module outputs (ZeRO-3's backward gathering) see its tensors."""

    logits: torch.Tensor | None  # (b, L, padded_vocab); None when not asked for
    loss: torch.Tensor | None = None


class MambaLM(Generation, HubMixin, nn.Module):
    """Mamba language model with a head tied to the embedding (vocab padded to a multiple of 8)."""

    block = MambaBlock  # builds one layer from the config (Mamba2LM swaps the mixer)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.backbone = Backbone(cfg, self.block)
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        self.lm_head.weight = self.backbone.embeddings.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """mamba_ssm's initialisation: N(0, 0.02) embeddings, zero linear biases, SSM init, and
        out_proj rescaled by 1/sqrt(n_layer) (GPT-2's scheme, one residual per layer)."""
        cfg = self.config
        nn.init.normal_(self.backbone.embeddings.weight, std=cfg.initializer_range)
        for layer in self.backbone.layers:
            mixer = layer.mixer
            for lin in (mixer.in_proj, mixer.x_proj, mixer.out_proj):
                lin.reset_parameters()
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            mixer.conv1d.reset_parameters()
            mixer.reset_ssm_parameters()
            if cfg.rescale_prenorm_residual:
                mixer.out_proj.weight /= math.sqrt(cfg.n_layer)
        if cfg.init == "zoology":
            self._zoology_init()

    @torch.no_grad()
    def _zoology_init(self) -> None:
        """The polarization paper's MQAR init (its model's ``_init_weights``, applied over every module):
        every Linear N(0, initializer_range) with zero bias -- dt_proj's too, so Δ starts at softplus(0)
        = ln 2 -- and out_proj N(0, initializer_range / sqrt(2 n_layer)). Conv, A_log and D keep the
        mamba_ssm init above; the tied head is the embedding."""
        std = self.config.initializer_range
        for layer in self.backbone.layers:
            mixer = layer.mixer
            for lin in (mixer.in_proj, mixer.x_proj, mixer.dt_proj, mixer.out_proj):
                nn.init.normal_(lin.weight, std=std)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            if self.config.rescale_prenorm_residual:
                mixer.out_proj.weight /= math.sqrt(2 * self.config.n_layer)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (the tied head counts once)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.backbone.embeddings.weight.numel() if exclude_embeddings else n

    def borrowed_parameters(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """(module, parameter) pairs where a module's forward reads a parameter it does not own: the
        mixer hands its dt_proj and conv1d weights to the kernels directly, and the LM computes the loss
        from the tied embedding. Sharded data parallelism (ZeRO-3) must gather these around that forward."""
        pairs = [(self, self.lm_head.weight)]
        for layer in self.backbone.layers:
            m = layer.mixer
            pairs += [(m, p) for p in (*m.dt_proj.parameters(), *m.conv1d.parameters())]
        return pairs

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                states: list[LayerState] | None = None, return_logits: bool = True) -> LMOutput:
        """``labels[b, t]`` is the token that should follow ``input_ids[b, t]`` (already shifted, as
        nanoGPT's targets); -100 is ignored. The loss is the mean cross-entropy in fp32, computed chunk by
        chunk from the hidden states so the (tokens x vocab) logits are never materialised for it; they
        are only computed when ``return_logits`` (training passes False)."""
        hidden = self.backbone(input_ids, states)
        loss = None
        if labels is not None:
            loss = dispatch.linear_cross_entropy(hidden.flatten(0, 1), self.lm_head.weight, labels.flatten(),
                                                 ignore_index=-100)
        return LMOutput(logits=self.lm_head(hidden) if return_logits else None, loss=loss)
