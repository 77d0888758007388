"""featurestore: compute each backbone embedding once, train emotion heads from the cache."""
__version__ = "0.1.0"
