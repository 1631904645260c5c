"""KV codecs: pure functions between a chunk tensor and bytes, registered by name.

Installed as ``kvstore.codecs`` (never import it as top-level ``codecs``: that is the stdlib).
The codec used for an object is recorded in its header, so any reader decodes any object
regardless of its own configuration.
"""

from kvstore.codecs.base import Codec, CodecError, available_codecs, get_codec, register_codec, unregister_codec
from kvstore.codecs import cachegen as _cachegen  # noqa: F401  (registers "cachegen")
from kvstore.codecs import fp8 as _fp8  # noqa: F401  (registers "fp8")
from kvstore.codecs import int8 as _int8  # noqa: F401  (registers "int8")
from kvstore.codecs import lz4 as _lz4  # noqa: F401  (registers "lz4")
from kvstore.codecs import raw as _raw  # noqa: F401  (registers "raw")

__all__ = ["Codec", "CodecError", "available_codecs", "get_codec", "register_codec", "unregister_codec"]
