"""Search: cost model, backend profiles, accuracy predictor (CQAP) and genetic search (DESIGN section 6)."""
__all__: list[str] = []
