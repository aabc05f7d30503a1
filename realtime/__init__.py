"""Real-time defense against physical adversarial patches (Z-Mask) for camera perception."""
__version__ = "0.1.0"
