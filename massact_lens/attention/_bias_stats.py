"""Running sums behind :class:`~massact_lens.attention.ImplicitBias`: constancy without the tensors.

For each layer, query set (``all`` queries / ``outside`` C), term (``bias`` /
``rest``) and space, float64 sums from which the mean vector and the spread around
it come out exactly (sums of vectors, of squared norms, of norms, of unit vectors):

* space ``head``: the head-space vector ``z_h`` per head;
* space ``resid``: its image ``z_h @ W_O[h]`` per head (on sandwich blocks through the
  post-attention norm: ``z_h / rms`` with the gain inside ``W_O``), kept in head coordinates
  (``||z_h W_O[h]||^2 = z_h^T G_h z_h`` with ``G_h = W_O[h] W_O[h]^T``, and means
  map linearly), so nothing of size ``d_model`` is stored per head;
* space ``total``: the sum over the chosen heads in the residual stream,
  ``sum_h z_h @ W_O[h]``, in ``d_model`` coordinates.

Scopes: ``all`` (every query), ``across`` (the per-input mean vectors, one per
input with a query) and ``within`` (each input's cosine and relative variation
around its own mean, computed exactly from the batch, summed over inputs).

>>> sums = new_sums(n_layers=1, n_heads=2, d_head=3, d_model=4)
>>> tuple(sums["all.resid.vec"].shape), tuple(sums["all.total.vec"].shape)
((1, 2, 2, 2, 3), (1, 2, 2, 1, 4))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from jaxtyping import Bool, Float

__all__ = ["MODES", "SCOPES", "SPACES", "TERMS", "Source", "add_batch", "gram", "gram_root", "new_sums", "query_blocks", "spread"]

#: The query sets: every real query, and the real queries outside C.
MODES: tuple[str, ...] = ("all", "outside")
TERMS: tuple[str, ...] = ("bias", "rest")
SPACES: tuple[str, ...] = ("head", "resid", "total")
#: Scope names as :meth:`ImplicitBias.constancy` writes them.
SCOPES: dict[str, str] = {"all": "all", "within": "within_input", "across": "across_inputs"}
_TINY = torch.finfo(torch.float64).tiny
_TINY_32 = torch.finfo(torch.float32).tiny


def new_sums(n_layers: int, n_heads: int, d_head: int, d_model: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Zeroed sums: ``[layer, mode, term, k, ...]`` with ``k`` the heads (one for ``total``)."""
    lead = (n_layers, len(MODES), len(TERMS))
    out: dict[str, torch.Tensor] = {
        "all.n": torch.zeros(n_layers, len(MODES)),
        "across.n": torch.zeros(n_layers, len(MODES)),
        "mass": torch.zeros(n_layers, len(MODES), n_heads),
    }
    for space in SPACES:
        k, width = (1, d_model) if space == "total" else (n_heads, d_head)
        for scope in ("all", "across"):
            out[f"{scope}.{space}.vec"] = torch.zeros(*lead, k, width)
            out[f"{scope}.{space}.unit"] = torch.zeros(*lead, k, width)
            for stat in ("sq", "norm", "nonzero"):
                out[f"{scope}.{space}.{stat}"] = torch.zeros(*lead, k)
        for stat in ("cos", "cos_n", "rel", "rel_n"):
            out[f"within.{space}.{stat}"] = torch.zeros(*lead, k)
    return {name: t.to(device=device, dtype=torch.float64) for name, t in out.items()}


def gram(w_o: Float[torch.Tensor, "head d_head d_model"]) -> Float[torch.Tensor, "head d_head d_head"]:
    """``G_h = W_O[h] W_O[h]^T`` in float64: the residual-space inner product in head coordinates."""
    w = w_o.double()
    return torch.einsum("hdm,hem->hde", w, w)


def gram_root(g: Float[torch.Tensor, "head d_head d_head"]) -> Float[torch.Tensor, "head d_head d_head"]:
    """``L_h`` with ``L_h L_h^T = G_h`` (from ``G_h``'s eigenvectors; exact also for a singular
    ``G_h``): ``x G y^T = (x L) . (y L)``, so the residual-space inner products of a batch
    are plain dot products of ``x @ L``, one matmul per term instead of one per product.

    >>> g = gram(torch.randn(2, 3, 5))
    >>> root = gram_root(g)
    >>> bool(torch.allclose(root @ root.transpose(1, 2), g))
    True
    """
    values, vectors = torch.linalg.eigh(g.double())
    return vectors * values.clamp_min(0).sqrt()[:, None, :]


def _inner(space: str, a: torch.Tensor, b: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The inner product of a space over the last dim (``resid``: through ``G``)."""
    if space == "resid":
        return (torch.einsum("...hd,hde->...he", a, g) * b).sum(-1)
    return (a * b).sum(-1)


def _norm(space: str, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return _inner(space, a, a, g).clamp_min(0).sqrt()


#: A term of one batch, a block of queries at a time: ``block -> [batch, block, head, d_head]``
#: (float32; zero at queries left out of every sum), so that no per-query tensor of the
#: whole batch need exist for a term that is cheap to make (``rest = z - bias``).
Source = Callable[[slice], torch.Tensor]

#: Per-query temporaries are made for blocks of queries of about this many elements
#: (float32), so that the statistics' working memory stays small at any context length.
_BLOCK_ELEMENTS = 1 << 18


def query_blocks(n_queries: int, width: int) -> list[slice]:
    """Blocks of queries for per-query temporaries of ``width`` elements per query.

    >>> query_blocks(5, 1 << 17)
    [slice(0, 2, None), slice(2, 4, None), slice(4, 6, None)]
    """
    step = max(1, _BLOCK_ELEMENTS // max(1, width))
    return [slice(start, start + step) for start in range(0, n_queries, step)]


def add_batch(
    sums: dict[str, torch.Tensor],
    layer_index: int,
    terms: tuple[Source, Source],
    mass: Float[torch.Tensor, "batch query_pos head"],
    masks: tuple[Bool[torch.Tensor, "batch query_pos"], Bool[torch.Tensor, "batch query_pos"]],
    w_total: Float[torch.Tensor, "head_x_d_head d_model"],
    root: Float[torch.Tensor, "head d_head d_head"],
    resid_terms: tuple[Source, Source] | None = None,
) -> None:
    """Add one batch of one layer: both terms in head space, in the residual stream per head and
    summed over heads (``total``: ``x.flatten(2) @ w_total``), both query sets.

    ``resid_terms``: the head-space vectors whose images through ``root`` / ``w_total`` are the
    residual-space ones, when they differ from ``terms`` (sandwich blocks: each query's
    ``z / rms`` of the full attention output, with the post-attention norm's gain inside
    ``root`` and ``w_total``). ``root``: :func:`gram_root` of the layer's Gram matrices.

    One pass over blocks of queries: both query sets are summed together (their 0/1 weights
    stacked, the sums as float64 products with them), and each input's spread around its own
    mean comes from the squared distances to a centre fixed at the input's first block of
    queries, shifted exactly (``sum_S |y - a|^2 = sum_S |y - m_S|^2 + n_S |m_S - a|^2``; a is
    near the mean, so the shift loses nothing), so no per-query tensor of the whole batch is made."""
    w = torch.stack([mask.to(torch.float64) for mask in masks])  # [mode, b, q]
    counts = w.sum(2)  # [mode, b]
    sums["all.n"][layer_index] += counts.sum(1)
    sums["across.n"][layer_index] += (counts > 0).sum(1)
    sums["mass"][layer_index] += torch.einsum("mbq,bqh->mh", w, mass.to(torch.float64))
    n_modes, b, n_q = (int(n) for n in w.shape)
    n_heads, d_head = int(root.shape[0]), int(root.shape[1])
    d_model = int(w_total.shape[1])
    root32, w32 = root.float(), w_total.float()
    moments = {(term, space): _Moments(n_modes, b, 1 if space == "total" else n_heads,
                                       d_model if space == "total" else d_head, w.device)
               for term in range(len(TERMS)) for space in SPACES}
    for block in query_blocks(n_q, b * max(n_heads * d_head, d_model)):
        wb = w[:, :, block]
        for term in range(len(TERMS)):
            x = terms[term](block).float()  # [b, qb, h, d]
            r = x if resid_terms is None else resid_terms[term](block).float()
            moments[term, "head"].add(x, x, wb)
            moments[term, "resid"].add(r, torch.einsum("bqhd,hde->bqhe", r, root32), wb)
            total = (r.flatten(2) @ w32)[:, :, None]  # [b, qb, 1, d_model]
            moments[term, "total"].add(total, total, wb)
    for (term, space), m in moments.items():
        m.finish(sums, (layer_index, slice(None), term), space, counts, root if space == "resid" else None)


class _Moments:
    """The per-input float64 sums of one term in one space, block by block: ``x`` the
    coordinates summed (head coordinates for ``resid``), ``y`` those of the inner product
    (``x @ L``; ``x`` itself elsewhere)."""

    def __init__(self, n_modes: int, b: int, k: int, width: int, device: torch.device) -> None:
        f64 = torch.float64
        self.vec = torch.zeros(n_modes, b, k, width, dtype=f64, device=device)  # per input and query set
        self.unit = torch.zeros_like(self.vec)
        self.stats = torch.zeros(n_modes, b, k, 3, dtype=f64, device=device)  # sq, norm, nonzero
        self.to_centre = torch.zeros(n_modes, b, k, dtype=f64, device=device)
        self.centre = torch.zeros(b, k, width, device=device)  # in y coordinates (as wide as x: L is square)
        self.has_centre = torch.zeros(b, dtype=torch.bool, device=device)

    def add(self, x: torch.Tensor, y: torch.Tensor, wb: torch.Tensor) -> None:
        f64 = torch.float64
        norm = y.square().sum(-1).sqrt()  # [b, qb, k]
        nonzero = norm > 0
        unit = torch.where(nonzero[..., None], x / norm.clamp_min(_TINY_32)[..., None], 0.0)  # x / |y|
        self.vec += torch.einsum("mbq,bqkd->mbkd", wb, x.to(f64))
        self.unit += torch.einsum("mbq,bqkd->mbkd", wb, unit.to(f64))
        self.stats += torch.einsum("mbq,bqks->mbks", wb, torch.stack([norm.square(), norm, nonzero.float()], -1).to(f64))
        # an input's centre: the mean of its first block with a real query (no query before it counted)
        n_block = wb[0].sum(1)  # [b]
        new = ~self.has_centre & (n_block > 0)
        # (no test of ``new`` on the host: on a GPU that would wait for the device at every block)
        block_mean = torch.einsum("bq,bqkd->bkd", wb[0].to(y.dtype), y) / n_block.clamp_min(1).to(y.dtype)[:, None, None]
        self.centre = torch.where(new[:, None, None], block_mean, self.centre)
        self.has_centre |= new
        distance = (y - self.centre[:, None]).square().sum(-1)  # [b, qb, k]
        self.to_centre += torch.einsum("mbq,bqk->mbk", wb, distance.to(f64))

    def finish(self, sums: dict[str, torch.Tensor], at: tuple[int, slice, int], space: str, counts: torch.Tensor,
               root: torch.Tensor | None) -> None:
        """Fold the batch's per-input sums into ``sums`` (scopes ``all``, ``across``, ``within``)."""
        f64 = torch.float64
        scope = f"all.{space}"
        sums[f"{scope}.vec"][at] += self.vec.sum(1)
        sums[f"{scope}.unit"][at] += self.unit.sum(1)
        for i, stat in enumerate(("sq", "norm", "nonzero")):
            sums[f"{scope}.{stat}"][at] += self.stats[..., i].sum(1)
        # each input's mean (one vector per input with a query in the set)
        has = counts > 0  # [mode, b]
        mean = self.vec / counts.clamp_min(1)[..., None, None]  # [mode, b, k, m], x coordinates
        mean_y = mean if root is None else torch.einsum("mbhd,hde->mbhe", mean, root.to(f64))
        mean_norm = mean_y.square().sum(-1).sqrt()  # [mode, b, k]
        scope, kept = f"across.{space}", has[..., None].to(f64)
        flag = (mean_norm > 0) & has[..., None]
        sums[f"{scope}.vec"][at] += (mean * kept[..., None]).sum(1)
        sums[f"{scope}.sq"][at] += (mean_norm.square() * kept).sum(1)
        sums[f"{scope}.norm"][at] += (mean_norm * kept).sum(1)
        sums[f"{scope}.unit"][at] += torch.where(flag[..., None], mean / mean_norm.clamp_min(_TINY)[..., None], 0.0).sum(1)
        sums[f"{scope}.nonzero"][at] += flag.sum(1)
        # within each input: spread around its own mean (the distances to its centre, shifted
        # exactly to each set's mean), and the mean cosine to it
        shift = (mean_y - self.centre.to(f64)[None]).square().sum(-1)  # [mode, b, k]
        var = (self.to_centre / counts.clamp_min(1)[..., None] - shift).clamp_min(0)
        rel = (var.sqrt() / mean_norm).masked_fill(~has[..., None], float("nan"))
        unit_y = self.unit if root is None else torch.einsum("mbhd,hde->mbhe", self.unit, root.to(f64))
        denominator = mean_norm * self.stats[..., 2]
        cos = (unit_y * mean_y).sum(-1) / denominator.masked_fill(denominator == 0, float("nan"))
        for stat, value in (("cos", cos), ("rel", rel)):
            ok = ~torch.isnan(value)
            sums[f"within.{space}.{stat}"][at] += value.masked_fill(~ok, 0.0).sum(1)
            sums[f"within.{space}.{stat}_n"][at] += ok.sum(1)


def spread(sums: Mapping[str, torch.Tensor], scope: str, space: str, layer_index: int, mode: int, term: int,
           g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Per ``k``: mean cosine to the mean, relative variation, norm of the mean, mean norm; and ``n``.

    ``within``: the per-input cosine and relative variation averaged over inputs,
    and the mean norm of the per-input means. Empty scopes give NaN.
    """
    at = (layer_index, mode, term)
    if scope == "within":
        n = sums["across.n"][layer_index, mode]
        per = {s: sums[f"within.{space}.{s}"][at] for s in ("cos", "cos_n", "rel", "rel_n")}
        norm = sums[f"across.{space}.norm"][at] / n
        return per["cos"] / per["cos_n"], per["rel"] / per["rel_n"], norm, norm, int(n)
    n = sums[f"{scope}.n"][layer_index, mode]
    mean = sums[f"{scope}.{space}.vec"][at] / n
    mean_norm = _norm(space, mean, g)
    variance = (sums[f"{scope}.{space}.sq"][at] / n - mean_norm**2).clamp_min(0)
    cos = _inner(space, sums[f"{scope}.{space}.unit"][at], mean, g) / (mean_norm * sums[f"{scope}.{space}.nonzero"][at])
    return cos, variance.sqrt() / mean_norm, mean_norm, sums[f"{scope}.{space}.norm"][at] / n, int(n)
