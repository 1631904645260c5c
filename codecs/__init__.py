"""KV codecs: pure functions between a chunk tensor and bytes, registered by name.

Installed as ``kvstore.codecs`` (never import it as top-level ``codecs``: that is the stdlib).
The codec used for an object is recorded in its header, so any reader decodes any object
regardless of its own configuration. The built-ins are imported when first asked for
(``get_codec``): the byte codecs (raw, lz4) without torch, the lossy ones with it.
"""

from kvstore.codecs.base import (Codec, CodecError, available_codecs, get_codec, is_bytewise, register_codec,
                                 unregister_codec)

__all__ = ["Codec", "CodecError", "available_codecs", "get_codec", "is_bytewise", "register_codec", "unregister_codec"]
