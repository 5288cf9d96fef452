"""offload: train models whose weights, gradients and optimizer state do not fit on the GPU.

The top layer: it executes with torch what ``scheduler`` decides, on the tiers ``storage`` provides.
"""

from offload.checkpoint import CheckpointReader, load_checkpoint, save_checkpoint
from offload.config import ConfigError, OffloadConfig, config_from_env, load_config
from offload.distributed import ShardedOffloadOptimizer
from offload.optimizer import OffloadOptimizer
from offload.pretrained import CheckpointError, LoadResult, load_pretrained, save_pretrained
from offload.report import RunReport
from offload.api import wrap
from offload.runtime import OffloadRuntime, runtime_of

__version__ = "0.1.0"
__all__ = ["CheckpointError", "CheckpointReader", "ConfigError", "LoadResult", "OffloadConfig", "OffloadOptimizer",
           "RunReport", "OffloadRuntime", "ShardedOffloadOptimizer", "__version__", "config_from_env",
           "load_checkpoint", "load_config", "load_pretrained", "runtime_of", "save_checkpoint", "save_pretrained",
           "wrap"]
