"""Router calibration: fit every router, by ridge regression, to predict which experts matter for a token.

On calibration text the model runs densely; for each layer and token we record the norm of each expert's
contribution to the layer output (for attention: its heads' output through its rows of W_o), and fit the router
weights W so that W x approximates the centred log of those norms. Softmax then gives each expert a probability
proportional to its predicted contribution (to the power ``sharpness``), so top-k and threshold routing drop the
experts that would have added least. The fit is one linear solve per router on accumulated normal equations.

Calibrated routers change the dense model's output (expert e is weighted S_e * N instead of exactly 1); a small
``sharpness`` keeps it closer to the original while keeping the ranking of experts.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from dsmoe.kernels.reference import activate
from dsmoe.model.attention import _attend
from dsmoe.model.rope import apply_rope

if TYPE_CHECKING:
    from dsmoe.model.attention import MoA
    from dsmoe.model.experts import MoEMLP
    from dsmoe.model.transformer import Transformer


class _NormalEquations:
    """Running X^T X and X^T Z of one router's inputs X [T, D] and targets Z [T, N]."""

    def __init__(self, d_model: int, n_experts: int):
        self.xtx = torch.zeros(d_model, d_model, dtype=torch.float64)
        self.xtz = torch.zeros(d_model, n_experts, dtype=torch.float64)
        self.ztz = torch.zeros((), dtype=torch.float64)
        self.tokens = 0

    def add(self, x_TD: torch.Tensor, importance_TN: torch.Tensor) -> None:
        log_importance = importance_TN.double().clamp_min(1e-12).log()
        target = log_importance - log_importance.mean(
            dim=1, keepdim=True
        )  # softmax ignores a per-token constant
        x = x_TD.double()
        self.xtx += x.T @ x
        self.xtz += x.T @ target
        self.ztz += target.square().sum()
        self.tokens += x.shape[0]

    def solve(self, ridge: float) -> torch.Tensor:
        """Router weight [N, D] minimising |X W^T - Z|^2 + lambda |W|^2, lambda = ridge * mean diagonal of X^T X."""
        d = self.xtx.shape[0]
        lam = ridge * self.xtx.diagonal().mean().clamp_min(1e-12)
        return torch.linalg.solve(self.xtx + lam * torch.eye(d, dtype=torch.float64), self.xtz).T


def mlp_importance(layer: MoEMLP, x_TD: torch.Tensor) -> torch.Tensor:
    """|S_e * expert_e(x)| for every MLP expert under the layer's current (dense) router: [T, N]."""
    if layer.router is None:
        raise ValueError(f"mlp layer {layer.layer_idx} has no router: there is nothing to calibrate")
    experts = layer.experts
    h_TNF = activate(torch.einsum("td,nfd->tnf", x_TD, experts.w_in), experts.activation)
    probs_TN = layer.router(x_TD)
    return torch.einsum("tnf,nfd->tnd", h_TNF, experts.w_out).norm(dim=-1) * probs_TN


def attention_importance(
    layer: MoA, x_BTD: torch.Tensor, cos_Sd: torch.Tensor, sin_Sd: torch.Tensor
) -> torch.Tensor:
    """|S_e * (heads of e) W_o[e]| for every attention expert of a full causal pass (no cache): [B*T, N]."""
    if layer.router is None:
        raise ValueError(f"att layer {layer.layer_idx} has no router: there is nothing to calibrate")
    b, t, _ = x_BTD.shape
    cos, sin = cos_Sd[:t, None], sin_Sd[:t, None]
    k = apply_rope(layer.wk(x_BTD).view(b, t, layer.n_kv, layer.head_dim), cos, sin).transpose(1, 2)
    v = layer.wv(x_BTD).view(b, t, layer.n_kv, layer.head_dim).transpose(1, 2)
    q = apply_rope((x_BTD @ layer.wq.flatten(0, 1).T).view(b, t, layer.n_heads, layer.head_dim), cos, sin)
    o = _attend(q.transpose(1, 2), k, v, 0).transpose(1, 2).reshape(b * t, layer.n_experts, -1)
    x_TD = x_BTD.reshape(b * t, -1)
    return torch.einsum("tne,ned->tnd", o, layer.wo).norm(dim=-1) * layer.router(x_TD)


@torch.no_grad()
def calibrate_routers(
    model: Transformer, batches: Iterable[torch.Tensor], *, ridge: float = 1e-2, sharpness: float = 0.1
) -> dict:
    """Fit every router of ``model`` (in place) on the token batches [B, T]; returns per-router fit statistics
    (tokens seen and the R^2 of the log-importance fit)."""
    if sharpness <= 0:
        raise ValueError(f"sharpness must be > 0, got {sharpness}")
    was_training = model.training
    model.eval()  # and run as trained (no plan): importance is measured on the dense model
    cfg = model.cfg
    fits: dict[tuple[str, int], _NormalEquations] = {}
    handles = []
    for block in model.block_list():
        for layer in (block.att, block.mlp):
            if layer.router is None:
                continue
            key = (layer.kind, layer.layer_idx)
            fits[key] = _NormalEquations(cfg.d_model, layer.router.weight.shape[0])

            def hook(module, args, fit=fits[key]):
                if module.kind == "mlp":
                    x_TD = args[0]
                    fit.add(x_TD, mlp_importance(module, x_TD))
                else:
                    x_BTD, cos, sin = args[0], args[1], args[2]
                    fit.add(x_BTD.reshape(-1, x_BTD.shape[-1]), attention_importance(module, x_BTD, cos, sin))

            handles.append(layer.register_forward_pre_hook(hook))
    if not fits:
        raise ValueError("the model has no routers to calibrate (a Dense model, or one expert per layer)")
    try:
        for idx_BT in batches:
            model(idx_BT)
    finally:
        for h in handles:
            h.remove()
    report = {}
    for (kind, layer_idx), fit in fits.items():
        if fit.tokens == 0:
            raise ValueError("calibration saw no tokens: give at least one batch")
        weight = fit.solve(ridge)
        layer = getattr(model.blocks[layer_idx], kind)
        layer.router.weight.copy_((sharpness * weight).to(layer.router.weight.dtype))
        report[f"{kind}.{layer_idx}"] = {"tokens": fit.tokens, "r2": _r_squared(fit, weight)}
    model.train(was_training)
    return report


def _r_squared(fit: _NormalEquations, weight_ND: torch.Tensor) -> float:
    """Share of the (per-token centred) target's sum of squares that the fit explains."""
    sse = fit.ztz - 2 * (weight_ND @ fit.xtz).trace() + (weight_ND @ fit.xtx @ weight_ND.T).trace()
    return float(1 - sse / fit.ztz.clamp_min(1e-12))


def calibration_batches(
    tokenizer, documents: Iterable[str], n_tokens: int, seq_len: int, batch_size: int = 8
) -> list[torch.Tensor]:
    """Token batches [B, seq_len] holding the first ``n_tokens`` (rounded up to whole sequences) of the documents,
    concatenated with the end-of-text token between documents when the tokenizer has one."""
    from dsmoe.data.errors import DataError
    from dsmoe.data.tokenizer import eos_id

    if n_tokens < 1 or seq_len < 1:
        raise ValueError(f"need n_tokens >= 1 and seq_len >= 1, got {n_tokens} and {seq_len}")
    try:
        eos = eos_id(tokenizer)
    except DataError:  # a tokenizer without an end-of-text token: documents are simply concatenated
        eos = None
    n_seqs = -(-n_tokens // seq_len)
    ids: list[int] = []
    for doc in documents:
        ids.extend(tokenizer.encode(doc).ids + ([eos] if eos is not None else []))
        if len(ids) >= n_seqs * seq_len:
            break
    if len(ids) < seq_len:
        raise ValueError(f"the calibration text has {len(ids)} tokens, fewer than one sequence of {seq_len}")
    n_seqs = min(n_seqs, len(ids) // seq_len)
    tokens = torch.tensor(ids[: n_seqs * seq_len]).view(n_seqs, seq_len)
    return list(tokens.split(batch_size))
