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

import torch


__all__ = ["weighted_row_svd", "whitened_svd", "rank_for_energy", "factor_params"]


def factor_params(rows: int, cols: int, rank: int) -> int:
    """Parameters of a rank-`rank` factorization of a ``rows x cols`` matrix (bias excluded)."""
    return rank * (rows + cols)


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest rank whose singular values keep at least `energy` of the squared spectrum (the Frobenius energy)."""
    squared = singular_values.double().pow(2)
    cumulative = squared.cumsum(0) / squared.sum().clamp_min(1e-30)
    return int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=cumulative.dtype)).item()) + 1


def weighted_row_svd(
    matrix: torch.Tensor, row_weights: torch.Tensor | None = None, center: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Spectrum of a row-weighted matrix and what is needed to cut it at any rank.

    Args:
        matrix: ``(rows, cols)``, e.g. an embedding table.
        row_weights: non-negative ``(rows,)`` importance of each row (token frequencies); uniform when ``None``.
        center: subtract the (weighted) mean row first; it is returned as an offset to add back.

    Returns:
        ``(singular_values, right_vectors, offset)``: ``right_vectors`` is ``(cols, k)`` with orthonormal columns
        sorted by importance, so the rank-r factors are ``A = (matrix - offset) @ V[:, :r]`` and ``B = V[:, :r].T``.
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
    # Only the right singular vectors are needed: the (cols x cols) Gram matrix is small and exact in float64.
    gram = work.t() @ work
    eigenvalues, vectors = torch.linalg.eigh(gram)
    order = torch.argsort(eigenvalues, descending=True)
    singular_values = eigenvalues[order].clamp_min(0).sqrt()
    return singular_values, vectors[:, order], offset


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
        chol = torch.linalg.cholesky(moment)
        work = work @ chol
        inverse = torch.linalg.solve_triangular(
            chol, torch.eye(chol.shape[0], dtype=chol.dtype, device=chol.device), upper=False
        )
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    return u, s, vh, inverse
