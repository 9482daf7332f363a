"""Text query encoding on this CPU: trimmed padding (what clipdex does) vs open_clip's padded encode_text.

ViT-B-32 with random weights (the same cost as trained ones; nothing is downloaded). Each query is encoded
alone, as a search request does, alternating the two paths query by query so that both see the same
machine load; the figures are the p50 of each path and their ratio, and the largest difference between
the two paths' normalised outputs.

    python bench/bench_text_encoding.py --quick     # 30 queries, about half a minute
    python bench/bench_text_encoding.py             # 200 queries x 3 rounds

Not part of the test run.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time

import numpy as np
import torch
import torch.nn.functional as F

from shared.embedder import Embedder, ModelSpec

SUBJECTS = ["a dog", "two cats", "a red bicycle", "an old man", "a bowl of ramen", "the Eiffel tower", "a sailboat"]
DETAILS = [
    "",
    "at night",
    "in the snow",
    "on a wooden table next to a window",
    "photographed from above with soft natural light and a shallow depth of field",
    "in the style of a watercolour painting, pastel colours, with a lot of empty space around it for text",
]


def queries(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(DETAILS)}".strip() + f" #{i}" for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.queries, args.rounds = 30, 1
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"torch threads {torch.get_num_threads()}; load average at start {os.getloadavg()}")
    embedder = Embedder(ModelSpec(args.model, None, None, "cpu", "fp32", query_cache_size=0))
    embedder.load()
    texts = queries(args.queries)
    tokens = [embedder._tokenizer([t]) for t in texts]
    lengths = [int(t.argmax(dim=-1).item()) + 1 for t in tokens]
    with torch.inference_mode():
        for t in tokens[:5]:  # warm up both paths
            embedder.encode_tokens(t, trim=True)
            embedder.encode_tokens(t, trim=False)
        trimmed_s, padded_s, worst = [], [], 0.0
        for _ in range(args.rounds):
            for t in tokens:
                start = time.perf_counter()
                a = embedder.encode_tokens(t, trim=True)
                mid = time.perf_counter()
                b = embedder.encode_tokens(t, trim=False)
                trimmed_s.append(mid - start)
                padded_s.append(time.perf_counter() - mid)
                diff = (F.normalize(a.float(), dim=-1) - F.normalize(b.float(), dim=-1)).abs().max()
                worst = max(worst, float(diff))
        start = time.perf_counter()
        for text in texts:
            embedder.encode_text(text)  # the whole search path: tokenise, trimmed encode, normalise (no cache)
        whole = (time.perf_counter() - start) / len(texts)
    p50_trim, p50_pad = np.percentile(trimmed_s, 50) * 1e3, np.percentile(padded_s, 50) * 1e3
    print(f"load average at end {os.getloadavg()}")
    print(
        f"\n{len(texts)} queries x {args.rounds} rounds, tokens incl. start/end: median {int(np.median(lengths))}, "
        f"max {max(lengths)} of {embedder.context_length}"
    )
    print("| path | p50 ms | p90 ms |")
    print("| --- | ---: | ---: |")
    print(
        f"| padded to {embedder.context_length} (open_clip encode_text) | {p50_pad:.1f} | "
        f"{np.percentile(padded_s, 90) * 1e3:.1f} |"
    )
    print(f"| trimmed after end-of-text (clipdex) | {p50_trim:.1f} | {np.percentile(trimmed_s, 90) * 1e3:.1f} |")
    print(f"\nspeed-up (p50 padded / p50 trimmed): {p50_pad / p50_trim:.2f}x")
    print(f"max abs difference of the normalised outputs: {worst:.2e}")
    print(f"Embedder.encode_text end to end (tokenise + trimmed + normalise, cache off): {whole * 1e3:.1f} ms mean")
    embedder.close()


if __name__ == "__main__":
    main()
