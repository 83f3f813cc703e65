"""Stage 6: Tekken (tekken.json) decoding: token ids -> text.

Ids below `default_num_special_tokens` (1000) are special tokens ([BOS], [STREAMING_PAD], ...); text id
i is BPE rank i - 1000, whose bytes are base64 `token_bytes` in the vocab list. A character may span
several tokens, so bytes are concatenated before UTF-8 decoding (incrementally, for streams).
"""

import base64
import binascii
import codecs

from ..config import BOS_ID, EOS_ID, STREAMING_PAD_ID, STREAMING_WORD_ID, int_field, read_json, section, show
from ..errors import VoxtralError

# The special ids the prompt and the decoding loop use by number (config.py), by their names in tekken.json
FIXED_SPECIALS = {BOS_ID: "<s>", EOS_ID: "</s>", STREAMING_PAD_ID: "[STREAMING_PAD]", STREAMING_WORD_ID: "[STREAMING_WORD]"}


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
        n_text = self.vocab_size - self.n_special          # the model's text ids (config.num_vocab_tokens is the file's)
        vocab = section(data, "vocab", path, kind=list)
        if n_text < 1 or len(vocab) < n_text:
            raise VoxtralError(f"{path}: vocab holds {len(vocab)} tokens; default_vocab_size {self.vocab_size} - "
                               f"default_num_special_tokens {self.n_special} = {n_text} needed")
        self._bytes = [_token_bytes(v, i, path) for i, v in enumerate(vocab[:n_text])]
        # the realtime model's tokenizer carries both; mistral-common and HF's processor refuse it without them
        self.audio = section(data, "audio", path)
        self.special_names = _special_names(section(data, "special_tokens", path, kind=list), self.n_special, path)

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
        b = base64.b64decode(b64, validate=True)
    except (ValueError, binascii.Error):
        raise VoxtralError(f"{path}: vocab entry {rank} {show(entry)} has no base64 token_bytes") from None
    # ids are decoded by position; mistral-common by the rank, which it requires to be the position
    r = entry.get("rank", rank)
    if isinstance(r, bool) or r != rank:
        raise VoxtralError(f"{path}: vocab entry {rank} has rank {show(r)}; ranks must be 0, 1, 2, ... in order")
    return b


def _special_names(specials, n_special, path):
    """{rank: name} of the special tokens, each rank and name once; the model's special ids are fixed, so the
    ones it uses must carry their names (a tokenizer of another model would decode, into the wrong text)."""
    names, seen = {}, set()
    for s in specials:
        rank, name = (s.get("rank"), s.get("token_str")) if isinstance(s, dict) else (None, None)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < n_special or not isinstance(name, str):
            raise VoxtralError(f"{path}: special token {show(s)}: expected {{rank: 0..{n_special - 1}, token_str: string}}")
        if rank in names:
            raise VoxtralError(f"{path}: special tokens {show(names[rank])} and {show(name)} both have rank {rank}")
        if name in seen:
            raise VoxtralError(f"{path}: special token {show(name)} appears twice")
        names[rank] = name
        seen.add(name)
    for rank, want in FIXED_SPECIALS.items():
        if names.get(rank) != want:
            raise VoxtralError(f"{path}: special token {rank} is {show(names.get(rank))}; this model needs {want!r} there")
    return names


class _Incremental:
    def __init__(self, tok):
        self._tok = tok
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids):
        return self._utf8.decode(b"".join(self._tok.token_bytes(i) for i in ids))

    def flush(self):
        return self._utf8.decode(b"", final=True)
