"""voxtral_ref: a NumPy + C reference implementation of Mistral's Voxtral Mini 4B Realtime."""

from .errors import VoxtralError
from .model import Model, Transcript, load

__version__ = "0.1.0"
__all__ = ["load", "Model", "Transcript", "VoxtralError", "__version__"]
