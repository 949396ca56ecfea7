"""Server mode: the extension serves the ChatKit protocol itself (OpenAI's ChatKit Python SDK
with an Agents SDK agent), behind the same visitor identity and limits as the hosted mode.

Importing :mod:`chatkit_flask` in hosted mode never imports this package (it needs the optional
``chatkit-flask[server]`` dependencies).
"""

import warnings

# openai-chatkit 1.6 builds its own widget classes on ones it deprecates, so importing it warns
# "Direct usage of named widget classes is deprecated" (a DeprecationWarning located in
# <frozen abc>) once per process, about code that is not ours: this package uses no widget
# class. That one warning, by category and message, before any module here imports chatkit.
warnings.filterwarnings(
    "ignore",
    message="Direct usage of named widget classes is deprecated",
    category=DeprecationWarning,
)
