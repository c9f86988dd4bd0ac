"""Sans-IO codecs: compression, PRW encode/decode, size limits. Never imports trio."""
