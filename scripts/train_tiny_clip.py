"""Train `clipdex-shapes`, a tiny open_clip model that knows coloured shapes, on the CPU in minutes.

No pretrained CLIP can be downloaded where clipdex is built, and random weights cannot show that a text
query finds the right images. So this script renders captioned images with `clipdex.synthetic`, trains a
real open_clip architecture on them with the CLIP contrastive loss, and writes to `--out`:

    clipdex-shapes.json         the open_clip config (a directory for open_clip.add_model_config)
    clipdex-shapes.safetensors  the weights, stored as fp16; open_clip loads them into an fp32 model
    clipdex-shapes.sha256       the checksum of the weights file

Images go through open_clip's own validation preprocess for this model, most after a JPEG round trip, as
the product embeds files. Training runs for a fixed number of steps, not until the loss looks done:
colour is learned in the first minute, but the loss then sits near ln(number of shapes) for a while
before shape is learned.

    python scripts/train_tiny_clip.py   # about 8 minutes on 2 idle cores; 11 on a busy shared machine

The result is deterministic for a seed on one machine (two runs under different load: identical bytes).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Before torch loads OpenMP: spinning worker threads are fine on an idle machine, but on a shared one
# they burn the cores they wait for (measured here under load: 4.5 s a step spinning, 0.7 s passive).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clipdex.synthetic import COLOURS, SHAPES, article, render_sample

logger = logging.getLogger("train_tiny_clip")

MODEL_NAME = "clipdex-shapes"
CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 96, "head_width": 32, "patch_size": 4},
    # The token embedding is vocab x width, most of the file: keep the text tower narrow.
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
# The product sees files of any size; the preprocess shrinks them all to 32 px.
RENDER_SIZES: tuple[int | tuple[int, int], ...] = (48, 64, 96, 128, 160, (128, 96), (96, 128))
CLASSES = [(colour, shape) for colour in COLOURS for shape in SHAPES]
QUERY_TEMPLATES = ("{a} {colour} {shape}", "a photo of {a} {colour} {shape}", "{colour} {shape}")

Preprocess = Callable[[Image.Image], torch.Tensor]


@dataclass
class Dataset:
    images: torch.Tensor  # [n, 3, 32, 32], already preprocessed
    tokens: torch.Tensor  # [n, context_length]
    labels: torch.Tensor  # [n], index into CLASSES


@dataclass
class Figures:
    text_recall_at_1: float  # per class query "a red circle": is the top image of that class
    text_precision_at_5: float  # same queries: share of the top 5 images of that class
    template_recall_at_1: float  # as recall@1, over several query wordings
    zero_shot_accuracy: float  # per image: is the best of all class captions its own
    image_precision_at_5: float  # per image: share of its 5 nearest other images of its class


def main() -> int:
    args = parse_args()
    # open_clip logs its routine steps on the root logger at INFO; only ours are wanted here.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", stream=sys.stdout)
    logger.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    started, cpu_started = time.perf_counter(), time.process_time()

    args.out.mkdir(parents=True, exist_ok=True)
    config_path = args.out / f"{MODEL_NAME}.json"
    config_path.write_text(json.dumps(CONFIG, indent=4) + "\n")
    open_clip.add_model_config(args.out)

    torch.manual_seed(args.seed)
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL_NAME, pretrained=None)
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)

    train = render_dataset(random.Random(args.seed), args.pool, preprocess, tokenizer, balanced=False)
    logger.info("rendered %d training images in %.0f s", args.pool, time.perf_counter() - started)
    train_model(model, train, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    train_seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started

    weights = args.out / f"{MODEL_NAME}.safetensors"
    save_fp16(model, weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    (args.out / f"{MODEL_NAME}.sha256").write_text(f"{digest}  {weights.name}\n")

    # Judge the file as users will load it, on images from a seed training never saw.
    loaded, _, preprocess = open_clip.create_model_and_transforms(MODEL_NAME, pretrained=str(weights))
    held_out = render_dataset(random.Random(args.seed + 1_000_003), args.eval_per_class, preprocess, tokenizer)
    figures = evaluate(loaded, held_out, tokenizer)

    # On a shared machine the wall time says more about the neighbours than the script: give both.
    print(
        f"training time (render + train): {train_seconds:.0f} s wall, {cpu_seconds:.0f} s CPU, "
        f"{args.threads} threads, {args.steps} steps of {args.batch_size}"
    )
    print(f"checkpoint: {weights} {weights.stat().st_size / 1e6:.2f} MB, sha256 {digest}")
    print(f"held-out gallery: {len(held_out.labels)} images, {len(CLASSES)} colour+shape classes")
    print(f"text->image recall@1 (class captions): {figures.text_recall_at_1:.3f}")
    print(f"text->image precision@5 (class captions): {figures.text_precision_at_5:.3f}")
    print(f"text->image recall@1 ({len(QUERY_TEMPLATES)} wordings): {figures.template_recall_at_1:.3f}")
    print(f"zero-shot colour+shape accuracy: {figures.zero_shot_accuracy:.3f}")
    print(f"image->image same-class precision@5: {figures.image_precision_at_5:.3f}")
    passed = figures.text_recall_at_1 >= 0.9 and figures.image_precision_at_5 >= 0.9
    print("PASS" if passed else "FAIL: below the 0.9 bar")
    return 0 if passed else 1


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "clipdex/models")
    parser.add_argument("--seed", type=int, default=20240501)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--pool", type=int, default=30_000, help="training images rendered up front")
    parser.add_argument("--eval-per-class", type=int, default=8, help="held-out images per class")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def render_dataset(
    rng: random.Random, n: int, preprocess: Preprocess, tokenizer: Any, *, balanced: bool = True
) -> Dataset:
    """`n` random images, or with `balanced` `n` images of every class."""
    wanted: list[tuple[str, str] | tuple[None, None]]
    wanted = [c for c in CLASSES for _ in range(n)] if balanced else [(None, None)] * n
    images, captions, labels = [], [], []
    for colour, shape in wanted:
        sample = render_sample(rng, rng.choice(RENDER_SIZES), colour=colour, shape=shape)
        image = sample.image
        if rng.random() < 0.8:  # most files clipdex sees are JPEGs
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=rng.randint(60, 95))
            image = Image.open(buffer).convert("RGB")
        images.append(preprocess(image))
        captions.append(sample.caption)
        labels.append(CLASSES.index((sample.colour, sample.shape)))
    return Dataset(torch.stack(images), tokenizer(captions), torch.tensor(labels))


def train_model(model: Any, data: Dataset, *, steps: int, batch_size: int, lr: float, seed: int) -> None:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embedding" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    loss_fn = ClipLoss()
    batches = distinct_class_batches(data.labels, batch_size, torch.Generator().manual_seed(seed))
    model.train()
    started = time.perf_counter()
    for step in range(steps):
        batch = next(batches)
        image_features = model.encode_image(data.images[batch], normalize=True)
        text_features = model.encode_text(data.tokens[batch], normalize=True)
        scale = model.logit_scale.exp()
        # One contrastive problem per group of distinct classes: see distinct_class_batches.
        groups = zip(image_features.split(len(CLASSES)), text_features.split(len(CLASSES)), strict=True)
        losses = [loss_fn(i, t, scale) for i, t in groups]
        loss = sum(losses) / len(losses)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 100 == 0 or step == steps - 1:
            logger.info(
                "step %d/%d loss %.3f lr %.2e scale %.1f (%.0f s)",
                step,
                steps,
                loss.item(),
                scheduler.get_last_lr()[0],
                model.logit_scale.exp().item(),
                time.perf_counter() - started,
            )
    model.eval()


def distinct_class_batches(labels: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless batches of indexes; each run of len(CLASSES) in a batch holds one image of every class.

    With only 32 classes, a random batch of 128 holds about four images of each, and the contrastive
    loss then treats "a red circle" as wrong for every red circle but one: false negatives that push
    images of one class apart (by background, size, wording), which is what image-to-image search
    suffers from. Within a group of distinct classes every negative is a true negative.
    """
    if batch_size % len(CLASSES):
        raise ValueError(f"batch size must be a multiple of {len(CLASSES)}, the number of classes")
    per_class = [torch.nonzero(labels == c).flatten() for c in range(len(CLASSES))]
    queues = [members[torch.randperm(len(members), generator=generator)] for members in per_class]
    cursors = [0] * len(CLASSES)
    while True:
        groups = []
        for _ in range(batch_size // len(CLASSES)):
            group = []
            for c in torch.randperm(len(CLASSES), generator=generator).tolist():
                if cursors[c] == len(queues[c]):
                    queues[c], cursors[c] = per_class[c][torch.randperm(len(per_class[c]), generator=generator)], 0
                group.append(int(queues[c][cursors[c]]))
                cursors[c] += 1
            groups.append(torch.tensor(group))
        yield torch.cat(groups)


def save_fp16(model: torch.nn.Module, path: Path) -> None:
    state = {name: (t.half() if t.is_floating_point() else t).contiguous() for name, t in model.state_dict().items()}
    # One metadata key only: safetensors writes several in hash order, which changes the file's checksum.
    save_file(state, str(path), metadata={"format": "pt"})


@torch.inference_mode()
def evaluate(model: Any, data: Dataset, tokenizer: Any) -> Figures:
    chunks = torch.split(data.images, 256)
    images = F.normalize(torch.cat([model.encode_image(chunk) for chunk in chunks]), dim=-1)
    labels = data.labels

    def encode_queries(template: str) -> torch.Tensor:
        captions = [template.format(a=article(c), colour=c, shape=s) for c, s in CLASSES]
        features: torch.Tensor = model.encode_text(tokenizer(captions))
        return F.normalize(features, dim=-1)

    classes = torch.arange(len(CLASSES))
    hits = [
        labels[(encode_queries(template) @ images.T).topk(5, dim=1).indices] == classes[:, None]
        for template in QUERY_TEMPLATES
    ]  # per wording: [classes, 5], is the i-th best image of the queried class
    recalls = [h[:, 0].float().mean().item() for h in hits]

    zero_shot = (images @ encode_queries(QUERY_TEMPLATES[0]).T).argmax(dim=1) == labels

    similarity = images @ images.T
    similarity.fill_diagonal_(-math.inf)
    neighbours = similarity.topk(5, dim=1).indices
    image_precision = (labels[neighbours] == labels[:, None]).float().mean().item()

    return Figures(
        text_recall_at_1=recalls[0],
        text_precision_at_5=hits[0].float().mean().item(),
        template_recall_at_1=sum(recalls) / len(recalls),
        zero_shot_accuracy=zero_shot.float().mean().item(),
        image_precision_at_5=image_precision,
    )


if __name__ == "__main__":
    raise SystemExit(main())
