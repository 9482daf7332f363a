"""A product with several images: one event in, one item per image out.

    {"id": "sku-1", images: [u1, u2, u3], metadata, version}
        ─▶ items sku-1#<key(u1)>, sku-1#<key(u2)>, sku-1#<key(u3)>, each with `parent: "sku-1"` in its metadata

An image's key is the first 16 hex digits of the sha256 of its URL (`shared.types.image_id`): the same URL
keeps its item (and its vector) whatever its place in the list, and a product's items are exactly the
stored ids of the shape `<product id>#<16 hex digits>` (`parent_of`), which `Writer.product_images` finds.
The list is the whole set: the resolver deletes a stored image of the product that an upsert no longer
names, and a delete removes them all (`indexer.resolve`).

`product(...)` checks everything the schema checks for one event: the product id (short enough for its
images' ids), the metadata once (every image carries the same), each image's uri. An image whose uri is
refused is listed in `refused` with the reason: it becomes that image's dead letter, the other images go on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from indexer.events import MAX_ID_BYTES, Event, check_metadata, check_uri, validated
from shared.errors import InvalidEvent
from shared.types import IMAGE_SUFFIX_LENGTH, image_id, parent_of

MAX_IMAGES = 250  # per product: Shopify's own limit of media per product
PARENT_KEY = "parent"  # the metadata key that names an image's product
MAX_PRODUCT_ID_BYTES = MAX_ID_BYTES - IMAGE_SUFFIX_LENGTH


@dataclass(frozen=True)
class RefusedImage:
    id: str  # the image's item id (raw, not namespaced)
    uri: str
    reason: str


@dataclass(frozen=True)
class Product:
    """One event for a product's whole set of images. An upsert's `images` are upsert events of the
    image items; a delete has none."""

    op: Literal["upsert", "delete"]
    id: str
    images: tuple[Event, ...] = ()
    refused: tuple[RefusedImage, ...] = ()
    version: int | None = None

    @property
    def image_ids(self) -> set[str]:
        """Every image id the event names, refused ones too (raw, not namespaced)."""
        return {e.id for e in self.images} | {r.id for r in self.refused}


def product(
    op: Literal["upsert", "delete"],
    product_id: str,
    uris: Sequence[str] = (),
    metadata: dict[str, Any] | None = None,
    version: int | None = None,
) -> Product:
    """A checked product event; InvalidEvent names what is wrong with it as a whole."""
    pid = validated({"op": "delete", "id": product_id, "version": version})  # id and version, as the schema has them
    size = len(product_id.encode("utf-8"))
    if size > MAX_PRODUCT_ID_BYTES:
        raise InvalidEvent(
            f"invalid event: id: {size:,} bytes of UTF-8, over the limit of {MAX_PRODUCT_ID_BYTES:,} bytes for "
            f"a product with several images (each image's id adds {IMAGE_SUFFIX_LENGTH})"
        )
    if op == "delete":
        return Product("delete", pid.id, version=pid.version)
    if len(uris) > MAX_IMAGES:
        raise InvalidEvent(f"invalid event: {len(uris):,} images, over the limit of {MAX_IMAGES} per product")
    meta = {**(metadata or {}), PARENT_KEY: product_id}
    try:
        check_metadata(meta)
    except ValueError as exc:
        raise InvalidEvent(f"invalid event: metadata: {exc}") from exc
    images: dict[str, Event] = {}
    refused: dict[str, RefusedImage] = {}
    for uri in uris:
        item = image_id(product_id, uri)
        if item in images or item in refused:
            continue  # the same URL twice is one image
        try:
            if not uri:
                raise ValueError("empty")  # as the schema's min_length says for one event
            check_uri(uri)
        except ValueError as exc:
            refused[item] = RefusedImage(item, uri, f"invalid event: uri: {exc}")
            continue
        # Checked above piece by piece (the metadata once for all images, not once per image).
        images[item] = Event.model_construct(op="upsert", id=item, uri=uri, metadata=meta, version=pid.version)
    return Product("upsert", pid.id, tuple(images.values()), tuple(refused.values()), pid.version)


__all__ = ["MAX_IMAGES", "PARENT_KEY", "Product", "RefusedImage", "image_id", "parent_of", "product"]
