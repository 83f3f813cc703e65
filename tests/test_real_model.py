"""The real checkpoint against the transcripts HF transformers' own integration tests publish for
mistralai/Voxtral-Mini-4B-Realtime-2602 (tests/models/voxtral_realtime/test_modeling_voxtral_realtime.py).

Skipped unless VOXTRAL_REF_MODEL names a directory with the real checkpoint. The audio files are the
ones HF's tests download (hf-internal-testing/dummy-audio-samples); put them in VOXTRAL_REF_AUDIO
(default: the model directory). HF publishes slightly different texts for the same audio from different
runs ("floating point precision differences", in their words); every published variant is accepted.
"""

import os
from pathlib import Path

import pytest

import voxtral_ref
import soundfile as sf

MODEL = os.environ.get("VOXTRAL_REF_MODEL")
pytestmark = pytest.mark.skipif(not MODEL, reason="set VOXTRAL_REF_MODEL to the real checkpoint directory")

_DUDE = (" Come on{} Dude. You got a tattoo. So did you, dude. No. Oh, dude, what does my tattoo say? Sweet! "
         + "What about mine? Dude, what does mine say? Sweet! " * 6
         + "What about mine? Dude! What does mine say? Sweet! Idiot! Your tattoo says dude. Your tattoo says "
         "sweet. Got it? Sorry. Hey, sorry.")
_OBAMA = (" This week, I traveled to Chicago to deliver my final farewell address to the nation{}ollowing in "
          "the tradition of presidents before me. It was an opportunity to say thank you. Whether we've seen eye "
          "to eye or rarely agreed at all, {}y conversations with you, the American people, in living rooms and "
          "schools, at farms and on factory floors, at diners and on distant military outposts, {}ll these "
          "conversations are what have kept me honest, kept me inspired, and kept me going. Every day, I learned "
          "from you. You made me a better president, and you made me a better man. Over the course of these eight "
          "years, I've seen the goodness, the resilience, and the hope of the")
EXPECTED = {
    "dude_where_is_my_car.wav": {_DUDE.format("!"), _DUDE.format(".")},
    "obama_first_45_secs.mp3": {_OBAMA.format(", f", "m", "A"), _OBAMA.format(". F", "M", "a")},
}


@pytest.fixture(scope="module")
def model():
    return voxtral_ref.load(MODEL)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_published_transcripts(model, name):
    path = Path(os.environ.get("VOXTRAL_REF_AUDIO", MODEL)) / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    audio, sr = sf.read(path, dtype="float32")
    assert model.transcribe(audio, sample_rate=sr).text in EXPECTED[name]
