"""Does the encoder embed here as it did where the router was saved? The heads were fitted to the
embeddings of the machine that trained them; a router served elsewhere should see the same vectors.
The int8 transformer may not: the same commit's int8 subset router scored AIQ 0.9769 on one machine
against 0.9778 on another, where the fp32 one scored 0.9778 on both (benchmarks/RESULTS.md, "The int8
transformer's figures move with the CPU"; onnxruntime's int8 kernels differ between CPUs, the likely
cause, not shown).

So a saved router keeps the vectors its encoder gave a few fixed probe sentences where it was saved
(encoder_probes.npz, with the encoder's fingerprint), and a loaded one can embed them again and say
how far apart the two are. Fixed sentences, not training queries: a registered model carries no
user's text."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

PROBES_FILE = "encoder_probes.npz"

# Short and long, prose, code, arithmetic, another language, and one past any window (truncation).
PROBE_SENTENCES = (
    "What is the capital of France?",
    "Write a Python function that returns the n-th Fibonacci number, with a docstring and two tests.",
    "If a train travels 120 km in 1.5 hours, what is its average speed in km/h? Show each step.",
    "The trophy does not fit into the brown suitcase because it is too large. What is too large?",
    "Résumez ce paragraphe en une phrase : la réunion est reportée à jeudi, faute de quorum.",
    " ".join(f"Fact {i}: item {i} weighs {3 * i} grams." for i in range(80)) + " Which item weighs 42 grams?",
)


# Saved with the vectors: vectors of other sentences (a later mixllm may change them) are not compared.
SENTENCES_DIGEST = hashlib.blake2b("\x00".join(PROBE_SENTENCES).encode("utf-8"), digest_size=8).hexdigest()


def probe_vectors(encoder: Any) -> np.ndarray:
    """The encoder's unit vectors for the probe sentences, one at a time: in one batch the short ones
    would be padded to the long one's window (~0.2 s with the int8 transformer at 256 tokens, against
    ~0.04 s), and no batch neighbour can change a vector."""
    return np.vstack([np.asarray(encoder.transform([sentence]), dtype=np.float32) for sentence in PROBE_SENTENCES])


def save_probes(folder: Path, encoder: Any, kept: dict[str, Any] | None) -> None:
    """Write the reference vectors: `kept` (those loaded with the router) while the encoder is the
    one they were made with, so a router updated elsewhere (continual learning) keeps the training
    machine's; else the vectors this encoder gives now."""
    if kept is not None and kept["fingerprint"] == encoder.fingerprint_:
        vectors = kept["vectors"]
    else:
        vectors = probe_vectors(encoder)
    np.savez(folder / PROBES_FILE, vectors=vectors, fingerprint=np.array(encoder.fingerprint_),
             sentences=np.array(SENTENCES_DIGEST))


def load_probes(folder: Path) -> dict[str, Any] | None:
    """The saved reference, or None: a router saved before the check existed, or with other probe
    sentences, or a file that cannot be read (said in the log; the router loads all the same)."""
    path = Path(folder) / PROBES_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            reference = {"vectors": data["vectors"], "fingerprint": str(data["fingerprint"]),
                         "sentences": str(data["sentences"])}
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("%s cannot be read (%s: %s): the encoder check is off for this model", path,
                       type(exc).__name__, exc)
        return None
    if reference["sentences"] != SENTENCES_DIGEST:
        logger.info("%s holds vectors of other probe sentences: the encoder check is off for this model", path)
        return None
    return reference


def agreement(reference: dict[str, Any], encoder: Any) -> dict[str, Any]:
    """How the encoder's vectors for the probes compare with the saved ones: the lowest cosine and
    the largest coordinate difference over the probes (1.0 and 0.0 when they are the same)."""
    now = probe_vectors(encoder)
    saved = np.asarray(reference["vectors"], dtype=np.float32)
    if saved.shape != now.shape:
        return {"probes": len(PROBE_SENTENCES), "min_cosine": None, "max_abs_diff": None,
                "note": f"the saved vectors have shape {saved.shape}, this encoder gives {now.shape}"}
    cosines = np.sum(saved * now, axis=1)  # both are unit vectors
    return {"probes": len(PROBE_SENTENCES), "min_cosine": round(float(cosines.min()), 6),
            "max_abs_diff": float(np.abs(saved - now).max()),
            "same_encoder": reference["fingerprint"] == encoder.fingerprint_}
