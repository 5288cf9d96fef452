"""offload: train models whose weights, gradients and optimizer state do not fit on the GPU.

The top layer: it executes with torch what ``scheduler`` decides, on the tiers ``storage`` provides.
"""

__version__ = "0.1.0"
