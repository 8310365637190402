"""The one rule for product names.

A product name becomes a folder under ``EDGE_AD_HOME``, an MLflow experiment and registered
model name (``edge-ad-<product>``), a filter string in MLflow searches, a Kafka header and a
Serve lookup key. One safe charset and length for all of them: a letter or digit first, then
letters, digits, ``.``, ``_`` or ``-``, at most 100 characters. So a name can neither leave its
folder (``/``, ``..`` alone), nor break a quoted filter (``'``), nor carry a line break.
"""

from __future__ import annotations

import re

from edge_ad.errors import EdgeADError

MAX_PRODUCT_CHARS = 100
_PRODUCT_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_PRODUCT_CHARS - 1}}}")


def is_product_name(name: object) -> bool:
    """Whether ``name`` follows the rule (the whole string: a trailing newline fails)."""
    return isinstance(name, str) and _PRODUCT_NAME.fullmatch(name) is not None


def check_product_name(name: object) -> str:
    """``name`` if it follows the rule, else an :class:`EdgeADError` saying what is allowed."""
    if is_product_name(name):
        return str(name)
    shown = repr(name) if len(repr(name)) <= 60 else repr(name)[:57] + "..."
    raise EdgeADError(
        f"product name {shown} is not allowed: use letters, digits, '.', '_' or '-', starting "
        f"with a letter or digit, at most {MAX_PRODUCT_CHARS} characters"
    )
