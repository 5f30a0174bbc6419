"""The query representation the predictors see: embedding + cheap extras, standardised.

MixLLM feeds its predictors the tag-enhanced embedding. We join two blocks to it, each
switchable for ablations: length features (log characters and words: cost and difficulty grow
with length) and TF-IDF terms reduced by truncated SVD (surface cues such as "Print only the
letter" or "def " that a small encoder truncating long prompts misses). Everything is
standardised so one ridge penalty suits all blocks, and scaled to unit length on average so the
ridge and the prior uncertainty of a new LLM do not depend on how many features there are. The
domain memberships (domains.py) are joined after this block by the router, since they are
predicted from it. Fitted state is plain arrays, saved as .npz/.json.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from mixllm.core.errors import ModelFormatError, NotFittedError
from mixllm.core.estimator_base import BaseEstimator

logger = logging.getLogger(__name__)

# Saved with every featurizer: features.tfidf.weight multiplies the standardised TF-IDF block.
# Featurizers saved before this marker applied it before standardising, where it cancelled out.
_WEIGHT_AFTER_STANDARDISING = "after standardising"


def length_features(queries: Sequence[str]) -> np.ndarray:
    chars = np.array([len(q) for q in queries], dtype=np.float64)
    words = np.array([len(q.split()) for q in queries], dtype=np.float64)
    return np.column_stack([np.log1p(chars), np.log1p(words)])


# scikit-learn's default word tokens: two or more word characters.
WORD_TOKEN = re.compile(r"(?u)\b\w\w+\b")


def word_ngrams(text: str, ngram_max: int) -> list[str]:
    """The TF-IDF terms of a text: the terms TfidfVectorizer's own analyzer gives with its defaults and
    ngram_range (1, ngram_max), lower-cased word tokens and their n-grams joined by a space (a test
    checks it against scikit-learn's, which featurizers saved before read). Written out so routing
    does not import scikit-learn (see mixllm.core.estimator_base)."""
    tokens = WORD_TOKEN.findall(text.lower())
    terms = list(tokens)
    for n in range(2, min(ngram_max, len(tokens)) + 1):
        terms.extend(" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    return terms


class QueryFeaturizer(BaseEstimator):
    """Queries (+ their embeddings) -> the predictors' feature matrix."""

    def __init__(
        self,
        use_embedding: bool = True,
        use_length: bool = True,
        use_tfidf: bool = True,
        tfidf_max_features: int = 20_000,
        tfidf_ngram_max: int = 2,
        tfidf_min_df: int = 2,
        svd_components: int = 128,
        tfidf_weight: float = 1.0,
        random_state: int = 0,
    ):
        self.use_embedding = use_embedding
        self.use_length = use_length
        self.use_tfidf = use_tfidf
        self.tfidf_max_features = tfidf_max_features
        self.tfidf_ngram_max = tfidf_ngram_max
        self.tfidf_min_df = tfidf_min_df
        self.svd_components = svd_components
        self.tfidf_weight = tfidf_weight
        self.random_state = random_state

    def fit(self, queries: Sequence[str], embeddings: np.ndarray) -> QueryFeaturizer:
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer

        queries = list(queries)
        embeddings = np.asarray(embeddings, dtype=np.float64)
        self.tfidf_vocabulary_: dict[str, int] = {}
        self.tfidf_idf_ = np.zeros(0)
        self.svd_components_ = np.zeros((0, 0))
        if self.use_tfidf and self.svd_components > 0:
            # The analyzer routing uses, so fitting and routing cannot tokenize apart.
            vectorizer = TfidfVectorizer(
                analyzer=self._analyzer(), min_df=min(self.tfidf_min_df, len(queries)),
                max_features=self.tfidf_max_features, sublinear_tf=True, dtype=np.float64,
            )
            tfidf = vectorizer.fit_transform(queries)
            self.tfidf_vocabulary_ = {term: int(i) for term, i in vectorizer.vocabulary_.items()}
            self.tfidf_idf_ = vectorizer.idf_.copy()
            n_components = min(self.svd_components, tfidf.shape[1] - 1, len(queries) - 1)
            if n_components >= 1:
                svd = TruncatedSVD(n_components=n_components, random_state=self.random_state).fit(tfidf)
                self.svd_components_ = svd.components_.copy()
        raw = self._raw(queries, embeddings)
        self.mean_ = raw.mean(axis=0)
        scale = raw.std(axis=0)
        self.scale_ = np.where(scale > 1e-12, scale, 1.0)
        self.block_sizes_ = self._block_sizes(embeddings.shape[1])
        self.n_features_out_ = int(raw.shape[1])
        return self

    def _block_sizes(self, embedding_dim: int) -> dict[str, int]:
        return {
            "embedding": embedding_dim if self.use_embedding else 0,
            "length": 2 if self.use_length else 0,
            "tfidf": int(self.svd_components_.shape[0]),
        }

    def _analyzer(self) -> Any:
        """The TF-IDF terms of one text, for fitting and for routing alike."""
        return partial(word_ngrams, ngram_max=self.tfidf_ngram_max)

    def _tfidf_projection(self) -> np.ndarray:
        """The SVD projection (terms x components, C order), built once per fitted state: rebuilding
        it per call (with scikit-learn's analyzer, as before) cost 2 ms of a 4 ms single-query route,
        scipy copying the transposed components for every product."""
        cached = getattr(self, "_tfidf_cache", None)
        if cached is None or cached[0] is not self.svd_components_:
            cached = self._tfidf_cache = (self.svd_components_, np.ascontiguousarray(self.svd_components_.T))
        return cached[1]

    def _tfidf_reduced(self, queries: Sequence[str]) -> np.ndarray:
        """TfidfVectorizer.transform (sublinear tf, idf, l2 norm) followed by the SVD projection,
        computed term by term: the same numbers, without sklearn's per-call validation and sparse
        matrix, which were half of a single query's feature time."""
        analyzer, projection = self._analyzer(), self._tfidf_projection()
        vocabulary, idf = self.tfidf_vocabulary_, self.tfidf_idf_
        reduced = np.zeros((len(queries), projection.shape[1]))
        for row, query in enumerate(queries):
            counts: dict[int, int] = {}
            for term in analyzer(query):
                column = vocabulary.get(term)
                if column is not None:
                    counts[column] = counts.get(column, 0) + 1
            if not counts:
                continue
            columns = np.fromiter(counts.keys(), dtype=np.intp, count=len(counts))
            weights = (np.log(np.fromiter(counts.values(), dtype=np.float64, count=len(counts))) + 1.0) * idf[columns]
            reduced[row] = (weights / np.sqrt(weights @ weights)) @ projection[columns]
        return reduced

    def _raw(self, queries: Sequence[str], embeddings: np.ndarray) -> np.ndarray:
        blocks = []
        if self.use_embedding:
            blocks.append(embeddings)
        if self.use_length:
            blocks.append(length_features(queries))
        if self.svd_components_.shape[0]:
            blocks.append(self._tfidf_reduced(queries))
        if not blocks:
            return np.zeros((len(queries), 0))
        return np.hstack(blocks)

    def transform(self, queries: Sequence[str], embeddings: np.ndarray) -> np.ndarray:
        if not hasattr(self, "mean_"):
            raise NotFittedError("QueryFeaturizer is not fitted; call fit(queries, embeddings)")
        raw = self._raw(queries, np.asarray(embeddings, dtype=np.float64))
        # Standardised, then shrunk so a typical row has unit length: the linear predictors' ridge
        # and prior uncertainty then mean the same whatever the number of features.
        features = (raw - self.mean_) / self.scale_ / np.sqrt(max(self.n_features_out_, 1))
        if self.tfidf_weight != 1.0 and self.block_sizes_["tfidf"]:
            # After standardising (before, it cancelled out): a weight w lets the TF-IDF terms' part
            # of a head vary w times as much under the same ridge.
            features[:, features.shape[1] - self.block_sizes_["tfidf"]:] *= self.tfidf_weight
        return features

    # -- plain-format persistence (no pickle)

    def save(self, folder: Path | str) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(
            folder / "featurizer.npz",
            tfidf_idf=self.tfidf_idf_,
            svd_components=self.svd_components_, mean=self.mean_, scale=self.scale_,
        )
        meta = {"params": self.get_params(), "tfidf_vocabulary": self.tfidf_vocabulary_,
                "block_sizes": self.block_sizes_, "n_features_out": self.n_features_out_,
                "tfidf_weight_applied": _WEIGHT_AFTER_STANDARDISING}
        (folder / "featurizer.json").write_text(json.dumps(meta), encoding="utf-8")

    @classmethod
    def load(cls, folder: Path | str) -> QueryFeaturizer:
        folder = Path(folder)
        try:
            meta = json.loads((folder / "featurizer.json").read_text(encoding="utf-8"))
            arrays = np.load(folder / "featurizer.npz")
        except FileNotFoundError as error:
            raise ModelFormatError(f"{folder} lacks the featurizer ({error.filename})") from None
        params = dict(meta["params"])
        if params.get("tfidf_weight", 1.0) != 1.0 and meta.get("tfidf_weight_applied") != _WEIGHT_AFTER_STANDARDISING:
            # Saved when the weight was applied before standardising, which cancelled it: the heads
            # were fitted on unweighted features, so they are served the same way.
            logger.warning("%s was saved when features.tfidf.weight had no effect; loading it with weight 1, as it "
                           "was trained (retrain to use weight %s)", folder, params["tfidf_weight"])
            params["tfidf_weight"] = 1.0
        featurizer = cls(**params)
        featurizer.tfidf_vocabulary_ = meta["tfidf_vocabulary"]
        featurizer.block_sizes_ = meta["block_sizes"]
        featurizer.n_features_out_ = meta["n_features_out"]
        featurizer.tfidf_idf_ = arrays["tfidf_idf"]
        featurizer.svd_components_ = arrays["svd_components"]
        featurizer.mean_ = arrays["mean"]
        featurizer.scale_ = arrays["scale"]
        return featurizer
