"""Process-wide flags set once by the CLI's root options (the library never reads argv)."""

DEBUG = False
VERBOSE = False
