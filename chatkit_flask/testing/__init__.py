"""Test doubles and helpers for apps that use chatkit-flask in their own tests.

- :mod:`chatkit_flask.testing.fake_chatkit`: a fake ChatKit sessions API on a loopback socket
  (hosted mode).
"""
