"""Charging station controller (CSC): the EVSE board's firmware.

Link codec modules: `msgpack` (canonical encoder, hardened decoder), `frame` (envelope,
validation against the generated `schema`, stream splitting), `crypto` (HMAC tags, key
derivation, AES-128-CTR for secret fields), `window` (replay window).
"""
