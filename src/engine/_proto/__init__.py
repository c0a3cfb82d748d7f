"""Generated remotemedia.v1 stubs (scripts/gen_proto.py)."""
