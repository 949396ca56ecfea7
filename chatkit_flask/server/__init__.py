"""Server mode: the extension serves the ChatKit protocol itself (OpenAI's ChatKit Python SDK
with an Agents SDK agent), behind the same visitor identity and limits as the hosted mode.

Importing :mod:`chatkit_flask` in hosted mode never imports this package (it needs the optional
``chatkit-flask[server]`` dependencies).
"""
