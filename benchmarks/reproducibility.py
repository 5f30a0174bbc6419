"""Is the int8 encoder reproducible? Fine-tune the bundled encoder twice on the same prompts, with
torch on 1 and on 2 CPU threads, export both to ONNX fp32 and int8, and compare (a script, not a test).

    python benchmarks/reproducibility.py [--log routerbench_subset] [--queries 512] [--triplets 256]

Each fine-tune runs in its own process (torch's thread count is fixed at start). Same seeds, same
data, same code: the only difference is how many threads sum each matrix product, which changes
the order of floating-point additions. Both runs' exports then embed held-out prompts in this one
process (so only the weights differ), and it prints, for fp32 and int8, how far the two lie apart (largest absolute difference, least cosine), next to how far int8
lies from fp32 within one run; and whether a second export of the same weights is byte-identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _prompts(log: str, n_queries: int) -> tuple[list[str], np.ndarray, list[str]]:
    """The log's training prompts with their task labels, and as many of its held-out prompts."""
    import pandas as pd

    from mixllm.io.benchmark_config import load_benchmark_config

    benchmark = load_benchmark_config(ROOT / "benchmarks/datasets.yaml")
    frame = pd.read_csv(benchmark.data_path(benchmark.datasets[log]), usecols=lambda c: c in {"query_id", "query", "source", "split"})
    frame = frame.drop_duplicates("query_id").sort_values("query_id", kind="stable")
    test = frame["split"].eq("test") if "split" in frame else frame.index % 5 == 0
    train = frame[~test].sample(min(n_queries, int((~test).sum())), random_state=0)
    held_out = frame[test].sample(min(n_queries, int(test.sum())), random_state=0)
    codes = {name: code for code, name in enumerate(sorted(train["source"].unique()))}
    return train["query"].tolist(), train["source"].map(codes).to_numpy(), held_out["query"].tolist()


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from mixllm.core.encoder_backends import OnnxEncoder, export_onnx, load_sentence_transformer, quantize_onnx
    from mixllm.core.fine_tuning import fine_tune_on_triplets, mine_domain_triplets

    queries, domains, _ = _prompts(args.log, args.queries)
    model = load_sentence_transformer(None, args.max_seq_length)
    fine_tune_on_triplets(model, queries, mine_domain_triplets(domains, args.triplets, 0), epochs=1, batch_size=16,
                          learning_rate=2e-5, warmup_ratio=0.1, train_max_seq_length=args.max_seq_length,
                          max_seq_length=args.max_seq_length, random_state=0, progress=False)
    weights = np.concatenate([tensor.detach().numpy().ravel() for tensor in model.state_dict().values()])
    graph = export_onnx(model)
    graphs = {"fp32 export": [graph, export_onnx(model)], "int8 export": [quantize_onnx(graph), quantize_onnx(graph)]}
    for quantize in ("none", "int8"):  # embedded later, in one process, so only the weights differ
        OnnxEncoder.from_model(model, args.max_seq_length, "left", quantize=quantize).save(Path(f"{args.out}.{quantize}"))
    np.save(f"{args.out}.weights.npy", weights)
    identical = {name: hashlib.sha256(a).digest() == hashlib.sha256(b).digest() for name, (a, b) in graphs.items()}
    Path(f"{args.out}.json").write_text(json.dumps(identical))


def compare(args: argparse.Namespace) -> None:
    from mixllm.core.encoder_backends import OnnxEncoder

    held_out = _prompts(args.log, args.queries)[2]
    runs = {}
    with tempfile.TemporaryDirectory(prefix="mixllm-repro-") as folder:
        for threads in (1, 2):
            out = Path(folder) / f"threads{threads}"
            command = [sys.executable, __file__, "--child", "--threads", str(threads), "--out", str(out),
                       "--log", args.log, "--queries", str(args.queries), "--triplets", str(args.triplets),
                       "--max-seq-length", str(args.max_seq_length)]
            print(f"fine-tuning with {threads} thread(s) ...", flush=True)
            subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
            run = {"weights": np.load(f"{out}.weights.npy")}
            for name, quantize in (("fp32", "none"), ("int8", "int8")):
                encoder = OnnxEncoder.load(Path(f"{out}.{quantize}"), args.max_seq_length, "left")
                run[name] = encoder.encode(held_out, batch_size=16)
            runs[threads] = run, json.loads(Path(f"{out}.json").read_text())
    (one, same_one), (two, same_two) = runs[1], runs[2]
    print(f"\n{args.log}: {args.queries} training prompts, {args.triplets} triplets, {args.max_seq_length} tokens; "
          f"{len(one['fp32'])} held-out prompts embedded")
    print(f"a second export of the same weights is byte-identical: {same_one} (1 thread), {same_two} (2 threads)")
    print(f"fine-tuned weights, 1 vs 2 threads: largest absolute difference {np.abs(one['weights'] - two['weights']).max():.2e}")
    print("| embeddings | largest absolute difference | least cosine |")
    print("|---|---|---|")
    for label, a, b in (("fp32: 1 vs 2 threads", one["fp32"], two["fp32"]),
                        ("int8: 1 vs 2 threads", one["int8"], two["int8"]),
                        ("int8 vs fp32, the 2-thread run", two["int8"], two["fp32"])):
        print(f"| {label} | {np.abs(a - b).max():.2e} | {float((a * b).sum(axis=1).min()):.5f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", default="routerbench_subset", help="a log of benchmarks/datasets.yaml")
    parser.add_argument("--queries", type=int, default=512, help="training prompts (and held-out prompts) to use")
    parser.add_argument("--triplets", type=int, default=256, help="fine-tuning triplets")
    parser.add_argument("--max-seq-length", type=int, default=128, help="tokens per prompt")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    child(args) if args.child else compare(args)


if __name__ == "__main__":
    main()
