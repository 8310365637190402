"""``knn``: the patch memory alone, a PatchCore-style baseline (see :mod:`edge_ad.knn.detector`)."""
