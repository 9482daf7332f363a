"""Score distributions behind two defaults of issue 14: the relative cutoff (`max_drop`, off by default)
and the near-duplicate cosine (`CLIPDEX_NEAR_DUPLICATE_COSINE`, 0.97). Not part of the test run.

    python bench/bench_query_scores.py            # the shapes model, and ViT-B-32 with random weights

With the shapes model (trained; `clipdex/models`) on generated images, through JPEG as the indexer reads
them (10 images of each of its 32 classes):
- for each class caption ("a red circle"): how far below the best score the worst in-class image falls,
  and the best off-class one; the same for broad queries ("a circle", "red") whose relevant set is a shape
  or a colour;
- cosines between an image and its re-encoded or resized copies, and between distinct images of a class.

ViT-B-32 with random weights (no trained weights can be downloaded here) has the same cost as the trained
model but meaningless scores: its figures show only that, and are printed as such.
"""

from __future__ import annotations

import argparse
import io
import json
from typing import Any

import numpy as np
from PIL import Image

from clipdex import synthetic
from clipdex.demo import CHECKPOINT, MODEL_DIR
from shared.embedder import Embedder, ModelSpec


def jpeg(img: Image.Image, quality: int = 90) -> Image.Image:
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    out.seek(0)
    return Image.open(out).convert("RGB")


def pct(values: Any, q: float) -> float:
    return round(float(np.percentile(values, q)), 3)


def measure(embedder: Embedder, per_class: int, size: int) -> dict[str, Any]:
    classes = [(c, s) for c in synthetic.COLOURS for s in synthetic.SHAPES]
    samples = []
    for i, (colour, shape) in enumerate(classes):
        for sample in synthetic.generate(per_class, 5000 + i, size, colours=[colour], shapes=[shape]):
            samples.append((colour, shape, sample.image))
    vectors = embedder.encode_images([jpeg(img) for *_, img in samples])
    labels = [(c, s) for c, s, _ in samples]

    in_class, off_class, tops = [], [], []
    for colour, shape in classes:
        scores = vectors @ embedder.encode_text(synthetic.class_caption(colour, shape)).vector
        mine = np.array([label == (colour, shape) for label in labels])
        top = scores.max()
        tops.append(top)
        in_class.append(top - scores[mine].min())
        off_class.append(top - scores[~mine].max())
    broad = {}
    for text, relevant in (
        ("a circle", lambda label: label[1] == "circle"),
        ("a square", lambda label: label[1] == "square"),
        ("red", lambda label: label[0] == "red"),
    ):
        scores = vectors @ embedder.encode_text(text).vector
        mine = np.array([relevant(label) for label in labels])
        top = scores.max()
        broad[text] = {
            "worst_relevant_drop": round(float(top - scores[mine].min()), 3),
            "best_irrelevant_drop": round(float(top - scores[~mine].max()), 3),
            "relevant_kept_by": {
                str(d): f"{int((mine & (scores >= top - d)).sum())} of {int(mine.sum())}" for d in (0.1, 0.2, 0.3)
            },
        }

    copies = []
    for _, _, img in samples[::5]:
        base = embedder.encode_images([jpeg(img, 90)])[0]
        others = [img, jpeg(img, 50), img.resize((200, 200)), img.resize((64, 64)), jpeg(img.resize((100, 100)), 70)]
        copies += [float(base @ v) for v in embedder.encode_images(others)]
    same = [
        float(vectors[i] @ vectors[j])
        for i in range(len(vectors))
        for j in range(i + 1, len(vectors))
        if labels[i] == labels[j]
    ]
    return {
        "images": len(samples),
        "top_score": {"min": pct(tops, 0), "median": pct(tops, 50)},
        "class_caption_drop_to_worst_in_class": {
            "median": pct(in_class, 50),
            "p90": pct(in_class, 90),
            "max": pct(in_class, 100),
        },
        "class_caption_drop_to_best_off_class": {
            "min": pct(off_class, 0),
            "p10": pct(off_class, 10),
            "median": pct(off_class, 50),
        },
        "broad_queries": broad,
        "reencoded_copy_cosine": {"min": pct(copies, 0), "p5": pct(copies, 5), "median": pct(copies, 50)},
        "same_class_distinct_cosine": {
            "median": pct(same, 50),
            **{f"share_at_least_{t}": round(float(np.mean(np.array(same) >= t)), 3) for t in (0.95, 0.96, 0.97, 0.98)},
        },
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=10)
    ap.add_argument("--no-vit", action="store_true", help="skip ViT-B-32 with random weights")
    args = ap.parse_args(argv)
    results: dict[str, Any] = {}
    shapes = Embedder(ModelSpec("clipdex-shapes", str(CHECKPOINT), MODEL_DIR, "cpu", "fp32", runtime="torch"))
    shapes.load()
    results["clipdex-shapes"] = measure(shapes, args.per_class, 128)
    shapes.close()
    if not args.no_vit:
        vit = Embedder(ModelSpec("ViT-B-32", None, None, "cpu", "fp32", runtime="torch"))
        vit.load()
        results["ViT-B-32 (random weights: meaningless)"] = measure(vit, 2, 224)
        vit.close()
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
