"""Vision token mixers (catalog M) on ``(B, H, W, C)`` (channels last, as ViT code holds tokens)."""

__all__: list[str] = []
