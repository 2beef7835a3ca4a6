"""Reading and writing files: atomic writes, lazily read safetensors checkpoints, one streaming
safetensors writer, and moving folders to and from the Hub. Nothing here knows about methods."""

from .checkpoint import ShardedCheckpoint, materialize, meta_model, release, set_tensor, trim_memory
from .files import atomic_write, atomic_write_text
from .folders import atomic_folder
from .safetensors_stream import SafetensorsStreamWriter, save_streaming

__all__ = [
    "SafetensorsStreamWriter",
    "ShardedCheckpoint",
    "atomic_folder",
    "atomic_write",
    "atomic_write_text",
    "materialize",
    "meta_model",
    "release",
    "save_streaming",
    "set_tensor",
    "trim_memory",
]
