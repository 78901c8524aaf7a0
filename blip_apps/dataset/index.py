"""``blip index`` / ``blip search``: an index over ITC embeddings, searched by text or image.

An index directory holds ``index.json`` (model, backend, counts, kind), ``image_ids.json`` and
``image_embeddings.npy`` (N, D float32, L2-normalised), and when the items had texts
(``--text-column``, a tar shard's ``.txt``) ``texts.json`` (``[id, text]`` pairs) and
``text_embeddings.npy``. Scores are ITC cosines (inner products of normalised vectors).

Search is exact numpy brute force (a matrix-vector product and ``argpartition``) by default. With
``kind="auto"`` an index of at least ``FAISS_MIN_ROWS`` images uses faiss when it is installed (an
HNSW graph over inner products, ``images.faiss``, built at index time): approximate, much faster
on millions of rows. ``kind="faiss"`` forces it (an error without faiss), ``kind="numpy"`` never.
Ties are broken by id, so the same index gives the same answer every time.
"""
from __future__ import annotations

import json
import os

import numpy as np

FAISS_MIN_ROWS = 200_000
KINDS = ("auto", "numpy", "faiss")
HNSW_M = 32


def _faiss():
    try:
        import faiss   # optional: pip install faiss-cpu
    except ImportError:
        return None
    return faiss


def choose_kind(kind: str, n: int) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "faiss" and _faiss() is None:
        raise ValueError("--kind faiss needs faiss (pip install faiss-cpu)")
    if kind == "auto":
        return "faiss" if n >= FAISS_MIN_ROWS and _faiss() is not None else "numpy"
    return kind


def _save_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh)
    os.replace(tmp, path)


def build_index(embeddings_file: str, out_dir: str, kind: str = "auto") -> dict:
    """Build an index directory from a ``blip embed`` output (Parquet or JSON Lines)."""
    from .output import read_rows
    ids, images, texts, text_vecs, meta = [], [], [], [], {}
    for r in read_rows(embeddings_file):
        if r.get("image_embedding") is None:
            raise ValueError(f"{embeddings_file}: not a 'blip embed' output (no image_embedding)")
        meta = meta or {"model": r.get("model"), "backend": r.get("backend")}
        ids.append(r["id"])
        images.append(r["image_embedding"])
        if r.get("text_embedding") is not None:
            texts.append([r["id"], r["text"]])
            text_vecs.append(r["text_embedding"])
    if not ids:
        raise ValueError(f"{embeddings_file}: no embeddings to index")
    images = np.asarray(images, np.float32)
    kind = choose_kind(kind, len(ids))
    os.makedirs(out_dir, exist_ok=True)
    np.save(os.path.join(out_dir, "image_embeddings.npy"), images)
    _save_json(os.path.join(out_dir, "image_ids.json"), ids)
    if texts:
        np.save(os.path.join(out_dir, "text_embeddings.npy"), np.asarray(text_vecs, np.float32))
        _save_json(os.path.join(out_dir, "texts.json"), texts)
    if kind == "faiss":
        faiss = _faiss()
        index = faiss.IndexHNSWFlat(images.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.add(images)
        faiss.write_index(index, os.path.join(out_dir, "images.faiss"))
    info = dict(meta, kind=kind, images=len(ids), texts=len(texts), dim=int(images.shape[1]),
                source=os.path.abspath(embeddings_file))
    _save_json(os.path.join(out_dir, "index.json"), info)
    return info


class Index:
    """A loaded index directory: ``search_images(vec, k)`` and ``search_texts(vec, k)``."""

    def __init__(self, path: str):
        meta = os.path.join(path, "index.json")
        if not os.path.isfile(meta):
            raise ValueError(f"{path}: not an index directory (no index.json; build one with 'blip index')")
        with open(meta, encoding="utf-8") as fh:
            self.info = json.load(fh)
        self.path = path
        self.images = np.load(os.path.join(path, "image_embeddings.npy"))
        with open(os.path.join(path, "image_ids.json"), encoding="utf-8") as fh:
            self.ids = json.load(fh)
        self.text_vecs, self.texts = None, []
        if os.path.exists(os.path.join(path, "texts.json")):
            self.text_vecs = np.load(os.path.join(path, "text_embeddings.npy"))
            with open(os.path.join(path, "texts.json"), encoding="utf-8") as fh:
                self.texts = json.load(fh)
        self.faiss = None
        if self.info.get("kind") == "faiss":
            faiss = _faiss()
            if faiss is None:
                raise ValueError(f"{path}: built with faiss, which is not installed here (pip install faiss-cpu)")
            self.faiss = faiss.read_index(os.path.join(path, "images.faiss"))

    @staticmethod
    def _top(vecs, keys, query, k):
        scores = vecs @ np.asarray(query, np.float32)
        k = min(k, len(scores))
        if k == 0:
            return []
        cand = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        # exact ties at the cut would make argpartition's pick arbitrary: take every row that ties
        cut = scores[cand].min()
        cand = np.flatnonzero(scores >= cut)
        order = sorted(cand.tolist(), key=lambda i: (-float(scores[i]), str(keys[i])))[:k]
        return [(int(i), float(scores[i])) for i in order]

    def search_images(self, query, k=5):
        """``[(id, score)]``, best first."""
        _check_k(k)
        if self.faiss is not None:
            scores, idx = self.faiss.search(np.asarray(query, np.float32)[None], min(k, len(self.ids)))
            return [(self.ids[i], float(s)) for s, i in zip(scores[0], idx[0]) if i >= 0]
        return [(self.ids[i], s) for i, s in self._top(self.images, self.ids, query, k)]

    def search_texts(self, query, k=5):
        """``[(id, text, score)]``, best first (needs an index built with texts)."""
        _check_k(k)
        if self.text_vecs is None:
            raise ValueError(f"{self.path}: this index has no texts (build it from items with a --text-column)")
        keys = [t[0] for t in self.texts]
        return [(self.texts[i][0], self.texts[i][1], s) for i, s in self._top(self.text_vecs, keys, query, k)]


def _check_k(k) -> None:
    """A search returns at least one result (k above the index's size returns every row)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
