"""Tekken (tekken.json) decoding: token ids -> text.

Ids below `default_num_special_tokens` (1000) are special tokens ([BOS], [STREAMING_PAD], ...); text id
i is BPE rank i - 1000, whose bytes are base64 `token_bytes` in the vocab list. A character may span
several tokens, so bytes are concatenated before UTF-8 decoding (incrementally, for streams).
"""

import base64
import codecs
import json

from ..errors import VoxtralError


class Tekken:
    def __init__(self, path):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            cfg = data["config"]
            self.n_special = int(cfg["default_num_special_tokens"])
            n_text = int(cfg["default_vocab_size"]) - self.n_special
            vocab = data["vocab"][:n_text]
            self._bytes = [base64.b64decode(v["token_bytes"]) for v in vocab]
            self.audio = data.get("audio") or {}
            self.special_names = {int(s["rank"]): s["token_str"] for s in data.get("special_tokens", [])}
        except FileNotFoundError:
            raise VoxtralError(f"missing file: {path} (the Tekken tokenizer shipped with the model)") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise VoxtralError(f"{path} is not a valid tekken.json ({type(e).__name__}: {e})") from None

    def token_bytes(self, i):
        """UTF-8 bytes of one id; b"" for special tokens (and ids past the vocab)."""
        r = i - self.n_special
        return self._bytes[r] if 0 <= r < len(self._bytes) else b""

    def decode(self, ids):
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def incremental(self):
        """A decoder that turns ids into text pieces as they arrive, never splitting a character."""
        return _Incremental(self)


class _Incremental:
    def __init__(self, tok):
        self._tok = tok
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids):
        return self._utf8.decode(b"".join(self._tok.token_bytes(i) for i in ids))

    def flush(self):
        return self._utf8.decode(b"", final=True)
