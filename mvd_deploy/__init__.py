"""mvd-deploy: take a MobileVD checkpoint to the phone."""

__version__ = "0.1.0"
