"""Balanced clustering of a dense FFN's hidden units into equal-size experts.

Units whose input weights point the same way tend to fire on the same tokens, so grouping them makes an expert's
output large on some tokens and small on others: what a router can exploit. Every expert must hold exactly U / N
units (the experts are stacked tensors of one width), so assignment is capacity-constrained.
"""

from __future__ import annotations

import torch


def balanced_assign(similarity_UN: torch.Tensor) -> torch.Tensor:
    """Assign each unit to a cluster, every cluster receiving U / N units: greedily, most similar pairs first.

    Returns the cluster of each unit [U]. Deterministic (stable sort; ties broken by unit, then cluster index)."""
    n_units, n_clusters = similarity_UN.shape
    capacity = n_units // n_clusters
    order = torch.argsort(similarity_UN.flatten(), descending=True, stable=True).tolist()
    cluster_of = [-1] * n_units
    room = [capacity] * n_clusters
    left = n_units
    for flat in order:
        unit, cluster = divmod(flat, n_clusters)
        if cluster_of[unit] < 0 and room[cluster] > 0:
            cluster_of[unit], room[cluster] = cluster, room[cluster] - 1
            left -= 1
            if left == 0:
                break
    return torch.tensor(cluster_of, dtype=torch.long)


def balanced_clusters(
    features_UD: torch.Tensor, n_clusters: int, iterations: int = 10, seed: int = 0
) -> torch.Tensor:
    """Group the U rows of ``features_UD`` into ``n_clusters`` groups of equal size by balanced spherical k-means.

    Returns [n_clusters, U / n_clusters] unit indices, each group sorted ascending; flattened, it is a permutation
    of range(U). Centroids start from a seeded random choice of rows, so the result is reproducible."""
    n_units = features_UD.shape[0]
    if n_clusters < 1 or n_units % n_clusters:
        raise ValueError(
            f"cannot split {n_units} hidden units into {n_clusters} equal experts: choose a number of "
            f"experts that divides {n_units}"
        )
    if n_clusters == 1:
        return torch.arange(n_units)[None]
    x = torch.nn.functional.normalize(features_UD.double(), dim=1)
    generator = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(n_units, generator=generator)[:n_clusters]]
    cluster_of = balanced_assign(x @ centroids.T)
    for _ in range(iterations):
        sums = torch.zeros_like(centroids).index_add_(0, cluster_of, x)
        centroids = torch.nn.functional.normalize(sums, dim=1)
        new = balanced_assign(x @ centroids.T)
        if torch.equal(new, cluster_of):
            break
        cluster_of = new
    return torch.argsort(cluster_of, stable=True).view(n_clusters, -1)
