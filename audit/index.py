"""Nearest-neighbour search with faiss on L2-normalised vectors (cosine = inner product).

* Up to ``exact_max`` database vectors: exact ``IndexFlatIP``.
* Above: ``IVF{nlist},Flat`` (inner product). ``nprobe`` is chosen by :meth:`NNIndex.tune`
  as the smallest power of two for which planted copies find their source as top-1 with
  recall ≥ ``recall_target`` (default 0.999); queries whose approximate score comes near a
  threshold are re-scored by exact search (:meth:`NNIndex.search_rescored`).
* faiss-gpu is used when ``faiss.get_num_gpus() > 0``; faiss-cpu otherwise.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import faiss
import numpy as np

log = logging.getLogger(__name__)

DEFAULT_EXACT_MAX = 200_000


def _gpu_available() -> bool:
    try:
        return faiss.get_num_gpus() > 0 and hasattr(faiss, "StandardGpuResources")
    except Exception:  # pragma: no cover - depends on the faiss build
        return False


class NNIndex:
    """A faiss index over ``vectors`` (float32 N×d, L2-normalised rows)."""

    def __init__(self, vectors: np.ndarray, *, exact_max: int = DEFAULT_EXACT_MAX,
                 nlist: int | None = None, use_gpu: bool | None = None, seed: int = 0,
                 train_sample: int | None = None):
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"index needs a non-empty N×d array, got shape {x.shape}")
        self.vectors = x
        self.n, self.d = x.shape
        self.use_gpu = _gpu_available() if use_gpu is None else (use_gpu and _gpu_available())
        self.kind = "flat" if self.n <= exact_max else "ivf"
        self.nprobe = 0
        self.recall: float | None = None
        self.build_seconds = 0.0
        self._gpu_res: Any = None
        t0 = time.perf_counter()
        self._exact = faiss.IndexFlatIP(self.d)
        self._exact.add(x)
        if self.kind == "flat":
            self.index: Any = self._maybe_gpu(self._exact)
        else:
            self.nlist = nlist or int(min(65536, max(16, 4 * math.sqrt(self.n))))
            quant = faiss.IndexFlatIP(self.d)
            ivf = faiss.IndexIVFFlat(quant, self.d, self.nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(seed)
            m = min(self.n, train_sample or max(40 * self.nlist, 50_000))
            sample = x[rng.choice(self.n, m, replace=False)] if m < self.n else x
            ivf.cp.seed = seed
            ivf.train(sample)
            ivf.add(x)
            self.nprobe = min(self.nlist, 8)
            ivf.nprobe = self.nprobe
            self.index = self._maybe_gpu(ivf)
        self.build_seconds = time.perf_counter() - t0

    def _maybe_gpu(self, index: Any) -> Any:
        if not self.use_gpu:
            return index
        self._gpu_res = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(self._gpu_res, 0, index)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "n": self.n, "d": self.d,
                               "gpu": self.use_gpu, "faiss_version": faiss.__version__}
        if self.kind == "ivf":
            out.update({"index": f"IVF{self.nlist},Flat", "nprobe": self.nprobe,
                        "planted_copy_recall": self.recall})
        return out

    def _set_nprobe(self, nprobe: int) -> None:
        self.nprobe = nprobe
        if self.use_gpu:
            faiss.GpuParameterSpace().set_index_parameter(self.index, "nprobe", nprobe)
        else:
            self.index.nprobe = nprobe

    def tune(self, queries: np.ndarray, sources: np.ndarray, *, recall_target: float = 0.999,
             max_nprobe: int | None = None) -> float:
        """Choose nprobe so that planted copies (``queries``, made from database rows
        ``sources``) retrieve their source as top-1 with recall ≥ ``recall_target``
        (exact search defines which source is retrievable: a copy whose exact top-1 is
        another row counts as found when IVF returns the same row as exact search)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if self.kind == "flat":
            self.recall = 1.0
            return 1.0
        _, exact_i = self._exact.search(q, 1)
        want = np.where(exact_i[:, 0] == sources, sources, exact_i[:, 0])
        nprobe = 1
        top = max_nprobe or self.nlist
        while True:
            self._set_nprobe(nprobe)
            _, i = self.index.search(q, 1)
            rec = float(np.mean(i[:, 0] == want))
            log.info("IVF nprobe=%d planted-copy recall=%.5f", nprobe, rec)
            if rec >= recall_target or nprobe >= top:
                self.recall = rec
                return rec
            nprobe = min(top, nprobe * 2)

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, self.n)
        if q.shape[0] == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        s, i = self.index.search(q, k)
        return s, i

    def exact_search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, self.n)
        if q.shape[0] == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return self._exact.search(q, k)

    def search_rescored(self, queries: np.ndarray, k: int = 1, *, threshold: float | None = None,
                        margin: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
        """Search; with IVF, queries scoring ≥ ``threshold - margin`` are re-scored exactly."""
        s, i = self.search(queries, k)
        if self.kind == "flat" or threshold is None or s.shape[0] == 0:
            return s, i
        cand = np.where(s[:, 0] >= threshold - margin)[0]
        if cand.size:
            es, ei = self.exact_search(np.asarray(queries, np.float32)[cand], k)
            s[cand], i[cand] = es, ei
        return s, i
