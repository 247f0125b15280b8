"""``align compare``: a grid of objectives and options trained on the same model and data, each
run evaluated on held-out sets, and the table and kept-vs-learned plot that compare them."""

from .api import ComparisonResult, compare

__all__ = ["ComparisonResult", "compare"]
