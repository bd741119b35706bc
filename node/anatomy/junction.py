"""Parting two lungs that touch at a junction line, slice by slice, by a minimal cut.

Where the lungs meet in front of the heart (anterior junction) or in front of the spine
(posterior junction) the pleura between them is often thinner than a voxel: the low-density
mask holds one region, and neither density nor shape shows a neck (a U of lung around the
mediastinum is widest where its arms join). What does mark the junction is that it is the
shortest way across the region between the two lungs' bodies: a minimal s-t cut on the 4-connected
voxel graph of the slice, between seeds well inside each lung, is that line. Edges across voxels
brighter than the parenchyma (the pleura's partial volume) cost less, so a visible pleura wins.
"""
from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import breadth_first_order, maximum_flow

UNIT = 16  # capacity of an edge between two voxels of aerated lung
SEED = 1 << 20  # capacity from the source/sink to a seed voxel: never cut


def min_cut(region: np.ndarray, hu: np.ndarray, seeds_a: np.ndarray, seeds_b: np.ndarray,
            lung_hu: float, tissue_hu: float, bias: np.ndarray | None = None) -> np.ndarray:
    """The voxels of the 2-D ``region`` on ``seeds_a``'s side of a minimal cut from ``seeds_b``.

    Edge capacity: UNIT between voxels at ``lung_hu``, falling linearly to 1 at ``tissue_hu``
    (the brighter of the two voxels decides), times ``bias`` (>= 1) where given: among cuts of
    about the same length, the one where ``bias`` is low wins.
    """
    index = np.full(region.shape, -1, np.int64)
    n = int(region.sum())
    index[region] = np.arange(n)
    span = max(tissue_hu - lung_hu, 1.0)
    weight = np.clip(1 + (UNIT - 1) * (tissue_hu - hu) / span, 1, UNIT)
    weight = np.rint(weight * (1.0 if bias is None else bias)).astype(np.int32)
    rows, cols, caps = [], [], []
    for a_sl, b_sl in (((slice(None), slice(0, -1)), (slice(None), slice(1, None))),
                       ((slice(0, -1), slice(None)), (slice(1, None), slice(None)))):
        both = region[a_sl] & region[b_sl]
        u, v = index[a_sl][both], index[b_sl][both]
        c = np.minimum(weight[a_sl][both], weight[b_sl][both])
        rows += [u, v]
        cols += [v, u]
        caps += [c, c]
    source, sink = n, n + 1
    for seeds, (frm, to) in ((seeds_a & region, (source, None)), (seeds_b & region, (None, sink))):
        ids = index[seeds]
        rows.append(np.full(ids.size, source) if frm is not None else ids)
        cols.append(ids if frm is not None else np.full(ids.size, sink))
        caps.append(np.full(ids.size, SEED, np.int32))
    graph = sparse.csr_matrix((np.concatenate(caps).astype(np.int32),
                               (np.concatenate(rows), np.concatenate(cols))), shape=(n + 2, n + 2))
    graph.sum_duplicates()
    flow = maximum_flow(graph, source, sink).flow
    residual = (graph - flow).tocsr()
    residual.data = np.where(residual.data > 0, residual.data, 0)
    residual.eliminate_zeros()
    reached = breadth_first_order(residual, source, directed=True, return_predecessors=False)
    side = np.zeros(n + 2, bool)
    side[reached] = True
    out = np.zeros_like(region)
    out[region] = side[:n]
    return out
