"""The pair sums of one diffusion stage, as batched products (the block's inner loop).

Shapes: ``B`` blocks of ``R`` receiving rows with ``M`` partner slots (see
:mod:`ggnd_plugin.block.layouts`), ``H`` attention heads of width ``d``, ``C`` channels and
``C' = (lmax + 1)^2`` components per channel. These functions hold no weights: the block passes the
per-row projections (query, key, mixed state) it computed with its own.
"""

import torch
from torch import Tensor

from ggnd_plugin.block.layouts import RowGeometry

__all__ = ["MAX_EXPONENT", "attention_weights", "stage_pair_sums"]

# exp() of a shifted logit is clamped here (float32 overflows near 88); only pairs whose envelope weight
# is below exp(-80) are affected, and their weight in the softmax is below float32 resolution anyway.
MAX_EXPONENT = 80.0


def attention_weights(geometry: RowGeometry, query_rows: Tensor, key_partners: Tensor) -> Tensor:
    """alpha_ij per head ``(B, H, R, M)``: softmax over j of q_i.k_j/sqrt(d) + b(r_ij), weighted by
    the presence of the pair (the envelope at r_g), so rows sum to one and fade continuously.

    ``query_rows`` ``(B, R, H, d)`` arrives scaled by 1/sqrt(d) (folded into the block's weights);
    ``key_partners`` is ``(B, M, H, d)``.
    """
    logits = torch.matmul(query_rows.transpose(1, 2), key_partners.permute(0, 2, 3, 1))
    logits = logits + geometry.attention_bias  # (B, H, R, M)
    if not geometry.enveloped:
        return torch.softmax(logits, dim=-1)
    # Weighted by the envelope: the shift is the row maximum of logit + log(presence), so the largest
    # term is exactly 1, whatever the envelope (a pair at the edge of r_g cannot hold the maximum while
    # every other term underflows).
    shift = (logits.detach() + geometry.log_presence).amax(-1, keepdim=True)
    weights = torch.exp((logits - shift).clamp(max=MAX_EXPONENT)) * geometry.presence
    return weights / weights.sum(-1, keepdim=True)


def stage_pair_sums(
    geometry: RowGeometry,
    mixed_partners: Tensor,
    mixed_rows: Tensor,
    query_rows: Tensor | None,
    key_partners: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """The pair sums of one stage for a set of rows.

    ``mixed_partners`` ``(B, M, C, C')`` is ``W z_j`` of the partners, ``mixed_rows`` ``(B, R, C, C')``
    ``W z_i`` of the rows. Returns ``sum_j alpha_ij,head(c) W(z_j - z_i)_c`` ``(B, R, C, C')`` and, with
    the filter, ``sum_j abar_ij K_ij,f W(z_j - z_i)_c,a`` ``(B, R, C, C' * C')`` with ``abar`` the
    attention averaged over heads and ``K_ij,f = local_ij R_l(f)(r_ij) Y_f(x_ij)``. Sums over ``W z_j``
    become sums over the gradient by subtracting the row sum times the row's own ``W z_i``. Without a
    query (the ``mp`` variant) the weights are a smooth partner average and the values ``W z_j``
    themselves (no difference).
    """
    blocks, rows, partners = geometry.local.shape
    channels, components = mixed_rows.shape[-2:]
    diffusion = query_rows is not None
    if diffusion:
        groups = query_rows.shape[-2]  # heads
        alpha = attention_weights(geometry, query_rows, key_partners)
    else:  # mp: a smooth average over the partners, no attention
        groups = 1
        alpha = (geometry.local / geometry.count[..., None])[:, None]  # (B, 1, R, M)
    values = mixed_partners.reshape(blocks, partners, groups, -1).transpose(1, 2)  # (B, G, M, X)
    rate = torch.matmul(alpha, values).transpose(1, 2).reshape(blocks, rows, channels, components)
    if diffusion:
        rate = rate - mixed_rows  # rows of alpha sum to one
    if geometry.filter_kernel is None:
        return rate, None
    pair = alpha.mean(1)[:, :, None, :] * geometry.filter_kernel  # (B, R, C', M)
    flat = mixed_partners.reshape(blocks, partners, channels * components)
    filtered = torch.bmm(pair.reshape(blocks, rows * components, partners), flat)
    filtered = filtered.reshape(blocks, rows, components, channels * components)
    if diffusion:
        filtered = filtered - pair.sum(-1, keepdim=True) * mixed_rows.reshape(blocks, rows, 1, -1)
    # (B, R, C'(f), C, C'(a)) -> (B, R, C, C'(f) * C'(a))
    filtered = filtered.reshape(blocks, rows, components, channels, components).transpose(2, 3)
    return rate, filtered.reshape(blocks, rows, channels, components * components)
