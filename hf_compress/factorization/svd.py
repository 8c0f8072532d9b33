"""The linear algebra: weighted truncated SVD, activation-whitened SVD, and the choice of rank.

Both data-aware variants minimise an error weighted by how the matrix is used:

* embedding rows (tokens) weighted by how often they occur: ``min sum_i w_i ||E_i - E'_i||^2``. For diagonal row
  weights the optimum keeps the top right-singular subspace of ``diag(sqrt(w)) E`` and projects *every* row onto
  it, so rare tokens still get their best rank-r approximation; only the choice of subspace favours frequent ones.
* linear layers weighted by their inputs: ``min E_x ||(W - W') x||^2``. With the input second moment
  ``C = E[x x^T] = L L^T`` (Cholesky) the optimum is the truncated SVD of ``W L``, mapped back with ``L^{-1}``
  (the "whitening" view of SVD-LLM, Wang et al. 2024).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


__all__ = ["weighted_row_svd", "whitened_svd", "rank_for_energy", "factor_params"]


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run small dense LAPACK calls on one thread.

    On a busy machine, multi-threaded ``eigh`` of a 384 x 384 matrix took 8-20 s here (threads spinning on each
    other) against 0.03 s on one thread; these matrices are too small to gain from threads anyway.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def factor_params(rows: int, cols: int, rank: int) -> int:
    """Parameters of a rank-`rank` factorization of a ``rows x cols`` matrix (bias excluded)."""
    return rank * (rows + cols)


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest rank whose singular values keep at least `energy` of the squared spectrum (the Frobenius energy)."""
    squared = singular_values.double().pow(2)
    cumulative = squared.cumsum(0) / squared.sum().clamp_min(1e-30)
    rank = int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=cumulative.dtype)).item()) + 1
    return min(rank, len(squared))  # energy 1.0 when rounding leaves the cumulative sum just under 1: the full rank


def weighted_row_svd(
    matrix: torch.Tensor,
    row_weights: torch.Tensor | None = None,
    center: bool = True,
    metric: torch.Tensor | None = None,
    damping: float = 1e-2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Spectrum of a row-weighted matrix, optionally measured in a column metric, and how to cut it at any rank.

    Minimises ``sum_i w_i (E_i - E'_i) M (E_i - E'_i)^T``: rows weighted by `row_weights`, errors measured by
    ``M = metric`` (e.g. how strongly the model's output reacts to each embedding direction; identity when ``None``).
    The optimum is the truncated SVD of ``diag(sqrt(w)) E M^(1/2)``, mapped back with ``M^(-1/2)``.

    Args:
        matrix: ``(rows, cols)``, e.g. an embedding table.
        row_weights: non-negative ``(rows,)`` importance of each row (token frequencies); uniform when ``None``.
        center: subtract the (weighted) mean row first; it is returned as an offset to add back.
        metric: symmetric positive semi-definite ``(cols, cols)`` error metric, damped by `damping` times its mean
            diagonal so that directions the data never excited are still reproduced.

    Returns:
        ``(singular_values, analysis, synthesis, offset)``: the rank-r factors are
        ``A = (matrix - offset) @ analysis[:, :r]`` and ``B = synthesis[:r]``.
    """
    work = matrix.detach().double()
    weights = None
    if row_weights is not None:
        weights = row_weights.detach().double().clamp_min(0)
        if not torch.isfinite(weights).all() or weights.sum() <= 0:
            raise ValueError("row_weights must be finite, non-negative and not all zero.")
    offset = None
    if center:
        offset = work.mean(0) if weights is None else (weights[:, None] * work).sum(0) / weights.sum()
        work = work - offset
    if weights is not None:
        work = work * weights.sqrt()[:, None]
    root = inverse_root = None
    if metric is not None:
        metric = metric.double()
        eye = torch.eye(metric.shape[0], dtype=metric.dtype, device=metric.device)
        with _one_thread():
            values, vectors = torch.linalg.eigh(metric + damping * metric.diagonal().mean().clamp_min(1e-30) * eye)
        values = values.clamp_min(values.max() * 1e-12)
        root = (vectors * values.sqrt()) @ vectors.t()
        inverse_root = (vectors * values.rsqrt()) @ vectors.t()
        work = work @ root
    # Only the right singular vectors are needed: the (cols x cols) Gram matrix is small and exact in float64.
    gram = work.t() @ work
    with _one_thread():
        eigenvalues, right = torch.linalg.eigh(gram)
    order = torch.argsort(eigenvalues, descending=True)
    singular_values, right = eigenvalues[order].clamp_min(0).sqrt(), right[:, order]
    if root is None:
        return singular_values, right, right.t(), offset
    return singular_values, root @ right, right.t() @ inverse_root, offset


def whitened_svd(
    weight: torch.Tensor, input_moment: torch.Tensor | None = None, damping: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """SVD of ``weight @ L`` where ``L L^T`` is the (damped) input second moment; plain SVD without it.

    Args:
        weight: ``(out, in)`` linear weight.
        input_moment: ``(in, in)`` ``E[x x^T]`` of the layer's inputs, or ``None`` for a data-free SVD.
        damping: added to the diagonal, relative to its mean, so that never-active input directions stay invertible.

    Returns:
        ``(U, S, Vh, L_inv)``; the rank-r factors are ``up = U[:, :r] * S[:r]`` and
        ``down = Vh[:r] @ L_inv`` (``Vh[:r]`` without data).
    """
    work = weight.detach().double()
    inverse = None
    if input_moment is not None:
        moment = input_moment.double()
        moment = moment + damping * moment.diagonal().mean().clamp_min(1e-12) * torch.eye(
            moment.shape[0], dtype=moment.dtype, device=moment.device
        )
        with _one_thread():
            chol = torch.linalg.cholesky(moment)
            inverse = torch.linalg.solve_triangular(
                chol, torch.eye(chol.shape[0], dtype=chol.dtype, device=chol.device), upper=False
            )
        work = work @ chol
    return _thin_svd(work) + (inverse,)


def _thin_svd(work: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD through the eigenvectors of the smaller Gram matrix (float64).

    LAPACK's divide-and-conquer SVD took ~9 s on a whitened 1536 x 384 matrix on this CPU; the Gram route takes
    milliseconds and float64 keeps the singular vectors that matter (the large ones) accurate.
    """
    transposed = work.shape[0] < work.shape[1]
    if transposed:
        work = work.t()
    gram = work.t() @ work
    with _one_thread():
        eigenvalues, right = torch.linalg.eigh(gram)
    order = torch.argsort(eigenvalues, descending=True)
    s, right = eigenvalues[order].clamp_min(0).sqrt(), right[:, order]
    left = (work @ right) / s.clamp_min(s[0] * 1e-12 if s.numel() else 1.0)
    if transposed:
        return right, s, left.t()
    return left, s, right.t()
