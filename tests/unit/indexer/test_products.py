"""A product's images: ids stable per URL, the product found back from an image id, the bounds."""

from __future__ import annotations

import pytest

from indexer.products import MAX_IMAGES, MAX_PRODUCT_ID_BYTES, image_id, parent_of, product
from shared.errors import InvalidEvent


def test_an_image_id_is_stable_per_url_and_leads_back_to_its_product() -> None:
    a = image_id("sku-1", "https://cdn.shop.com/a.jpg")
    assert a == image_id("sku-1", "https://cdn.shop.com/a.jpg") != image_id("sku-1", "https://cdn.shop.com/b.jpg")
    assert a.startswith("sku-1#") and len(a) == len("sku-1") + 17
    assert parent_of(a) == "sku-1" and parent_of(f"kafka:{a}") == "kafka:sku-1"
    nested = image_id("sku-1#x", "u")  # a product id may hold '#': its images are still its own
    assert parent_of(nested) == "sku-1#x"
    for not_an_image in ("sku-1", "sku-1#short", "sku-1#" + "G" * 16, "#" + "0" * 16, a.upper()):
        assert parent_of(not_an_image) is None, not_an_image


def test_a_product_keeps_the_order_drops_repeats_and_refuses_bad_uris_one_by_one() -> None:
    p = product("upsert", "sku-1", ["a.jpg", "b.jpg", "a.jpg", "http://[::1/x.jpg", ""], {"t": 1}, 5)
    assert [e.uri for e in p.images] == ["a.jpg", "b.jpg"]
    assert all(e.version == 5 and e.metadata == {"t": 1, "parent": "sku-1"} for e in p.images)
    assert [r.uri for r in p.refused] == ["http://[::1/x.jpg", ""]
    assert "uri" in p.refused[0].reason and "empty" in p.refused[1].reason
    assert p.image_ids == {image_id("sku-1", u) for u in ("a.jpg", "b.jpg", "http://[::1/x.jpg", "")}


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (("x" * (MAX_PRODUCT_ID_BYTES + 1), ["a.jpg"]), f"over the limit of {MAX_PRODUCT_ID_BYTES:,} bytes"),
        (("", ["a.jpg"]), "id"),
        (("a\nb", ["a.jpg"]), "control character"),
        (("sku", [f"{i}.jpg" for i in range(MAX_IMAGES + 1)]), f"over the limit of {MAX_IMAGES}"),
    ],
)
def test_bad_products_are_refused_as_a_whole(args: tuple[str, list[str]], reason: str) -> None:
    with pytest.raises(InvalidEvent, match=reason):
        product("upsert", *args)


def test_metadata_is_bounded_once_for_all_images() -> None:
    with pytest.raises(InvalidEvent, match=r"metadata: .*65,536 bytes"):
        product("upsert", "sku", ["a.jpg"], {"text": "x" * 70_000})
    with pytest.raises(InvalidEvent, match="version"):
        product("upsert", "sku", ["a.jpg"], {}, 2**63)
