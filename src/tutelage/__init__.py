"""tutelage: big language models teach small, cheap ones."""

__version__ = "0.1.0"
