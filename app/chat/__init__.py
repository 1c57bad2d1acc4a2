"""Talking to a model: `malhae chat`, `ask` and `complete`, on the runtime's engine.

session (opening one: options, model, template, reader) · repl (the session and its /commands) ·
reader (what the user types: messages, commands, history, completion) ·
writer (answers on the terminal, Ctrl-C-safe) · conversation (turns, what fits, saved chats) · oneshot (ask/complete) ·
documents (piped input, --file and /read: read, checked, put before the question).
"""
