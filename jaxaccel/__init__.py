"""jaxaccel: a JAX research framework for making deep-learning models faster and smaller."""

__version__ = "0.1.0"
