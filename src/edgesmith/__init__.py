"""edgesmith: turn an image data set into edge-ready models and hard numbers about them."""

__version__ = "0.1.0"
