"""autotransfer: pick and train the right transfer-learning recipe for a folder of images."""

__version__ = "0.1.0"
