"""Self-supervised prototypicality (Sorscher et al. 2022, "Beyond neural scaling laws").

Embed every example, run k-means, and score each example by its cosine distance to the nearest
centroid: far from every prototype = hard. The embedding is the proxy model's penultimate
features (averaged over seeds), a sentence encoder for text (all-MiniLM-L6-v2 by default), or the
standardised raw inputs; ``auto`` picks the encoder for text, the proxy for labelled numeric
data and the raw inputs for unlabelled numeric data.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from prunekit.data.base import HIGHER, SCORES, Score
from prunekit.data.sources import TEXT
from prunekit.errors import PrunekitError

Embedding = Literal["auto", "proxy", "encoder", "input"]


def prototype_distances(embeddings: np.ndarray, clusters: int, seed: int, threads: int | None = None) -> np.ndarray:
    """Cosine distance of each row to the nearest of ``clusters`` k-means centroids (rows L2-normalised)."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    x = np.asarray(embeddings, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    clusters = min(clusters, x.shape[0])
    # k-means sums in a thread-count dependent order; pinning it to torch's count keeps runs reproducible
    with threadpool_limits(limits=threads or torch.get_num_threads()):
        model = KMeans(n_clusters=clusters, n_init=3, random_state=seed).fit(x)
    centroids = model.cluster_centers_
    centroids = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    return 1.0 - (x @ centroids.T).max(axis=1)


@SCORES.register("prototypes")
class Prototypes(Score):
    """Reads the proxy model or a sentence encoder, whichever its ``embedding`` picks for the data
    (``uses_proxy``); with the raw inputs, neither."""

    summary = "cosine distance to the nearest k-means centroid in an embedding space (Sorscher et al. 2022)"
    harder = HIGHER
    needs = frozenset({"proxy_model", "reference_model"})

    embedding: Embedding = Field("auto", description="auto, proxy (penultimate features), encoder (text), "
                                                     "input (raw inputs)")
    clusters: int = Field(0, ge=0, description="0: the number of classes, or 10 for unlabelled data")
    encoder: str = Field("minilm", description="a local sentence-encoder directory for text")

    def mode(self, context) -> str:
        if self.embedding != "auto":
            return self.embedding
        if context.modality == TEXT:
            return "encoder"
        return "proxy" if context.labels is not None else "input"

    def uses_proxy(self, context) -> bool:
        mode = self.mode(context)
        if mode == "encoder" and context.modality != TEXT:
            raise PrunekitError("prototypes with embedding=encoder embed text; use proxy or input for "
                                f"{context.modality} data")
        return mode == "proxy"

    def _clusters(self, num_classes: int | None) -> int:
        return self.clusters or num_classes or 10

    def attach(self, run):
        result: dict[str, np.ndarray] = {}

        def read(r) -> None:
            _, features = r.outputs(need_features=True)
            result["values"] = prototype_distances(features.numpy(), self._clusters(r.num_classes or None), r.seed)

        run.at_end(read)
        return lambda: result["values"]

    def compute(self, context) -> np.ndarray:
        if self.mode(context) == "encoder":
            embeddings = context.embeddings(self.encoder)
        else:
            from prunekit.data.proxy import standardize

            embeddings = standardize(context.source.inputs().flatten(1)).numpy()
        return prototype_distances(embeddings, self._clusters(context.num_classes), context.seed)
