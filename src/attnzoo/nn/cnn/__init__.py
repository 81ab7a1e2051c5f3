"""Attention blocks for CNNs (catalog C) on ``(B, C, H, W)``, and :func:`create_attn`, a factory by name."""

__all__: list[str] = []
