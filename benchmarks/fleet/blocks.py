"""The simulated model's tokens and KV blocks: a deterministic tokeniser, the chat template, the
chained block hashes of vLLM's prefix caching, and the words the model generates.

Tokens are runs of up to 4 non-space characters, so a text's token count is about its length in
characters / 4 (a word of 1-4 letters is one token), and tokenisation is concatenative across
whitespace: the prompt of one turn plus the answer generated is a prefix of the next turn's prompt.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from typing import Any

_TOKEN = re.compile(r"\S{1,4}")
_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"
# 8,100 four-letter words (consonant, vowel, consonant, vowel): each is exactly one token.
VOCABULARY = tuple(
    a + b + c + d for a in _CONSONANTS for b in _VOWELS for c in _CONSONANTS for d in _VOWELS
)


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text)


def _content(content: Any) -> str:
    if isinstance(content, list):  # OpenAI's content parts: the text ones, joined
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def render_chat(messages: Iterable[dict[str, Any]]) -> str:
    """The chat template: ``role: content`` a line each, then the generation prompt."""
    lines = [f"{m.get('role', 'user')}: {_content(m.get('content'))}\n" for m in messages]
    return "".join(lines) + "assistant:"


def block_hashes(tokens: Sequence[str], block_size: int, parent: bytes = b"") -> list[bytes]:
    """The hashes of the full blocks of ``tokens``; each one covers every token before it, as
    vLLM's prefix caching keys blocks, so a block is only shared when its whole prefix is."""
    hashes: list[bytes] = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        block = "\x00".join(tokens[start : start + block_size]).encode()
        parent = hashlib.blake2b(parent + block, digest_size=16).digest()
        hashes.append(parent)
    return hashes


def generated_token(seed: int, index: int) -> str:
    """The ``index``-th token generated for a prompt whose seed is ``seed``: the same prompt
    gets the same answer on every replica, so a resent history hits whichever cache holds it."""
    return VOCABULARY[(seed + index * 7919) % len(VOCABULARY)]


def prompt_seed(tokens: Sequence[str]) -> int:
    digest = hashlib.blake2b("\x00".join(tokens).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")
