"""The release's SentencePiece tokenizer: prompts to token ids, and token ids back to text.

Decoding keeps every byte the tokens stand for: SentencePiece's own decode turns byte pieces that are not
(yet) valid UTF-8, such as the first bytes of a character cut off by the last token, into U+FFFD; here they
are shown escaped (``\\xe2``), so the output says exactly what the model produced.
"""
from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

from weightswarm.core.errors import one_line

SPACE = "\u2581"  # SentencePiece's visible space


class Tokenizer:
    def __init__(self, path: Path):
        self.sp = spm.SentencePieceProcessor(model_file=str(path))

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    def encode(self, text: str) -> list[int]:
        """BOS, then the text's pieces, as Mistral prompts are fed."""
        return [self.sp.bos_id()] + self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        out = bytearray()
        first = True
        for i in ids:
            if self.sp.is_control(i):
                continue
            if self.sp.is_byte(i):
                out.append(int(self.sp.id_to_piece(i)[3:5], 16))  # "<0xE2>"
            elif self.sp.is_unknown(i):
                out += " \u2047 ".encode()  # SentencePiece's own surface for <unk>
            else:
                piece = self.sp.id_to_piece(i)
                # The space of the dummy prefix SentencePiece put before the text when encoding it.
                out += (piece[1:] if first and piece.startswith(SPACE) else piece).replace(SPACE, " ").encode()
            first = False
        return out.decode("utf-8", "backslashreplace")


def printable(text: str) -> str:
    """Generated text on one line, quoted: control characters escaped, the rest (and its \\xNN escapes) as is."""
    return '"' + one_line(text) + '"'
