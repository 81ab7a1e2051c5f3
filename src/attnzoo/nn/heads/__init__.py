"""Multi-head variants (catalog H): how heads are chosen, fed and combined."""

__all__: list[str] = []
