"""The one exception type that reaches the user as a message instead of a traceback."""


class ReproError(Exception):
    """Bad input (spec, path, dataset, checkpoint) or a refused action.

    The CLI prints ``error: <message>`` and exits with code 2; the message must name what is wrong.
    """
