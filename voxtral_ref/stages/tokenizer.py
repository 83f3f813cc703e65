"""Stage 6: Tekken (tekken.json) decoding: token ids -> text.

Ids below `default_num_special_tokens` (1000) are special tokens ([BOS], [STREAMING_PAD], ...); text id
i is BPE rank i - 1000, whose bytes are base64 `token_bytes` in the vocab list. A character may span
several tokens, so bytes are concatenated before UTF-8 decoding (incrementally, for streams).
"""

import base64
import binascii
import codecs

from ..config import int_field, read_json, section, show
from ..errors import VoxtralError


class Tekken:
    def __init__(self, path):
        """Read and check tekken.json: every id below default_vocab_size must decode to something definite,
        or a bad file would give an empty or shifted transcript and exit 0."""
        self.path = path
        data = read_json(path)
        if not isinstance(data, dict):
            raise VoxtralError(f"{path}: not a JSON object (the Tekken tokenizer shipped with the model)")
        cfg = section(data, "config", path)
        self.n_special = int_field(cfg, "default_num_special_tokens", f"{path}: config")
        self.vocab_size = int_field(cfg, "default_vocab_size", f"{path}: config")
        n_text = self.vocab_size - self.n_special
        vocab = data.get("vocab")
        if not isinstance(vocab, list) or n_text < 1 or len(vocab) < n_text:
            n = len(vocab) if isinstance(vocab, list) else show(vocab)
            raise VoxtralError(f"{path}: vocab holds {n} tokens; default_vocab_size {self.vocab_size} - "
                               f"default_num_special_tokens {self.n_special} = {n_text} needed")
        self._bytes = [_token_bytes(v, i, path) for i, v in enumerate(vocab[:n_text])]
        self.audio = section(data, "audio", path, required=False)
        self.special_names = _special_names(data.get("special_tokens", []), self.n_special, path)

    def token_bytes(self, i):
        """UTF-8 bytes of one id; b"" for special tokens (and ids past the vocab)."""
        r = i - self.n_special
        return self._bytes[r] if 0 <= r < len(self._bytes) else b""

    def decode(self, ids):
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def incremental(self):
        """A decoder that turns ids into text pieces as they arrive, never splitting a character."""
        return _Incremental(self)


def _token_bytes(entry, rank, path):
    b64 = entry.get("token_bytes") if isinstance(entry, dict) else None
    try:
        if not isinstance(b64, str):
            raise ValueError
        return base64.b64decode(b64, validate=True)
    except (ValueError, binascii.Error):
        raise VoxtralError(f"{path}: vocab entry {rank} {show(entry)} has no base64 token_bytes") from None


def _special_names(specials, n_special, path):
    """{rank: name} of the special tokens (names are for display; the model's special ids are fixed)."""
    names = {}
    for s in specials if isinstance(specials, list) else [specials]:
        rank, name = (s.get("rank"), s.get("token_str")) if isinstance(s, dict) else (None, None)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < n_special or not isinstance(name, str):
            raise VoxtralError(f"{path}: special token {show(s)}: expected {{rank: 0..{n_special - 1}, token_str: string}}")
        names[rank] = name
    return names


class _Incremental:
    def __init__(self, tok):
        self._tok = tok
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids):
        return self._utf8.decode(b"".join(self._tok.token_bytes(i) for i in ids))

    def flush(self):
        return self._utf8.decode(b"", final=True)
