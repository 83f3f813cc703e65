"""The one exception type users see: its message is a complete, readable sentence."""


class VoxtralError(Exception):
    """Bad input, a bad file or an impossible setting. The CLI prints the message and exits non-zero."""
