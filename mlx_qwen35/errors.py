"""The one exception type for problems a user can cause and fix."""


class Qwen35Error(Exception):
    """Bad input (file, argument, config, memory budget): the message names it and says the fix.

    The CLI prints the message on one line and exits non-zero; no traceback.
    """
