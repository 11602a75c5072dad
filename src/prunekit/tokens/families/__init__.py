"""Model families token reduction runs inside, one file each, registered in ``FAMILIES``."""

from prunekit.tokens.families.base import FAMILIES, TokenFamily, find_family

__all__ = ["FAMILIES", "TokenFamily", "find_family"]
