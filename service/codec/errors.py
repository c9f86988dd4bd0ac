"""What can be wrong with a request body. Each error knows its metric reason; receivers/status.py
maps them to HTTP status codes and gRPC codes in one table."""


class CodecError(ValueError):
    """Base: the message says what is wrong in one line."""

    reason = "bad_request"


class BadCompression(CodecError):
    reason = "bad_compression"


class BadProtobuf(CodecError):
    reason = "bad_protobuf"


class TooLarge(CodecError):
    reason = "too_large"


class UnsupportedEncoding(CodecError):
    reason = "unsupported_encoding"


class DecompressedTooLarge(TooLarge):
    reason = "decompressed_too_large"


class BadJSON(CodecError):
    reason = "bad_json"
