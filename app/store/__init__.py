"""Models on disk: the store, which file a name means, the settings file, the catalog, and their views.

local (the store folder) · models (--model → a file) · config (config.toml) · info (what a GGUF is and needs) ·
catalog (the Polyglot-Ko family) · recommend (what fits this machine) · pull (hub → GGUF) · *_view (their output).
"""
