"""Query tags, and their clustering into domains.

MixLLM tags each query (the paper used InsTag, an LLM tagger) and clusters the tags into domains,
which steer the encoder's contrastive fine-tuning. Our default tagger is offline and
deterministic: KeyBERT scores the query's candidate n-grams by similarity to the query's
embedding and keeps the top k. Candidate n-grams form a vocabulary fitted on the training
queries (an n-gram must appear in `min_df` of them), embedded once; a query's tags are drawn
from the n-grams it contains. An LLM tagger behind an OpenAI-compatible endpoint gives
InsTag-style tags for users with an API, with an on-disk cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mixllm.core.errors import ConfigError, MixLLMError, NotFittedError
from mixllm.core.estimator_base import BaseEstimator

logger = logging.getLogger(__name__)

Tags = list[tuple[str, float]]  # (tag, score) pairs of one query, best first
Embed = Callable[[Sequence[str]], np.ndarray]


class KeyBERTTagger(BaseEstimator):
    """Top-k n-gram tags per query by KeyBERT, from a vocabulary fitted on training queries.

    `embed` is the sentence-transformers model (anything with `.encode`) used for queries and
    candidate n-grams; the tagger does not own it, so the caller decides how it is loaded.
    """

    def __init__(self, top_k: int = 5, ngram_max: int = 2, min_df: int = 3, max_df: float = 0.25,
                 stop_words: str | None = "english", batch_size: int = 256):
        self.top_k = top_k
        self.ngram_max = ngram_max
        self.min_df = min_df
        self.max_df = max_df
        self.stop_words = stop_words
        self.batch_size = batch_size

    def fit(self, queries: Sequence[str], model: Any) -> KeyBERTTagger:
        from sklearn.feature_extraction.text import CountVectorizer

        queries = list(queries)
        min_df = min(self.min_df, max(1, len(queries)))
        # max_df as a count, never below min_df: on a handful of queries every n-gram is "frequent".
        max_df = max(min_df, int(self.max_df * len(queries))) if self.max_df < 1.0 else 1.0
        vectorizer = CountVectorizer(
            ngram_range=(1, self.ngram_max), stop_words=self.stop_words, min_df=min_df, max_df=max_df,
            token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z]+\b",  # words, not numbers: "37 plus 12" tags as "plus"
        )
        try:
            vectorizer.fit(queries)
        except ValueError:
            raise MixLLMError(
                f"no candidate tags: no n-gram appears in at least {min_df} and at most {max_df} of the "
                f"{len(queries)} queries (lower tags.min_df or raise tags.max_df)"
            ) from None
        self.vocabulary_ = [str(term) for term in vectorizer.get_feature_names_out()]
        logger.info("embedding %d candidate tags", len(self.vocabulary_))
        self.vocabulary_embeddings_ = np.asarray(
            model.encode(self.vocabulary_, batch_size=self.batch_size, normalize_embeddings=True,
                         convert_to_numpy=True, show_progress_bar=False),
            dtype=np.float32,
        )
        return self

    def transform(self, queries: Sequence[str], model: Any, query_embeddings: np.ndarray | None = None) -> list[Tags]:
        """Tags of each query; `query_embeddings` (normalised, from `model`) saves re-embedding."""
        from keybert import KeyBERT

        if not hasattr(self, "vocabulary_"):
            raise NotFittedError("KeyBERTTagger is not fitted; call fit(queries, model)")
        queries = list(queries)
        if not queries:
            return []
        if query_embeddings is None:
            query_embeddings = model.encode(queries, normalize_embeddings=True, convert_to_numpy=True,
                                            show_progress_bar=False)
        keywords = KeyBERT(model=model).extract_keywords(
            queries,
            candidates=self.vocabulary_,
            keyphrase_ngram_range=(1, self.ngram_max),
            stop_words=self.stop_words,
            top_n=self.top_k,
            doc_embeddings=np.asarray(query_embeddings),
            word_embeddings=self.vocabulary_embeddings_,
        )
        if queries and keywords and isinstance(keywords[0], tuple):  # KeyBERT flattens a single doc
            keywords = [keywords]
        return [[(str(tag), float(score)) for tag, score in tags] for tags in keywords]

    def tag_vectors(self, tags: Sequence[str], model: Any) -> np.ndarray:
        """Embeddings of tags: from the fitted vocabulary where possible, else embedded now."""
        index = {term: i for i, term in enumerate(self.vocabulary_)}
        missing = [t for t in tags if t not in index]
        extra = (
            np.asarray(model.encode(missing, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False))
            if missing else np.zeros((0, self.vocabulary_embeddings_.shape[1]), dtype=np.float32)
        )
        extra_index = {t: i for i, t in enumerate(missing)}
        return np.vstack(
            [self.vocabulary_embeddings_[index[t]] if t in index else extra[extra_index[t]] for t in tags]
        ) if tags else np.zeros((0, self.vocabulary_embeddings_.shape[1]), dtype=np.float32)


INSTAG_PROMPT = (
    "You are a helpful assistant. Give the user query a few short tags (1-3 words each) that name its "
    "intent and domain, in the style of InsTag. Answer only with a JSON list of strings, at most {k} tags.\n"
    "Query: {query}"
)


class LLMTagger(BaseEstimator):
    """InsTag-style tags from an LLM behind an OpenAI-compatible `/chat/completions` endpoint.

    Answers are cached on disk by (model, prompt), so re-tagging the same queries costs nothing.
    Every tag gets score 1.0 (an LLM gives no similarity). `fit` is a no-op kept for symmetry.
    """

    def __init__(self, base_url: str | None = None, model: str = "gpt-4o-mini", api_key_env: str | None = None,
                 cache_dir: str | Path = "data/cache/llm_tags", top_k: int = 5, timeout_s: float = 30.0):
        self.base_url = base_url
        self.model = model
        self.api_key_env = api_key_env
        self.cache_dir = cache_dir
        self.top_k = top_k
        self.timeout_s = timeout_s

    def fit(self, queries: Sequence[str], model: Any = None) -> LLMTagger:
        if not self.base_url:
            raise ConfigError("tags.method is 'llm' but tags.llm.base_url is not set; set it to an OpenAI-compatible URL")
        self.n_cached_ = 0
        return self

    def _cache_path(self, prompt: str) -> Path:
        digest = hashlib.sha256(f"{self.model}\x00{prompt}".encode("utf-8", "surrogateescape")).hexdigest()
        return Path(self.cache_dir) / digest[:2] / f"{digest}.json"

    def _ask(self, client: Any, prompt: str) -> list[str]:
        path = self._cache_path(prompt)
        if path.is_file():
            self.n_cached_ = getattr(self, "n_cached_", 0) + 1
            return json.loads(path.read_text(encoding="utf-8"))
        response = client.post(
            "/chat/completions",
            json={"model": self.model, "temperature": 0, "messages": [{"role": "user", "content": prompt}]},
        )
        response.raise_for_status()
        content = response.json()["choices"][0]["message"]["content"]
        tags = parse_tag_list(content)[: self.top_k]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(tags), encoding="utf-8")
        return tags

    def transform(self, queries: Sequence[str], model: Any = None, query_embeddings: np.ndarray | None = None) -> list[Tags]:
        import httpx

        if not self.base_url:
            raise ConfigError("tags.llm.base_url is not set; set it to an OpenAI-compatible URL")
        headers = {}
        if self.api_key_env and os.environ.get(self.api_key_env):
            headers["Authorization"] = f"Bearer {os.environ[self.api_key_env]}"
        with httpx.Client(base_url=self.base_url.rstrip("/"), headers=headers, timeout=self.timeout_s) as client:
            return [
                [(tag, 1.0) for tag in self._ask(client, INSTAG_PROMPT.format(k=self.top_k, query=query))]
                for query in queries
            ]

    def tag_vectors(self, tags: Sequence[str], model: Any) -> np.ndarray:
        return np.asarray(model.encode(list(tags), normalize_embeddings=True, convert_to_numpy=True,
                                       show_progress_bar=False), dtype=np.float32)


def parse_tag_list(content: str) -> list[str]:
    """Tags from an LLM answer: a JSON list if there is one, else comma/line separated words."""
    match = re.search(r"\[.*\]", content, flags=re.S)
    if match:
        try:
            parsed = json.loads(match.group(0))
            if isinstance(parsed, list):
                return [str(t).strip().lower() for t in parsed if str(t).strip()]
        except json.JSONDecodeError:
            pass
    return [t.strip(" -*\"'").lower() for t in re.split(r"[,\n]", content) if t.strip(" -*\"'")]


class TagClusterer(BaseEstimator):
    """Cluster the tag vocabulary into domains; a query's domain vector is its tags' cluster mix.

    Fitted state: `centroids_` (domains x dim, unit length), `tag_domain_` (tag -> domain),
    `domain_names_` (each domain's tags nearest its centroid, so a person can read it),
    `domain_sizes_` (tags per domain).
    """

    def __init__(self, n_clusters: int = 12, method: str = "kmeans", names_per_cluster: int = 3,
                 random_state: int = 7):
        self.n_clusters = n_clusters
        self.method = method
        self.names_per_cluster = names_per_cluster
        self.random_state = random_state

    def fit(self, query_tags: Sequence[Tags], tag_vectors: Callable[[list[str]], np.ndarray]) -> TagClusterer:
        from sklearn.cluster import AgglomerativeClustering, KMeans

        if self.method not in ("kmeans", "agglomerative"):
            raise ConfigError(f"unknown clustering '{self.method}'; choose kmeans or agglomerative (tags.clustering)")
        weight: dict[str, float] = {}
        for tags in query_tags:
            for tag, score in tags:
                weight[tag] = weight.get(tag, 0.0) + max(float(score), 1e-6)
        vocabulary = sorted(weight)
        if len(vocabulary) < 2:
            raise MixLLMError(f"only {len(vocabulary)} distinct tag(s); cannot form domains (need at least 2)")
        k = min(self.n_clusters, len(vocabulary))
        if k < self.n_clusters:
            logger.warning("only %d distinct tags: using %d domains instead of %d", len(vocabulary), k, self.n_clusters)
        vectors = np.asarray(tag_vectors(vocabulary), dtype=np.float64)
        weights = np.array([weight[t] for t in vocabulary])
        if self.method == "kmeans":
            labels = KMeans(n_clusters=k, n_init=10, random_state=self.random_state).fit_predict(
                vectors, sample_weight=weights
            )
        else:
            labels = AgglomerativeClustering(n_clusters=k, metric="cosine", linkage="average").fit_predict(vectors)
        centroids = np.vstack([np.average(vectors[labels == c], axis=0, weights=weights[labels == c]) for c in range(k)])
        centroids /= np.linalg.norm(centroids, axis=1, keepdims=True) + 1e-12
        self.centroids_ = centroids.astype(np.float32)
        self.tag_domain_ = {tag: int(label) for tag, label in zip(vocabulary, labels)}
        self.domain_sizes_ = np.bincount(labels, minlength=k).tolist()
        names = []
        for c in range(k):
            members = np.flatnonzero(labels == c)
            closeness = vectors[members] @ centroids[c]
            order = members[np.lexsort((-weights[members], -closeness))]
            names.append(", ".join(vocabulary[i] for i in order[: self.names_per_cluster]))
        self.domain_names_ = names
        self.n_domains_ = k
        return self

    def domain_vectors(self, query_tags: Sequence[Tags]) -> np.ndarray:
        """Normalised domain mix per query from its tags (zeros when none of its tags is known)."""
        if not hasattr(self, "centroids_"):
            raise NotFittedError("TagClusterer is not fitted; call fit(query_tags, tag_vectors)")
        out = np.zeros((len(query_tags), self.n_domains_), dtype=np.float32)
        for row, tags in enumerate(query_tags):
            for tag, score in tags:
                domain = self.tag_domain_.get(tag)
                if domain is not None:
                    out[row, domain] += max(float(score), 1e-6)
        totals = out.sum(axis=1, keepdims=True)
        return np.divide(out, totals, out=np.zeros_like(out), where=totals > 0)

    def dominant_domains(self, query_tags: Sequence[Tags]) -> np.ndarray:
        """Each query's strongest domain, or -1 when it has no known tag."""
        vectors = self.domain_vectors(query_tags)
        dominant = vectors.argmax(axis=1)
        dominant[vectors.sum(axis=1) == 0] = -1
        return dominant

    def describe(self) -> list[dict[str, Any]]:
        """One row per domain: id, name, size and some member tags, for `mixllm tags show`."""
        members: dict[int, list[str]] = {}
        for tag, domain in sorted(self.tag_domain_.items()):
            members.setdefault(domain, []).append(tag)
        return [
            {"domain": d, "name": self.domain_names_[d], "tags": self.domain_sizes_[d], "examples": members.get(d, [])[:8]}
            for d in range(self.n_domains_)
        ]


def make_tagger(method: str, **params: Any) -> KeyBERTTagger | LLMTagger:
    if method == "keybert":
        return KeyBERTTagger(**params)
    if method == "llm":
        return LLMTagger(**params)
    raise ConfigError(f"unknown tagger '{method}'; choose keybert or llm (params.yaml: tags.method)")
