"""The attention analyses inside the fused kernel: per layer, one probe (:mod:`massact_lens._core.probes`).

Each probe gets the post-rotary queries and keys and the values of one layer as the
kernel does, with C of the batch already known (:class:`~massact_lens.attention._passes.KeyPositions`
in its early mode), and gives the kernel the value columns it needs weighed:

* :class:`MassProbe`: one column, 1 on C: the attention mass on C of every query and
  head, ``sum_{k in C} p_qk``. The logit gap needs no probability at all: the mean
  logit of a query over the keys it sees is ``scaling * q . mean(k)``, and the sum of
  its logits on C is ``scaling * q . sum_{k in C} k``, both from running sums of the
  keys along the key axis (float64), so nothing of size ``[query, key]`` is formed.
* :class:`SplitProbe`: ``[v * c, c]``: the term from C and the mass on C, for the
  implicit bias; the kernel's own output is ``hook_z`` and the rest is ``hook_z`` minus the term.
* :class:`NormProbe`: no column; the norms of the keys and values as the kernel sees them.

>>> import torch
>>> visible_sums(torch.ones(1, 1, 4, 1), torch.ones(1, 4, dtype=torch.bool), causal=True, window=None)[1][0, 0].tolist()
[1.0, 2.0, 3.0, 4.0]
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from massact_lens.attention._passes import repeat_kv
from massact_lens.attention.keys import fit_width


def _window_bounds(t: int, causal: bool, window: int | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query, the keys ``lo <= k < hi`` it may see (before padding)."""
    q = torch.arange(t, device=device)
    if causal:
        hi = q + 1
        lo = (q - window + 1).clamp_min(0) if window is not None else torch.zeros_like(q)
    else:
        hi = (q + window).clamp_max(t) if window is not None else torch.full_like(q, t)
        lo = (q - window + 1).clamp_min(0) if window is not None else torch.zeros_like(q)
    return lo, hi


def visible_sums(
    x: torch.Tensor, keys: torch.Tensor, *, causal: bool, window: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every query: the sum of ``x`` ``[batch, heads, key_pos, d]`` over the keys in
    ``keys`` ``[batch, key_pos]`` it sees, ``[batch, heads, query_pos, d]``, and how many
    such keys ``[batch, heads, query_pos]``, from running sums (float64)."""
    b, h, t, d = x.shape
    lo, hi = _window_bounds(t, causal, window, x.device)
    mask = keys[:, None, :, None].to(torch.float64)
    running = torch.zeros(b, h, t + 1, d + 1, dtype=torch.float64, device=x.device)
    running[:, :, 1:, :d] = torch.cumsum(x.to(torch.float64) * mask, dim=2)
    running[:, :, 1:, d] = torch.cumsum(mask[..., 0].expand(b, h, t), dim=2)
    window_sum = running[:, :, hi] - running[:, :, lo]
    return window_sum[..., :d], window_sum[..., d]


class MassProbe:
    """One layer of :func:`~massact_lens.attention.attention_concentration` in the kernel:
    per input and head, the mass on C, the logit-gap pieces and the uniform baseline."""

    def __init__(self, c_mask: torch.Tensor, real: torch.Tensor, causal: bool, window: int | None,
                 note: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> None:
        self.c, self.real, self.causal, self.window = fit_width(c_mask, int(real.shape[1])) & real, real, causal, window
        self.note = note
        self.rows: dict[str, torch.Tensor] = {}
        self.ran = False

    def values(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
        if key.shape[2] != self.real.shape[1] or query.shape[2] != self.real.shape[1]:
            raise RuntimeError(f"The kernel got {key.shape[2]} keys for {self.real.shape[1]} positions: the fused "
                               "route measures a pass without a cache or extra key slots.")
        # key sums per key/value head; query head g * rep + r reads kv head g (HF repeat_kv order)
        b, n_heads, t, d = (int(n) for n in query.shape)
        n_kv = int(key.shape[1])
        if n_heads % n_kv:
            raise ValueError(f"{n_kv} key/value heads do not divide {n_heads} query heads.")
        q = query.to(torch.float64).reshape(b, n_kv, n_heads // n_kv, t, d)
        all_sum, n = visible_sums(key, self.real, causal=self.causal, window=self.window)  # [b, kv, t, d], [b, kv, t]
        c_sum, n_c = visible_sums(key, self.c, causal=self.causal, window=self.window)
        n, n_c = (x[:, :, None].expand(-1, -1, n_heads // n_kv, -1).reshape(b, n_heads, t) for x in (n, n_c))
        mean = scaling * torch.einsum("bgrtd,bgtd->bgrt", q, all_sum).reshape(b, n_heads, t) / n.clamp_min(1)
        # [b, h, q]: the sum over C of the centred logits
        centred_c = scaling * torch.einsum("bgrtd,bgtd->bgrt", q, c_sum).reshape(b, n_heads, t) - n_c * mean
        real_q = self.real[:, None, :].to(torch.float64)
        total_c, count_c, count = ((t * real_q).sum(-1) for t in (centred_c, n_c, n))
        # centred logits sum to 0 over the keys a query sees: the other keys hold minus C's share
        gap = total_c / count_c + total_c / (count - count_c)
        self.rows["gap"] = gap.where((count_c > 0) & (count > count_c), torch.nan).float()  # NaN: a group is empty
        n_queries = self.real.sum(1).clamp_min(1).to(torch.float64)
        self.rows["uniform"] = ((n_c[:, 0] / n[:, 0].clamp_min(1)) * real_q[:, 0]).sum(-1).div(n_queries).float()
        column = self.c[:, None, :, None].to(value.dtype)
        return column.expand(value.shape[0], value.shape[1], value.shape[2], 1)

    def read(self, extra: torch.Tensor, output: torch.Tensor) -> None:
        if self.note is not None:  # a NaN / inf upstream reaches the output: the input is left out
            self.note(output, self.real)
        mass = extra[..., 0].float().where(self.real[:, :, None], 0.0)  # [b, q, h]
        self.rows["per_query"] = mass
        self.rows["mass"] = mass.sum(1) / self.real.sum(1).clamp_min(1)[:, None]
        self.ran = True


class SplitProbe:
    """One layer of :func:`~massact_lens.attention.implicit_bias` in the kernel: the term
    from C, ``sum_{k in C} p_qk v_k``, the mass on C per query and head, and ``hook_z``,
    the kernel's own output; the rest is ``hook_z`` minus the term (so ``bias + rest =
    hook_z`` holds by construction on this route), made by the reader a block of queries at
    a time.

    The columns are the narrower of two exact forms: one indicator column per key of C
    (``p_qk`` for each ``k in C``; the term is then ``sum_k p_qk v_k`` over those few keys,
    outside the kernel), when no input has more keys in C than a head has dims (the usual
    case: the start token, a few delimiters); else ``[v * c, c]`` (the term and the mass
    straight from the kernel)."""

    def __init__(self, c_mask: torch.Tensor, real: torch.Tensor,
                 note: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> None:
        self.c, self.real, self.note = fit_width(c_mask, int(real.shape[1])) & real, real, note
        self.parts: dict[str, torch.Tensor] = {}
        self.ran = False
        self._keys: torch.Tensor | None = None  # per-key form: the values of C's keys

    def values(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:  # noqa: ARG002
        if value.shape[2] != self.real.shape[1]:
            raise RuntimeError(f"The kernel got {value.shape[2]} values for {self.real.shape[1]} positions: the "
                               "fused route measures a pass without a cache or extra key slots.")
        counts = self.c.sum(1)
        n_c = int(counts.max()) if counts.numel() else 0
        if 0 < n_c <= int(value.shape[-1]):  # one column per key of C (padding columns all 0)
            order = torch.argsort((~self.c).to(torch.int8), dim=1, stable=True)[:, :n_c]  # C's positions first
            valid = torch.arange(n_c, device=order.device)[None, :] < counts[:, None]  # [b, n_c]
            columns = torch.zeros(*self.c.shape, n_c, dtype=value.dtype, device=value.device)
            columns.scatter_(1, order[:, None, :], valid[:, None, :].to(value.dtype))  # [b, key, n_c]
            at = order[:, None, :, None].expand(-1, value.shape[1], -1, value.shape[-1])
            self._keys = value.gather(2, at)  # [b, kv_heads, n_c, d]
            return columns[:, None].expand(-1, value.shape[1], -1, -1)
        self._keys = None
        c = self.c[:, None, :, None].to(value.dtype)
        return torch.cat([value * c, c.expand(*value.shape[:3], 1)], dim=-1)

    def read(self, extra: torch.Tensor, output: torch.Tensor) -> None:
        d = int(output.shape[-1])
        if self.note is not None:  # a NaN / inf upstream reaches the output: the input is left out
            self.note(output, self.real)
        z = output.float()
        if self._keys is not None:
            v_c = self._keys.float()
            v_c = v_c.repeat_interleave(int(output.shape[2]) // int(v_c.shape[1]), dim=1)  # HF repeat_kv
            p = extra.float()  # [b, q, h, n_c]: an input's columns past its own keys of C are all 0
            bias, mass = torch.einsum("bqhj,bhjd->bqhd", p, v_c), p.sum(-1)
            self._keys = None
        else:
            bias, mass = extra[..., :d].float(), extra[..., d].float()
        self.parts = {"bias": bias, "mass": mass, "z": z}  # the rest, z - bias, is made where it is read
        self.ran = True


class NormProbe:
    """One layer of :func:`~massact_lens.attention.token_features` in the kernel: the
    norms of keys and values ``[batch, key_pos, heads]`` and of each value's image
    through ``W_O`` (``w_o`` ``[heads, d_head, d_model]``)."""

    def __init__(self, w_o: torch.Tensor, real: torch.Tensor,
                 note: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None) -> None:
        self.w_o, self.real, self.note = w_o, real, note
        self.norms: dict[str, torch.Tensor] = {}
        self.ran = False

    def values(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> None:  # noqa: ARG002
        n_heads = int(query.shape[1])
        k = repeat_kv(key.transpose(1, 2).float(), n_heads)  # [b, pos, h, d]
        v = repeat_kv(value.transpose(1, 2).float(), n_heads)
        if self.note is not None:
            self.note("key", k, self.real)
            self.note("value", v, self.real)
        self.norms = {"key": k.norm(dim=-1), "value": v.norm(dim=-1),
                      "out": torch.einsum("bkhd,hdm->bkhm", v, self.w_o).norm(dim=-1)}
        self.ran = True

    def read(self, extra: torch.Tensor, output: torch.Tensor) -> None:  # pragma: no cover - no columns asked
        pass
