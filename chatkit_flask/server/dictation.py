"""Dictation (``input.transcribe``): the visitor's recording, transcribed by OpenAI's
transcription endpoint (``POST /v1/audio/transcriptions``) through the site's own model client.

Off unless ``CHATKIT_TRANSCRIBE_MODEL`` names a model. What a recording may be is checked before
the model is called (``protocol`` refuses the rest): one of the types chatkit-js records
(:data:`AUDIO_TYPES`), at most ``CHATKIT_TRANSCRIBE_MAX_BYTES``. The request carries no duration
and the browser's WebM has none in its header, so the size cap is what bounds it: at the 32 to
128 kbit/s browsers record at, the default 3 MB holds about 3 to 12 minutes.

A recording's tokens are reserved on the visitor's budgets before the call, as a reply's are
(:func:`reservation_tokens`: what it costs at most, from its size), and settled with what the
provider reports after; a failed call releases the reservation.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from chatkit.types import AudioInput

from .agent import ModelClient

__all__ = ["AUDIO_TYPES", "Dictation", "DictationFailed", "Transcript", "reservation_tokens"]

log = logging.getLogger("chatkit_flask")

# What chatkit-js records (its dictation docs), with the file name OpenAI needs to read each.
AUDIO_TYPES = {"audio/webm": "webm", "audio/ogg": "ogg", "audio/mp4": "m4a"}

# The reservation: the longest a recording of its size can last (at the lowest bitrate browsers
# record speech at, 32 kbit/s = 4,000 bytes a second) times what a second costs at most (about
# 17 audio tokens: OpenAI's transcription models count some 1,000 a minute; and a few of
# transcript), plus the request itself. 3 MB (the default cap) reserves 15,020 tokens.
LOWEST_BYTES_PER_SECOND = 4_000
TOKENS_PER_SECOND = 20
TOKENS_PER_REQUEST = 20


def reservation_tokens(size: int) -> int:
    """The most a recording of ``size`` bytes should cost, reserved before the call."""
    return TOKENS_PER_REQUEST + math.ceil(size * TOKENS_PER_SECOND / LOWEST_BYTES_PER_SECOND)


class DictationFailed(Exception):
    """The transcription call failed (logged by class and status only; a 502 for the caller)."""


@dataclass(frozen=True)
class Transcript:
    """A transcription's ``text`` and the tokens the provider reported (zeros when it bills by
    duration, as ``whisper-1`` does)."""

    text: str
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass(frozen=True)
class Dictation:
    """Transcribes with ``model`` through ``client``; ``max_bytes`` is the recording's cap."""

    model: str
    client: ModelClient
    max_bytes: int

    async def transcribe(self, audio: AudioInput, request_id: str) -> Transcript:
        """The text of ``audio`` (checked by the caller); :class:`DictationFailed` otherwise.
        Must run on the bridge's loop (the client is bound to it)."""
        name = f"audio.{AUDIO_TYPES.get(audio.media_type, 'webm')}"
        try:
            result = await self.client.openai_client().audio.transcriptions.create(
                model=self.model, file=(name, audio.data, audio.media_type)
            )
        except Exception as exc:
            # Class and status only: a provider's message can quote the request.
            log.warning(
                "transcription failed: %s status=%s [%s]",
                type(exc).__name__,
                getattr(exc, "status_code", "-"),
                request_id,
            )
            raise DictationFailed from None
        usage = getattr(result, "usage", None)
        if getattr(usage, "type", None) != "tokens":
            return Transcript(result.text)
        return Transcript(result.text, usage.input_tokens, usage.output_tokens)
